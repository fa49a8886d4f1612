"""Every PrimFunc of a GPU build must have become GPU kernels.

A function no schedule rule took keeps plain loops. TVM then compiles it as host (CPU)
code that reads and writes buffers living in device memory: it builds without a word
and fails or crashes on the phone (trap 2 in docs/tvm-0.27.md; TVM's own
``VerifyMemory`` does not catch it in 0.27's pipeline). Run right after the schedules,
this pass refuses such a function by name.

``kernel_regions`` is shared with ``CheckWorkGroupSize``: the parts of a function that
become separate kernels, as ``SplitHostDevice`` will cut them (each outermost
blockIdx/threadIdx binding starts one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import IRModule, tirx
from tvm.sym import Analyzer

from ...errors import UserError


@dataclass
class KernelRegion:
    """One future kernel: its threads per work-group, by tag (threadIdx.x/y/z)."""

    thread_extents: dict[str, tirx.PrimExpr] = field(default_factory=dict)

    def work_group_size(self) -> int | None:
        """Product of the threadIdx extents; None when one of them is not a constant."""
        size = 1
        for extent in self.thread_extents.values():
            if not isinstance(extent, tirx.IntImm):
                return None
            size *= int(extent)
        return size


@dataclass
class FunctionKernels:
    kernels: list[KernelRegion]
    host_accessed: list[str]  # buffers read or written outside every kernel, in order


def _binding(node: object) -> tuple[str, tirx.PrimExpr] | None:
    """(thread tag, extent) when the node binds a GPU thread axis."""
    if isinstance(node, tirx.For) and node.kind == tirx.ForKind.THREAD_BINDING:
        return str(node.thread_binding.thread_tag), node.extent
    if isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent":
        return str(node.node.thread_tag), node.value
    return None


def _thread_extents(region: tirx.Stmt) -> dict[str, tirx.PrimExpr]:
    extents: dict[str, tirx.PrimExpr] = {}
    analyzer = Analyzer()

    def visit(node: object) -> None:
        bound = _binding(node)
        if bound is None or not bound[0].startswith("threadIdx"):
            return
        tag, extent = bound
        extent = analyzer.simplify(extent)
        old = extents.get(tag)
        # A tag bound in several loops of one kernel launches with the largest extent.
        if old is None or (
            isinstance(old, tirx.IntImm)
            and isinstance(extent, tirx.IntImm)
            and int(extent) > int(old)
        ):
            extents[tag] = extent
        elif not isinstance(extent, tirx.IntImm):
            extents[tag] = extent

    tvm_ffi.structural_walk(region, [((tirx.For, tirx.AttrStmt), visit)])
    return extents


def kernel_regions(func: tirx.PrimFunc) -> FunctionKernels:
    """The kernels a scheduled PrimFunc will become, and what it touches from host code."""
    kernels: list[KernelRegion] = []
    host: list[str] = []
    # Device memory is what the function is given; its own scalars and locals are not.
    params = list(func.params)

    def on_bind(node: tirx.Stmt) -> tvm_ffi.WalkResult:
        if _binding(node) is None:
            return tvm_ffi.WalkResult.ADVANCE
        kernels.append(KernelRegion(_thread_extents(node)))
        return tvm_ffi.WalkResult.SKIP  # the whole subtree is this one kernel

    def on_access(buffer_var: tvm.ir.Var) -> None:
        name = str(buffer_var.name)
        if name not in host and any(p.same_as(buffer_var) for p in params):
            host.append(name)

    tvm_ffi.structural_walk(
        func.body,
        [
            ((tirx.For, tirx.AttrStmt), on_bind),
            (tirx.BufferStore, lambda s: on_access(s.buffer)),
            (tvm.ir.TensorLoad, lambda e: on_access(e.source)),
        ],
        order="pre",
    )
    return FunctionKernels(kernels, host)


def device_prim_funcs(mod: IRModule) -> list[tuple[str, tirx.PrimFunc]]:
    return sorted(
        (gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
    )


@tvm.transform.module_pass(opt_level=0, name="RequireKernels")
class RequireKernels:
    """Refuse a GPU module with a PrimFunc that would touch device memory from host code."""

    def __init__(self, target_name: str):
        self.target_name = target_name

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        for name, func in device_prim_funcs(mod):
            found = kernel_regions(func)
            if found.host_accessed:
                buffers = ", ".join(found.host_accessed[:4])
                raise UserError(
                    f"function '{name}' was not made into a GPU kernel for {self.target_name}: "
                    f"it would access {buffers} from host code (no blockIdx/threadIdx "
                    "binding); add a schedule rule that takes it (schedules/gpu/) or bind "
                    "its loops to blockIdx/threadIdx"
                )
        return mod
