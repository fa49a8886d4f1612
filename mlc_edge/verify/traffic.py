"""Bytes each kernel of a decode step and of a prefill chunk moves, counted on Oclgrind.

Decode at batch 1 is bound by memory bandwidth: a phone's tokens/s is at most its
bandwidth over the bytes one decode step loads and stores. Our plugin
(traffic_plugin/traffic.cpp) counts every global load and store of each kernel launch,
per argument, and the distinct bytes touched. The minimum of a kernel is what it would
move reading each byte it needs once (weights, activations and KV read once, outputs
written once): its distinct bytes. ``ratio`` = bytes loaded / distinct bytes loaded.

A step's kernels are those its Relax function (``batch_decode``, ``batch_prefill``: what
MLC's engine calls) launches, each counted as often as it is called, plus the paged KV
cache's kernels once per attention call (``KV_KERNELS``). A library compiled with fewer
layers (``--num-hidden-layers``) is scaled to the model's layer count: the calls from
the first to the last one that takes a layer's weight, and the KV kernels, repeat per
layer. fp16 buffers run as float on Oclgrind (no fp16): their bytes are halved back.
The tokens/s figures are predictions (bandwidth / bytes), not measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax

from ..compiler.targets import TARGETS
from .check import KernelChecker
from .inputs import NotChecked, Sizes
from .oclgrind import Job, make_job, plugin_path, run_jobs

if TYPE_CHECKING:
    from .model import VerifySource

# The paged KV cache's kernels run by one attention call (RoPE and append, then
# attention; a prefill chunk after a cached prefix attends to the chunk and to the
# prefix separately and merges the two).
KV_KERNELS = {
    "decode": ["fused_rope", "tir_kv_cache_transpose_append", "batch_decode_paged_kv"],
    "prefill": [
        "fused_rope",
        "tir_kv_cache_transpose_append",
        "batch_prefill_ragged_kv",
        "batch_prefill_paged_kv",
        "tir_attention_merge_state",
    ],
}
STEP_FUNCTIONS = {"decode": "batch_decode", "prefill": "batch_prefill"}
ATTENTION_CALL = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
COUNT_ONLY = {"OCLGRIND_DATA_RACES": "0", "OCLGRIND_UNINITIALIZED": "0"}
# A kernel loading more than this x its minimum is flagged (every kernel of a decode step,
# the linear layers of a prefill chunk): our GEMVs read each weight once and the activation
# once per 8 output columns (1.125x).
RATIO_LIMIT = 1.15


@dataclass
class BufferTraffic:
    name: str
    loaded: int
    stored: int
    min_loaded: int  # distinct bytes loaded
    min_stored: int
    workspace: bool = False  # a buffer the host code allocates between two kernels


@dataclass
class KernelTraffic:
    function: str
    kernel: str
    calls_in_layers: int  # per step of the compiled library, from its layers
    calls_other: int  # outside the layers
    linear: bool  # a linear layer (takes a 2-D weight)
    sizes: dict[str, int]
    buffers: list[BufferTraffic]

    @property
    def calls(self) -> int:
        return self.calls_in_layers + self.calls_other

    @property
    def loaded(self) -> int:
        return sum(b.loaded for b in self.buffers)

    @property
    def stored(self) -> int:
        return sum(b.stored for b in self.buffers)

    @property
    def min_loaded(self) -> int:
        return sum(b.min_loaded for b in self.buffers)

    @property
    def min_stored(self) -> int:
        return sum(b.min_stored for b in self.buffers)

    @property
    def ratio(self) -> float:
        return self.loaded / self.min_loaded if self.min_loaded else 1.0

    @property
    def needed(self) -> tuple[int, int]:
        """(loaded, stored) distinct bytes of the function's own buffers: what it must
        move; a workspace one kernel writes for the next is not needed."""
        own = [b for b in self.buffers if not b.workspace]
        return sum(b.min_loaded for b in own), sum(b.min_stored for b in own)

    def as_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "kernel": self.kernel,
            "calls": self.calls,
            "calls_in_layers": self.calls_in_layers,
            "linear": self.linear,
            "sizes": self.sizes,
            "bytes_loaded": self.loaded,
            "bytes_stored": self.stored,
            "minimum": self.min_loaded,
            "minimum_stored": self.min_stored,
            "ratio": round(self.ratio, 4),
            "buffers": [asdict(b) for b in self.buffers],
        }


@dataclass
class LayerTraffic:
    """A linear layer: the bytes its kernels load against its weight, activation (and
    residual) read once."""

    function: str
    kernels: list[KernelTraffic]

    @property
    def loaded(self) -> int:
        return sum(k.loaded for k in self.kernels)

    @property
    def minimum(self) -> int:
        return sum(k.needed[0] for k in self.kernels)

    @property
    def ratio(self) -> float:
        return self.loaded / self.minimum if self.minimum else 1.0

    @property
    def lm_head(self) -> bool:
        return all(k.calls_in_layers == 0 for k in self.kernels)

    def as_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "kernels": [k.kernel for k in self.kernels],
            "bytes_loaded": self.loaded,
            "minimum": self.minimum,
            "ratio": round(self.ratio, 4),
        }


@dataclass
class StepTraffic:
    step: str  # "decode" or "prefill"
    function: str  # the Relax function
    tokens: int
    kernels: list[KernelTraffic] = field(default_factory=list)
    not_counted: dict[str, str] = field(default_factory=dict)  # function -> why
    layers: int = 1  # of the compiled library
    model_layers: int = 1  # the model's: what the totals are scaled to

    def _scale(self, k: KernelTraffic) -> float:
        return k.calls_other + k.calls_in_layers * self.model_layers / self.layers

    def linear_layers(self) -> list[LayerTraffic]:
        """Each linear layer (a function taking a 2-D weight) with all its kernels: a
        stock schedule may pad the activation into a workspace first."""
        layers: dict[str, LayerTraffic] = {}
        for k in self.kernels:
            if k.linear:
                layers.setdefault(k.function, LayerTraffic(k.function, [])).kernels.append(k)
        return list(layers.values())

    def over_limit(self, limit: float = RATIO_LIMIT) -> list[LayerTraffic]:
        """Linear layers that load more than ``limit`` x their minimum."""
        return [layer for layer in self.linear_layers() if layer.ratio > limit]

    def kernels_over_limit(self, limit: float = RATIO_LIMIT) -> list[KernelTraffic]:
        """Kernels that load more than ``limit`` x their minimum: in a decode step every
        kernel counts (decode on a phone is bound by the bytes it moves); in a prefill
        chunk only the linear layers (``over_limit``) do, as attention there reads its
        tiles once per query block by design."""
        if self.step != "decode":
            return []
        return [k for k in self.kernels if k.ratio > limit]

    def total_bytes(self) -> float:
        """Bytes loaded and stored by one step of the whole model."""
        return sum(self._scale(k) * (k.loaded + k.stored) for k in self.kernels)

    def minimum_bytes(self) -> float:
        return sum(self._scale(k) * sum(k.needed) for k in self.kernels)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "function": self.function,
            "tokens": self.tokens,
            "layers_compiled": self.layers,
            "model_layers": self.model_layers,
            "bytes_per_step": round(self.total_bytes()),
            "minimum_per_step": round(self.minimum_bytes()),
            "ratio_limit": RATIO_LIMIT,
            "linear_layers": [layer.as_dict() for layer in self.linear_layers()],
            "linear_over_limit": [layer.function for layer in self.over_limit()],
            "kernels_over_limit": [k.kernel for k in self.kernels_over_limit()],
            "kernels": [k.as_dict() for k in self.kernels],
            "not_counted": self.not_counted,
        }


@dataclass
class TrafficReport:
    target: str
    steps: list[StepTraffic]
    source: str | None = None
    seconds: float = 0.0

    def predictions(self) -> list[dict[str, Any]]:
        """Decode tokens/s of the whole model on each Adreno: bandwidth / bytes a step."""
        decode = next((s for s in self.steps if s.step == "decode"), None)
        if decode is None or decode.total_bytes() == 0:
            return []
        rows = []
        for name, spec in TARGETS.items():
            if spec.limits is None or not name.startswith("android-opencl:"):
                continue
            bw = spec.limits.memory_bandwidth_gb_s
            rows.append(
                {
                    "gpu": spec.limits.name,
                    "soc": spec.limits.soc,
                    "bandwidth_gb_s": bw,
                    "predicted_decode_tok_s": round(bw * 1e9 / decode.total_bytes(), 2),
                    "ceiling_tok_s": round(bw * 1e9 / decode.minimum_bytes(), 2),
                }
            )
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "device": "Oclgrind",
            "steps": [s.as_dict() for s in self.steps],
            "predictions": self.predictions(),
            "prediction_note": PREDICTION_NOTE,
            "seconds": round(self.seconds, 1),
        }

    def lines(self) -> list[str]:
        out = [
            f"verify --traffic {self.source + ' ' if self.source else ''}for {self.target}"
            " (bytes counted on Oclgrind; fp16 bytes as on the phone)",
            "minimum: each byte a kernel needs read once (its distinct bytes); "
            "ratio = loaded / minimum",
        ]
        for s in self.steps:
            out.append(
                f"{s.function}: one {s.step} step of {s.tokens} token(s); "
                f"{s.layers} layer(s) compiled, scaled to {s.model_layers}; "
                + (
                    f"every kernel flagged above {RATIO_LIMIT}x"
                    if s.step == "decode"
                    else f"linear layers flagged above {RATIO_LIMIT}x"
                )
            )
            out.append(
                f"  {'kernel':<44} {'calls':>5} {'loaded':>12} {'minimum':>12} "
                f"{'ratio':>6} {'stored':>10}"
            )
            over = {layer.function for layer in s.over_limit()}
            over_kernels = {k.kernel for k in s.kernels_over_limit()}
            for k in s.kernels:
                flag = (
                    "  <- linear layer over the limit"
                    if k.function in over
                    else "  <- over the limit"
                    if k.kernel in over_kernels
                    else ""
                )
                out.append(
                    f"  {k.kernel:<44} {k.calls:>5} {k.loaded:>12,} {k.min_loaded:>12,} "
                    f"{k.ratio:>6.3f} {k.stored:>10,}{flag}"
                )
            for name, why in s.not_counted.items():
                out.append(f"  not counted: {name}: {why}")
            if s.over_limit():
                out.append(
                    f"  {len(s.over_limit())} linear layer(s) load more than "
                    f"{RATIO_LIMIT}x their minimum: "
                    + ", ".join(f"{x.function} ({x.ratio:.2f}x)" for x in s.over_limit())
                )
            others = [k for k in s.kernels_over_limit() if k.function not in over]
            if others:
                out.append(
                    f"  {len(others)} other kernel(s) of the decode step load more than "
                    f"{RATIO_LIMIT}x their minimum: "
                    + ", ".join(f"{k.kernel} ({k.ratio:.2f}x)" for k in others)
                )
            out.append(
                f"  whole model, one step: {s.total_bytes() / 1e6:,.2f} MB moved, "
                f"minimum {s.minimum_bytes() / 1e6:,.2f} MB "
                f"({s.total_bytes() / max(s.minimum_bytes(), 1):.3f}x)"
            )
        rows = self.predictions()
        if rows:
            out.append(f"predicted decode tokens/s (a prediction: {PREDICTION_NOTE})")
            for r in rows:
                out.append(
                    f"  {r['gpu']:<12} {r['soc']:<20} {r['bandwidth_gb_s']:>6g} GB/s  "
                    f"{r['predicted_decode_tok_s']:>8.2f} tok/s "
                    f"(ceiling {r['ceiling_tok_s']:.2f} at the minimum bytes)"
                )
        out.append(f"{self.seconds:.0f} s")
        return out


PREDICTION_NOTE = (
    "memory bandwidth / bytes of one decode step, as if every byte came "
    "from DRAM at full bandwidth and nothing else took time; not measured "
    "on a phone"
)


@dataclass
class StepCalls:
    """Which kernels one step of the compiled library calls, and how often."""

    in_layers: dict[str, int]  # calls from the first to the last layer's (per library)
    other: dict[str, int]  # calls before or after the layers (embedding, lm_head, ...)
    linear: set[str]  # the functions that take a 2-D weight: linear layers
    attention: int  # attention calls (each runs KV_KERNELS[step])

    def functions(self) -> list[str]:
        return list(dict.fromkeys([*self.in_layers, *self.other]))


def step_calls(module: Any, step: str) -> StepCalls:
    """The calls of the step's Relax function in ``module`` (the scheduled module)."""
    func = module[STEP_FUNCTIONS[step]]
    calls: list[tuple[str, bool]] = []  # (PrimFunc, takes a layer's weight)
    attention = 0
    weights: dict[str, int] = {}  # weight (a packed_params item) -> its rank
    linear: set[str] = set()
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem):
                weights[str(binding.var)] = int(getattr(binding.var.ty, "ndim", -1))
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                continue
            if value.op.name == "relax.call_tir":
                args = value.args[1].fields if isinstance(value.args[1], relax.Tuple) else []
                names = [str(a) for a in args]
                name = value.args[0].name_hint
                if any(weights.get(n) == 2 for n in names):
                    linear.add(name)
                calls.append((name, any(n in weights and "layers_" in n for n in names)))
            elif value.op.name == "relax.call_dps_packed" and ATTENTION_CALL in str(value.args[0]):
                attention += 1
    layer_at = [i for i, (_, takes) in enumerate(calls) if takes]
    result = StepCalls({}, {}, linear, attention)
    for i, (name, _) in enumerate(calls):
        table = (
            result.in_layers if layer_at and layer_at[0] <= i <= layer_at[-1] else (result.other)
        )
        table[name] = table.get(name, 0) + 1
    for name in KV_KERNELS[step]:
        result.in_layers[name] = result.in_layers.get(name, 0) + attention
    return result


