"""Model definition → Relax IR → our passes and schedules → a runnable library.

export_tvm           the nn.Module's functions as Relax, weights as packed parameters
Attach…              the runtime's logit processors; on CUDA, the engine's GPU sampler
FuseInt4Matmul       4-bit weights: the dequantization becomes part of the matmul
FuseTransposeMatmul  "NK" weights: the transpose becomes part of the matmul
Legalize … FuseTIR   high-level ops become fused TIR PrimFuncs
4-bit guard          no kernel writes a dequantized weight to memory (checked again
                     after the schedules)
schedules            the target's rules give each PrimFunc its loops and threads
GPU guards           every PrimFunc became kernels, within the device's work-group size
lowering             dataflow → VM calls; memory planned statically with size bounds
GPU guard            no weight or planned buffer above the device's largest allocation
AttachMetadata       ``_metadata`` JSON including the planned memory
relax.build          machine code (and device kernels), exported as .so or .tar
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tvm
from tvm import IRModule, relax
from tvm.s_tir import dlight as dl

from ..config import ModelSpec
from ..errors import UserError
from ..models import DecoderLM
from ..models.parameters import instantiate
from .contract import metadata_fields
from .int4_targets import require_int4_support
from .passes import (
    AttachGPUSampler,
    AttachLogitProcessor,
    AttachMetadata,
    AttachVarBounds,
    CheckAllocationLimit,
    CheckWorkGroupSize,
    FuseInt4Matmul,
    MarkShapeFuncsNoAlias,
    RequireFusedDequantize,
    RequireKernels,
)
from .targets import TargetSpec


def spec_for_target(spec: ModelSpec, target_spec: TargetSpec) -> ModelSpec:
    """The spec as the target builds it: the embedding / output layer split to fit the
    device's largest allocation (``ModelSpec.for_device``; unchanged without limits), and
    the 4-bit weights in CPU tiles where the target's decode kernel reads them so
    (``ModelSpec.with_cpu_tiles``). A bundle's weights already in tiles build for the CPU
    only."""
    limits = target_spec.limits
    spec = spec.for_device(limits.max_mem_alloc_bytes if limits else None)
    spec = spec.with_cpu_tiles(target_spec.reads_int4_tiles(spec.scheme))
    layout = spec.scheme.int4_layout
    if layout is not None and layout.tiles and target_spec.device != "cpu":
        raise UserError(
            f"this bundle's 4-bit weights are stored in CPU tiles (it was made for --target "
            f"cpu), which {target_spec.name}'s kernels do not read: make a bundle for "
            f"{target_spec.name} from the checkpoint with `mlc-edge compile MODEL_DIR "
            f"--target {target_spec.name} -o NEW_BUNDLE`"
        )
    return spec


def build_metadata(
    spec: ModelSpec, model: DecoderLM, params: list[tuple[str, Any]]
) -> dict[str, Any]:
    """The ``_metadata`` fields the runtime reads (docs/runtime-contract.md), less memory usage."""
    kv = model.kv_cache_shape()
    return {
        **metadata_fields(spec),
        "params": [
            {
                "name": name,
                "shape": [int(d) if isinstance(d, int) else str(d) for d in p.shape],
                "dtype": p.dtype,
                "preprocs": [],
            }
            for name, p in params
        ],
        "kv_cache": {
            "num_hidden_layers": kv.num_hidden_layers,
            "num_attention_heads": kv.num_attention_heads,
            "num_key_value_heads": kv.num_key_value_heads,
            "head_dim": kv.head_dim,
        },
    }


@tvm.transform.module_pass(opt_level=0, name="ApplySchedules")
class ApplySchedules:
    """The target's schedule rules, on a copy (dlight changes the module in place)."""

    def __init__(self, rules: list[Any]):
        self.rules = rules

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        if not self.rules:
            return mod
        return dl.ApplyDefaultSchedule(*self.rules)(mod.clone())


def fuse_into_tir() -> tvm.transform.Pass:
    """Relax operators -> fused TIR PrimFuncs, ready for the schedule rules. nn.Linear's
    transpose + matmul become one matmul first. The model build and the schedule rules'
    tests and benchmarks all start from this."""
    t = relax.transform
    return tvm.transform.Sequential(
        [
            FuseInt4Matmul(),
            t.FuseTransposeMatmul(),
            t.LegalizeOps(),
            t.AnnotateTIROpPattern(),
            t.FoldConstant(),
            t.FuseOps(),
            t.FuseTIR(),
        ],
        name="mlc_edge_fuse_into_tir",
    )


