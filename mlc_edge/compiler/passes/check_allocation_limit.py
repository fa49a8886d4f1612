"""No single buffer may exceed the device's largest allocation.

OpenCL caps one buffer at CL_DEVICE_MAX_MEM_ALLOC_SIZE (1024 MiB on Adreno 740/830):
the runtime loads every weight into its own buffer and gets ``CL_INVALID_BUFFER_SIZE``
for a bigger one, on the phone, after the download. Run after ``StaticPlanBlockMemory``,
this pass checks the two kinds of buffers known at compile time:

- each weight (the packed parameters every runtime function takes), by name; an
  embedding / output layer above the limit arrives here already split into pieces
  (``mlc_edge.models.vocab``), so what is refused is a weight no split applies to;
- each storage the memory plan allocates (temporaries, logits), with the tensor and the
  kernel that needs the most of it.

(The KV cache's pages are allocated by the runtime per layer; at edge context sizes they
are a few MiB.)
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import IRModule, relax, tirx

from ...errors import UserError
from ...models.vocab import split_parameter

MiB = 1 << 20


def static_shape(ty: object) -> list[int] | None:
    """The dims of a tensor type of static shape, else None."""
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = list(ty.shape.values)
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def tensor_bytes(ty: object) -> int | None:
    """Bytes of a tensor of static shape, else None."""
    dims = static_shape(ty)
    if dims is None:
        return None
    n = tvm.runtime.DataType(ty.dtype).bits // 8
    for d in dims:
        n *= d
    return n


def _describe(ty: relax.TensorType) -> str:
    """``1x16x320 float16`` (symbolic dims by name: ``1xseq_lenx320``)."""
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return "tensor"
    dims = [str(int(d)) if isinstance(d, tirx.IntImm) else str(d) for d in ty.shape.values]
    return f"{'x'.join(dims)} {ty.dtype}"


def _fix(weight: str) -> str:
    """What to do about a weight too large for one buffer."""
    if split_parameter(weight) is not None:
        # A piece: the bundle's weights were split for a device with larger buffers.
        return (
            "the bundle's embedding/output layer were split for a larger allocation: "
            "make the bundle for this target (mlc-edge compile MODEL_DIR --target ... "
            "-o BUNDLE) so they are split to fit it"
        )
    return (
        "only the embedding and the output layer are split into pieces that fit: "
        "use a model with a smaller hidden or intermediate size"
    )


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n:,} bytes"


@tvm.transform.module_pass(opt_level=0, name="CheckAllocationLimit")
class CheckAllocationLimit:
    def __init__(self, max_alloc_bytes: int, device_name: str, param_names: list[str]):
        self.limit = max_alloc_bytes
        self.device_name = device_name
        self.param_names = param_names

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        self._check_params(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self._check_storage(gv.name_hint, func)
        return mod

    def _check_params(self, mod: IRModule) -> None:
        for _, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not func.params:
                continue
            packed = func.params[-1].ty  # the weights come last, as one tuple
            if not isinstance(packed, relax.TupleType) or len(packed.fields) != len(
                self.param_names
            ):
                continue
            for name, ty in zip(self.param_names, packed.fields, strict=True):
                size = tensor_bytes(ty)
                if size is not None and size > self.limit:
                    raise UserError(
                        f"weight '{name}' ({_describe(ty)}) is {_mib(size)}, more than "
                        f"the {_mib(self.limit)} one buffer may hold on {self.device_name} "
                        f"(CL_DEVICE_MAX_MEM_ALLOC_SIZE); {_fix(name)}"
                    )
            return  # every packed function takes the same parameters

    def _check_storage(self, func_name: str, func: relax.Function) -> None:
        for storage in planned_storages(func):
            if storage.size > self.limit:
                raise UserError(
                    f"function '{func_name}' plans a buffer of {_mib(storage.size)} "
                    f"{storage.describe()}, more than the {_mib(self.limit)} one buffer may "
                    f"hold on {self.device_name}; lower --prefill-chunk-size / --max-batch-size"
                )


@dataclass
class PlannedStorage:
    size: int  # bytes
    tensor: str  # the largest tensor placed in it: "1x16x320 float16"
    used_by: list[str]  # the PrimFuncs that tensor is given to

    def describe(self) -> str:
        return f"(for a {self.tensor} tensor used by {', '.join(self.used_by) or '?'})"


def planned_storages(func: relax.Function) -> list[PlannedStorage]:
    """The static storage allocations of a Relax function after ``StaticPlanBlockMemory``."""
    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    alloc_tensor = tvm.ir.Op.get("relax.memory.alloc_tensor")
    sizes: dict[relax.Var, int] = {}
    placed: dict[relax.Var, list[relax.Var]] = {}  # storage -> tensors placed in it
    users: dict[relax.Var, list[str]] = {}  # tensor -> PrimFuncs given it
    for block in func.body.blocks:
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if not isinstance(value, relax.Call):
                continue
            if value.op == alloc_storage and isinstance(value.args[0], relax.ShapeExpr):
                dims = value.args[0].values
                if all(isinstance(d, tirx.IntImm) for d in dims):
                    sizes[binding.var] = int(dims[0])
            elif value.op == alloc_tensor and isinstance(value.args[0], relax.Var):
                placed.setdefault(value.args[0], []).append(binding.var)
            elif isinstance(value.op, tvm.ir.GlobalVar):
                for arg in value.args:
                    if isinstance(arg, relax.Var):
                        users.setdefault(arg, []).append(value.op.name_hint)
    result = []
    for storage, size in sizes.items():
        tensors = placed.get(storage, [])
        if tensors:
            largest = max(tensors, key=lambda v: tensor_bytes(v.ty) or 0)
            desc, used_by = _describe(largest.ty), list(dict.fromkeys(users.get(largest, [])))
        else:
            desc, used_by = "?", []
        result.append(PlannedStorage(size, desc, used_by))
    return result