def step_sizes(sizes: Sizes, step: str, chunk: int) -> Sizes:
    """One decode token (batch 1), or one full prefill chunk."""
    return Sizes(
        vocab_size=sizes.vocab_size,
        seq_lens=(1,) if step == "decode" else (chunk,),
        context_window_size=sizes.context_window_size,
    )


def parse_traffic(text: str) -> list[tuple[str, list[tuple[int, list[int]]], tuple[int, int]]]:
    """The plugin's blocks: (kernel, [(argument index, [loaded, stored, distinct loaded,
    distinct stored])], (loaded, stored) of buffers no argument names)."""
    launches = []
    kernel, args, other = None, [], (0, 0)
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "kernel":
            kernel, args, other = words[1], [], (0, 0)
        elif words[0] == "arg":
            args.append((int(words[1]), [int(w) for w in words[3:7]]))
        elif words[0] == "other":
            other = (int(words[1]), int(words[2]))
        elif words[0] == "end" and kernel is not None:
            launches.append((kernel, args, other))
            kernel = None
    return launches


def _kernel_traffic(job: Job, text: str, calls: StepCalls) -> list[KernelTraffic]:
    launches = parse_traffic(text)
    if len(launches) != len(job.kernels):
        raise RuntimeError(
            f"{job.function}: the traffic plugin reported {len(launches)} "
            f"launches for {len(job.kernels)} kernels"
        )
    result = []
    for spec, (kernel, args, other) in zip(job.payload["launches"], launches, strict=True):
        names = [value for kind, value in spec["args"] if kind == "buffer"]
        positions = [i for i, (kind, _) in enumerate(spec["args"]) if kind == "buffer"]
        by_index = dict(zip(positions, names, strict=True))
        buffers = []
        for index, counts in args:
            name = by_index.get(index, f"arg{index}")
            phone, here = job.element_bytes.get(name, (1, 1))
            buffers.append(
                BufferTraffic(
                    name,
                    *(c * phone // here for c in counts),
                    workspace=name in job.payload["workspaces"],
                )
            )
        if any(other):
            buffers.append(BufferTraffic("(other)", other[0], other[1], 0, 0))
        result.append(
            KernelTraffic(
                job.function,
                kernel,
                calls.in_layers.get(job.function, 0),
                calls.other.get(job.function, 0),
                job.function in calls.linear,
                job.sizes,
                buffers,
            )
        )
    return result


def measure_traffic(
    checker: KernelChecker,
    steps: tuple[str, ...] = ("decode", "prefill"),
    chunk: int = 16,
    model_layers: int | None = None,
    layers: int = 1,
    progress: Callable[[str], None] | None = None,
    sources: Mapping[str, str] | None = None,
) -> TrafficReport:
    """Bytes of each kernel of one step per ``steps``, run on Oclgrind with our plugin.

    ``layers``: the compiled library's layer count, ``model_layers`` the one the totals
    are scaled to; ``sources`` replaces kernels' program source by kernel name (tests
    plant faults this way).
    """
    start = time.perf_counter()
    plugin = plugin_path()
    report = TrafficReport(str(checker.target.kind.name), [])
    base_sizes = checker.sizes
    for step in steps:
        calls = step_calls(checker.module, step)
        tokens = 1 if step == "decode" else chunk
        result = StepTraffic(
            step, STEP_FUNCTIONS[step], tokens, layers=layers, model_layers=model_layers or layers
        )
        checker.sizes = step_sizes(base_sizes, step, chunk)
        jobs: list[Job] = []
        for name in calls.functions():
            if name not in checker.lowered:
                result.not_counted[name] = "not a kernel of this library"
                continue
            try:
                # the last case: the longest KV (decode) of the step's sizes
                case = checker.cases(name)[-1]
                jobs.append(make_job(checker, name, checker.prepare(name, case), sources))
            except NotChecked as e:
                result.not_counted[name] = str(e)

        def tell(i: int, job: Job, step: str = step, n: int = len(jobs)) -> None:
            if progress is not None:
                progress(f"[traffic {step} {i + 1}/{n}] {job.function}")

        outputs = run_jobs(jobs, COUNT_ONLY, plugin=plugin, progress=tell)
        for job, output in zip(jobs, outputs, strict=True):
            if output.error:
                result.not_counted[job.function] = f"failed on Oclgrind: {output.error}"
                continue
            result.kernels.extend(_kernel_traffic(job, output.traffic, calls))
        report.steps.append(result)
    checker.sizes = base_sizes
    report.seconds = time.perf_counter() - start
    return report


def traffic(
    source: VerifySource,
    model_layers: int | None = None,
    steps: tuple[str, ...] = ("decode", "prefill"),
    progress: Callable[[str], None] | None = None,
) -> TrafficReport:
    """``mlc-edge verify --traffic``: the bytes of one decode step and one prefill chunk
    of the model of ``source`` (a ``VerifySource``), scaled to ``model_layers``."""
    from ..compiler.targets import get_target
    from .model import default_sizes, model_checker
    from .oclgrind import OclgrindHost, find_oclgrind

    find_oclgrind()
    plugin_path()  # says now, in one line, when it cannot be built
    spec = source.spec
    checker = model_checker(
        spec, get_target(source.target_name), default_sizes(spec), OclgrindHost()
    )
    chunk = int(spec.runtime_sizes["prefill_chunk_size"])
    layers = int(spec.model_config["num_hidden_layers"])
    report = measure_traffic(checker, steps, chunk, model_layers or layers, layers, progress)
    report.target = source.target_name
    report.source = str(source.path)
    return report