def compile_pipeline(
    target_spec: TargetSpec,
    metadata: dict[str, Any],
    bounds: dict[str, int],
    metadata_sink: dict[str, Any] | None = None,
) -> tvm.transform.Pass:
    """Our Relax pipeline; ``metadata_sink``, if given, receives the final ``_metadata``."""
    t = relax.transform
    limits = target_spec.limits
    device = f"{limits.gpu} ({target_spec.name})" if limits else target_spec.name
    # GPU builds only: on the CPU, plain loops are valid host code and memory is the host's.
    kernel_guards = [RequireKernels(target_spec.name)] if target_spec.device != "cpu" else []
    if limits:
        kernel_guards.append(CheckWorkGroupSize(limits.max_work_group_size, device))
    alloc_guards = (
        [
            CheckAllocationLimit(
                limits.max_mem_alloc_bytes, device, [p["name"] for p in metadata["params"]]
            )
        ]
        if limits
        else []
    )
    return tvm.transform.Sequential(
        [
            AttachLogitProcessor(),
            AttachGPUSampler(target_spec.device),
            AttachVarBounds(bounds),
            fuse_into_tir(),
            RequireFusedDequantize(),
            t.DeadCodeElimination(),
            ApplySchedules(target_spec.schedule_rules()),
            RequireFusedDequantize(scheduled=True),
            *kernel_guards,
            t.RewriteDataflowReshape(),
            t.ToNonDataflow(),
            t.RemovePurityChecking(),
            t.CallTIRRewrite(),
            t.StaticPlanBlockMemory(),
            *alloc_guards,
            AttachMetadata(metadata, metadata_sink),
            t.LowerAllocTensor(),
            t.KillAfterLastUse(),
            t.LowerRuntimeBuiltin(),
            t.ComputePrimValue(),
            t.VMShapeLower(),
            MarkShapeFuncsNoAlias(),
            t.AttachGlobalSymbol(),
        ],
        name="mlc_edge_pipeline",
    )


def var_bounds(spec: ModelSpec) -> dict[str, int]:
    """Upper bounds of the symbolic sizes (``AttachVarBounds``)."""
    sizes = spec.runtime_sizes
    return {
        "seq_len": sizes["prefill_chunk_size"],
        "batch_size": sizes["max_batch_size"],
        "vocab_size": spec.config.vocab_size,
    }


def _exported(
    spec: ModelSpec, target_spec: TargetSpec, metadata_sink: dict[str, Any] | None = None
) -> tuple[tvm.target.Target, IRModule, tvm.transform.Pass]:
    """The model as the target builds it: its TVM target, its Relax module (as
    ``export_tvm`` gives it) and the pipeline that compiles it (``compile_pipeline``)."""
    require_int4_support(spec.scheme, target_spec)
    target_spec.require_buildable()
    target = target_spec.tvm_target()
    spec = spec_for_target(spec, target_spec)
    model = instantiate(spec, target)
    mod, params, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    pipeline = compile_pipeline(
        target_spec, build_metadata(spec, model, params), var_bounds(spec), metadata_sink
    )
    return target, mod, pipeline


def scheduled_module(
    spec: ModelSpec, target_spec: TargetSpec, rules: list[Any] | None = None
) -> tuple[IRModule, IRModule]:
    """The model's module as ``compile_model`` schedules it, before lowering: (PrimFuncs
    as FuseTIR left them, the same after the schedule rules and the kernel guards).

    ``mlc-edge verify`` and the kernel benchmarks recompile the kernels from these;
    ``rules`` replaces the target's schedule rules (to compare another rule set).
    """
    target, mod, pipeline = _exported(spec, target_spec)
    passes = list(pipeline.passes)
    names = [p.info.name for p in passes]
    at = names.index("ApplySchedules")
    # The kernel guards run right after the schedules, up to the first Relax lowering pass.
    guards = passes[at + 1 : names.index("RewriteDataflowReshape")]
    if rules is not None:
        passes[at] = ApplySchedules(rules)
    with target:
        unscheduled = tvm.transform.Sequential(passes[:at])(mod)
        scheduled = tvm.transform.Sequential([passes[at], *guards])(unscheduled)
    return unscheduled, scheduled


def compile_model(
    spec: ModelSpec, target_spec: TargetSpec, model_lib: str
) -> tuple[Any, dict[str, Any]]:
    """The executable (``export`` writes it) and its ``_metadata`` (read at compile time:
    a phone's library does not run here).

    Raises UserError when this TVM cannot build the target, or when a guard finds the
    result would fail on the device (see ``compile_pipeline``).
    """
    metadata: dict[str, Any] = {}
    target, mod, pipeline = _exported(spec, target_spec, metadata)
    if target_spec.system_lib:
        mod = mod.with_attr("system_lib_prefix", f"{model_lib}_")
    with target, target_spec.build_scope():
        # The prefix attribute alone makes the library a system library. system_lib=True
        # would also have relax.build read the attribute back, which fails in TVM 0.27 for
        # prefixes under 8 characters ("Cannot convert from type `ffi.SmallStr`").
        executable = relax.build(
            mod,
            target,
            relax_pipeline=pipeline,
            system_lib=None if target_spec.system_lib else False,
        )
    return executable, metadata


def export(executable: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(path))
