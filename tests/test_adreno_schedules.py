"""Our Adreno schedule rules for ``[K, N]`` weights: decode GEMV and prefill matmul.

Every scheduled kernel runs on this machine's OpenCL device (PoCL: fp16 as float) and is
compared with the unscheduled function compiled for the CPU (``mlc_edge.verify``), for
odd sizes, fused epilogues and chunks of 1, 7, 16 (and 20: two passes) tokens. The
structure is checked too: our rules (not TVM's) scheduled the linear layers, their
accumulators are fp32 for fp16 weights, and the tunables come from the GPU's JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tvm
import tvm_ffi
from mlc_edge.schedules.adreno import (
    SCHEDULE_ANNOTATION,
    AdrenoTuning,
    GemvKN,
    GemvNK,
    PrefillMatmulKN,
    adreno_rules,
    stock_rules,
)
from mlc_edge.schedules.kn_pattern import find_kn_matmul
from tiny_models import make_llama
from tvm import IRModule, s_tir, te, tirx
from tvm.s_tir import dlight as dl

from mlc_edge.compiler.build import scheduled_module
from mlc_edge.compiler.passes.require_kernels import kernel_regions
from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.config.devices import DeviceLimits
from mlc_edge.verify import KernelChecker, OpenCLRunner, Sizes, model_checker

GEMV = "adreno.gemv_kn"
PREFILL = "adreno.prefill_matmul_kn"
GEMV_NK = "adreno.gemv_nk"


def _opencl_device() -> str | None:
    try:
        import pyopencl as cl

        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except Exception as e:  # noqa: BLE001 - no ICD loader, no platform
        return f"no OpenCL: {e}"
    return None if devices else "no OpenCL device"


needs_opencl = pytest.mark.skipif(_opencl_device() is not None, reason=_opencl_device() or "")


def kn_matmul(
    rows: str | int, k: int, n: int, epilogue: str | None = None, dtype: str = "float16"
) -> tirx.PrimFunc:
    """``x[b, s, K] @ weight[K, N]`` (+ an epilogue), as LegalizeOps + FuseTIR make it.

    ``rows``: ``"seq_len"`` (prefill chunk), ``"batch_size"`` (batch decode: one token
    per sequence) or 1 (decode).
    """
    i64 = "int64"
    var = tirx.Var(rows, i64) if isinstance(rows, str) else tirx.IntImm(i64, rows)
    one = tirx.IntImm(i64, 1)
    lead = (var, one) if rows == "batch_size" else (one, var)
    k, n = tirx.IntImm(i64, k), tirx.IntImm(i64, n)  # int64 sizes, as Relax makes them
    x = te.placeholder((*lead, k), dtype, name="x")
    w = te.placeholder((k, n), dtype, name="weight")
    r = te.reduce_axis((tirx.IntImm(i64, 0), k), name="k")
    mm = te.compute((*lead, n), lambda b, i, j: te.sum(x[b, i, r] * w[r, j], axis=r), name="matmul")
    args = [x, w]
    if epilogue == "add":  # the residual
        res = te.placeholder((*lead, n), dtype, name="residual")
        out = te.compute((*lead, n), lambda *i: mm(*i) + res(*i), name="T_add")
        args.append(res)
    elif epilogue == "silu_mul":  # SiLU(gate) * up
        up = te.placeholder((*lead, n), dtype, name="up")
        out = te.compute(
            (*lead, n), lambda *i: mm(*i) * te.sigmoid(mm(*i)) * up(*i), name="T_silu_mul"
        )
        args.append(up)
    elif epilogue == "cast":  # the output layer's fp32 logits
        out = te.compute((*lead, n), lambda *i: mm(*i).astype("float32"), name="compute")
    else:
        out = mm
    func = te.create_prim_func([*args, out]).with_attr("tirx.noalias", True)
    return func.with_attr("global_symbol", "f")


def nt_matmul(rows: str | int, k: int, n: int, dtype: str = "float16") -> tirx.PrimFunc:
    """The tied output layer: ``x[.., K] @ weight[N, K]^T`` cast to fp32 logits, as
    LegalizeOps + FuseTIR make it. ``rows``: ``"batch_size"`` (batch decode's
    ``[b, 1, K]``), ``"batch_prefill"`` (``[1, b, K]``: the last token of each sequence),
    1 (decode), or ``"seq_len"`` (a chunk's tokens: not a GEMV)."""
    i64 = "int64"
    one = tirx.IntImm(i64, 1)
    if rows == "batch_prefill":
        lead = (one, tirx.Var("batch_size", i64))
    elif isinstance(rows, str):
        var = tirx.Var(rows, i64)
        lead = (var, one) if rows == "batch_size" else (one, var)
    else:
        lead = (one, tirx.IntImm(i64, rows))
    k, n = tirx.IntImm(i64, k), tirx.IntImm(i64, n)
    x = te.placeholder((*lead, k), dtype, name="x")
    w = te.placeholder((n, k), dtype, name="weight")
    r = te.reduce_axis((tirx.IntImm(i64, 0), k), name="k")
    mm = te.compute(
        (*lead, n), lambda b, i, j: te.sum(x[b, i, r] * w[j, r], axis=r), name="NT_matmul"
    )
    out = te.compute((*lead, n), lambda *i: mm(*i).astype("float32"), name="compute")
    func = te.create_prim_func([x, w, out]).with_attr("tirx.noalias", True)
    return func.with_attr("global_symbol", "f")


def annotations(func: tirx.PrimFunc) -> list[str]:
    """The rule names our rules left on the blocks they scheduled."""
    found: list[str] = []

    def on_block(block: s_tir.SBlock) -> None:
        if SCHEDULE_ANNOTATION in block.annotations:
            found.append(str(block.annotations[SCHEDULE_ANNOTATION]))

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return found


def accumulator_dtypes(func: tirx.PrimFunc) -> set[str]:
    """dtypes of the buffers our annotated blocks accumulate into."""
    dtypes: set[str] = set()

    def on_block(block: s_tir.SBlock) -> None:
        if SCHEDULE_ANNOTATION in block.annotations:
            dtypes.add(str(block.body.buffer.dtype))  # acc[...] = acc[...] + ...

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return dtypes


def schedule(func: tirx.PrimFunc, rules: list) -> IRModule:
    target = get_target("android-opencl").tvm_target()
    with target:
        return dl.ApplyDefaultSchedule(*rules)(IRModule({"f": func}))


@pytest.fixture(scope="module")
def runner() -> OpenCLRunner:
    return OpenCLRunner()


def check(
    func: tirx.PrimFunc,
    runner: OpenCLRunner,
    rules: list | None = None,
    seq_lens: tuple[int, ...] = (1, 7, 16),
):
    """Schedule ``func``, run it for each size on OpenCL, compare with the CPU."""
    unscheduled = IRModule({"f": func})
    scheduled = schedule(func, rules or adreno_rules())
    checker = KernelChecker(
        unscheduled,
        scheduled,
        get_target("android-opencl").tvm_target(),
        Sizes(vocab_size=1, seq_lens=seq_lens, batch_size=3),
        runner=runner,
    )
    return scheduled["f"], checker, checker.check("f")


# -- the kernels compute what the unscheduled functions compute -----------------------------


@needs_opencl
@pytest.mark.parametrize(
    "k,n,epilogue",
    [
        (256, 384, None),
        (96, 100, "add"),  # N: 25 vectors of 4, a partial tile of threads
        (37, 75, "silu_mul"),  # odd K and N: vectors of 1, K not split
        (160, 384, "cast"),  # fp32 output (the logits)
        (4864, 64, None),  # a long reduction (Qwen2.5-1.5B's intermediate size)
    ],
)
def test_decode_gemv_matches_the_cpu(runner, k, n, epilogue):
    func, checker, results = check(kn_matmul(1, k, n, epilogue), runner)
    assert annotations(func) == [GEMV]
    assert all(r.passed for r in results), results
    # One kernel: the epilogue stays fused.
    assert checker.kernels("f") == ["f_kernel"]


@needs_opencl
@pytest.mark.parametrize("epilogue", [None, "add"])
def test_batch_decode_gemv_matches_the_cpu(runner, epilogue):
    func, checker, results = check(kn_matmul("batch_size", 64, 96, epilogue), runner)
    assert annotations(func) == [GEMV]
    assert results and all(r.passed for r in results), results
    (launch,) = checker.launches("f", checker.prepare("f", {"batch_size": 3}))
    assert launch.global_size[1] == 3  # one row of work-groups per sequence


@needs_opencl
@pytest.mark.parametrize(
    "k,n,epilogue",
    [
        (64, 160, "silu_mul"),
        (37, 75, "add"),  # odd K and N
        (160, 384, "cast"),
        (100, 96, None),
    ],
)
def test_prefill_matmul_matches_the_cpu(runner, k, n, epilogue):
    func, checker, results = check(
        kn_matmul("seq_len", k, n, epilogue), runner, seq_lens=(1, 7, 16, 20)
    )
    assert annotations(func) == [PREFILL]
    assert [r.sizes["seq_len"] for r in results] == [1, 7, 16, 20]
    assert all(r.passed for r in results), results
    # One kernel, no padded copy of the activations first (the stock matmul makes one).
    assert checker.kernels("f") == ["f_kernel"]


@needs_opencl
def test_a_broken_launch_of_our_kernels_is_caught(runner):
    """The comparison can fail: half the work-groups leave columns unwritten."""
    for rows in (1, "seq_len"):
        _, checker, _ = check(kn_matmul(rows, 64, 512), runner, seq_lens=(16,))

        def halve(kernel, launch):
            global_size, local_size = launch
            return ((global_size[0] // 2, *global_size[1:]), local_size)

        (result,) = checker.check("f", hook=halve)
        assert not result.passed, rows


@needs_opencl
@pytest.mark.parametrize(
    "rows,k,n",
    [
        ("batch_size", 2048, 300),  # batch decode's lm_head; N not a multiple of 32 rows
        ("batch_prefill", 96, 75),  # batch prefill's [1, b, K]; odd N
        (1, 37, 40),  # decode; odd K: vectors of 1, K not split
        ("batch_size", 8192, 64),  # a long reduction
    ],
)
def test_tied_lm_head_gemv_matches_the_cpu(runner, rows, k, n):
    func, checker, results = check(nt_matmul(rows, k, n), runner, seq_lens=(1,))
    assert annotations(func) == [GEMV_NK]
    for result in results:
        assert result.passed, (result.sizes, result.max_rel_error, result.error)
    assert accumulator_dtypes(func) == {"float32"}


def test_a_chunk_of_tokens_is_not_the_nk_gemv():
    """A prefill chunk's rows are tokens: a matmul's, not a GEMV's (the weight would be
    read once per token)."""
    func = schedule(nt_matmul("seq_len", 256, 128), adreno_rules())["f"]
    assert GEMV_NK not in annotations(func)


def shared_buffers(func: tirx.PrimFunc) -> dict[str, list[str]]:
    """The local-memory ("shared") buffers the schedule allocates: name -> shape (before
    lowering compacts them to what one work-group uses)."""
    found: dict[str, list[str]] = {}

    def on_block(block: s_tir.SBlock) -> None:
        for buf in block.alloc_buffers:
            if buf.scope() == "shared":
                found[buf.name] = [
                    str(d) if isinstance(d, tirx.Var) else str(int(d)) for d in buf.shape
                ]

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return found


@pytest.mark.parametrize("k,staged", [(4096, True), (8192, False)])
def test_the_nk_gemv_stages_the_activation_row_in_local_memory(k, staged):
    """The activation row is copied once per work-group to local memory (read by all its
    weight rows from there: tests/test_traffic.py measures the bytes); a row that would
    not fit in the target's local memory (TVM's OpenCL target: 16 KiB) with the partial
    sums stays in global memory."""
    func = schedule(nt_matmul("batch_size", k, 64), adreno_rules())["f"]
    assert annotations(func) == [GEMV_NK]
    rows = [shape for name, shape in shared_buffers(func).items() if name.startswith("x")]
    assert rows == ([["batch_size", "1", str(k)]] if staged else []), shared_buffers(func)


def test_the_devices_local_memory_bounds_the_staged_row():
    """A GPU whose description gives a work-group 8 KiB of local memory (less than the
    target's 16 KiB) keeps a 4096-half row (8 KiB, plus the partial sums) in global memory."""
    small = DeviceLimits.load("default").replace(local_mem_bytes=8 * 1024)
    func = schedule(nt_matmul("batch_size", 4096, 64), [GemvNK(AdrenoTuning.for_device(small))])
    assert annotations(func["f"]) == [GEMV_NK]
    assert not [name for name in shared_buffers(func["f"]) if name.startswith("x")]
    func = schedule(nt_matmul("batch_size", 2048, 64), [GemvNK(AdrenoTuning.for_device(small))])
    assert [name for name in shared_buffers(func["f"]) if name.startswith("x")]


@needs_opencl
def test_a_broken_launch_of_the_nk_gemv_is_caught(runner):
    _, checker, _ = check(nt_matmul("batch_size", 512, 256), runner, seq_lens=(1,))

    def halve(kernel, launch):
        global_size, local_size = launch
        return ((global_size[0] // 2, *global_size[1:]), local_size)

    for result in checker.check("f", hook=halve):
        assert not result.passed


# -- structure: fp32 accumulation, our rules on the model's linear layers --------------------


@pytest.mark.parametrize("rows", [1, "seq_len"])
def test_fp16_accumulates_in_fp32(rows):
    ours = schedule(kn_matmul(rows, 4864, 256, "add"), adreno_rules())["f"]
    assert accumulator_dtypes(ours) == {"float32"}
    # the stock rules keep fp16 accumulators (what made ~2% errors at K = 4864)
    stock = schedule(kn_matmul(rows, 4864, 256, "add"), stock_rules())["f"]
    assert not annotations(stock)
    assert "float32" not in stock.script()
    # ... and the kernel's source: float accumulators, half only at the edges
    target = get_target("android-opencl").tvm_target()
    src = tvm.tirx.build(IRModule({"f": ours}), target=target).imports[0].inspect_source()
    assert re.search(r"\bfloat\d*\s+\w*local\w*\[", src), src[:2000]
    assert "convert_half" in src


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> ModelSpec:
    root = tmp_path_factory.mktemp("adreno")
    make_llama(root / "hf")
    config = json.loads((root / "hf" / "config.json").read_text())
    return ModelSpec.create(config, "q0f16t", load_preset("edge-512"))


def test_our_rules_schedule_every_linear_layer_of_the_model(tiny_spec):
    """The module ``mlc-edge compile --target android-opencl`` builds: every KN matmul
    (q/k/v, o, gate/up, down, the output layer; decode, prefill, batch) is ours."""
    unscheduled, scheduled = scheduled_module(tiny_spec, get_target("android-opencl"))
    linear = []
    for gv, func in unscheduled.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        if find_kn_matmul(s_tir.Schedule(func), weight_kn=True) is not None:
            linear.append(gv.name_hint)
    assert len(linear) >= 12, linear  # 4 projections (+ lm_head) x decode/prefill/batch
    for name in linear:
        (rule,) = annotations(scheduled[name])
        # One token per row ([1, 1, N], batch decode's [b, 1, N]): the GEMV; several
        # (prefill's [1, seq_len, N], batch prefill's logits [1, b, N]): the matmul.
        out = scheduled[name].params[-1].shape
        one_token = isinstance(out[-2], tirx.IntImm) and int(out[-2]) == 1
        assert rule == (GEMV if one_token else PREFILL), (name, out)
        assert accumulator_dtypes(scheduled[name]) == {"float32"}, name
    kinds = {annotations(scheduled[name])[0] for name in linear}
    assert kinds == {GEMV, PREFILL}


def test_the_tied_lm_head_is_ours_in_every_function(tmp_path):
    """Tied embeddings ([vocab, hidden] used as the lm_head): decode, prefill,
    batch_decode and batch_prefill's output layers get the NK GEMV, fp32 accumulation."""
    make_llama(tmp_path, tie_word_embeddings=True, num_hidden_layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    spec = ModelSpec.create(config, "q0f16t", load_preset("edge-512"))
    unscheduled, scheduled = scheduled_module(spec, get_target("android-opencl"))
    heads = [
        gv.name_hint
        for gv, f in unscheduled.functions_items()
        if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("fused_NT_matmul")
    ]
    assert len(heads) == 3, heads  # decode/prefill share one; batch_decode; batch_prefill
    for name in heads:
        assert annotations(scheduled[name]) == [GEMV_NK], name
        assert accumulator_dtypes(scheduled[name]) == {"float32"}, name


def test_the_tied_lm_head_is_ours_on_cuda_too():
    """Every GPU target: the CUDA build (TVM's stock rules otherwise) gets the NK GEMV
    for the output layer, fp32 accumulation; nvcc compiles it where it is installed."""
    from mlc_edge.schedules.cuda import cuda_rules

    from mlc_edge.compiler.cuda import cuda_build

    target = get_target("cuda")
    with target.tvm_target():
        mod = dl.ApplyDefaultSchedule(*cuda_rules())(
            IRModule({"f": nt_matmul("batch_size", 2048, 1000)})
        )
    assert annotations(mod["f"]) == [GEMV_NK]
    assert accumulator_dtypes(mod["f"]) == {"float32"}
    if target.build_problem() is None:
        with target.tvm_target(), cuda_build("sm_80"):
            lib = tvm.tirx.build(mod, target=target.tvm_target())
        assert len(lib.imports) == 1  # the kernels, compiled by nvcc (not run here)


@needs_opencl
def test_every_kernel_of_the_tiny_model_passes_with_our_rules(tiny_spec, runner):
    checker = model_checker(tiny_spec, get_target("android-opencl"), runner=runner)
    report = checker.check_all()
    assert report.passed, [(r.function, r.sizes, r.max_rel_error, r.error) for r in report.failed]
    ours = {name for name, f in checker.funcs.items() if annotations(f)}
    checked = set(report.checked_functions())
    assert ours and ours <= checked
    assert {r.sizes.get("seq_len") for r in report.results if r.function in ours} >= {1, 7, 16}


# -- tunables --------------------------------------------------------------------------------


def _work_group(func: tirx.PrimFunc) -> int:
    (region,) = kernel_regions(func).kernels
    return region.work_group_size()


ROOT = Path(__file__).parents[1]


def _default_tunables() -> dict:
    return json.loads((ROOT / "schedules" / "gpu" / "tuning.json").read_text())


def test_tunables_come_from_the_gpus_json():
    # The GPU's device description (its work-group cap) and the rule set's tunables (the
    # defaults: none is tuned for the Adreno 750 in schedules/adreno/tuning.json).
    path = ROOT / "configs" / "devices" / "adreno-750.json"
    assert (
        "adreno-750"
        not in json.loads((ROOT / "schedules" / "adreno" / "tuning.json").read_text())["gpus"]
    )
    data = {**json.loads(path.read_text()), "schedule": _default_tunables()}
    tuning = AdrenoTuning.load("adreno-750")
    assert tuning.gpu == "adreno-750"
    assert tuning.gemv.vector == data["schedule"]["gemv"]["vector"]
    assert tuning.prefill.rows == data["schedule"]["prefill"]["rows"]
    assert tuning.max_threads == min(data["schedule_threads"], data["max_work_group_size"])
    # the target passes its GPU's name
    rules = get_target("android-opencl:adreno-750").schedule_rules()
    assert isinstance(rules[0], GemvKN) and rules[0].tuning.gpu == "adreno-750"
    assert get_target("android-opencl").schedule_rules()[0].tuning.gpu == "default"


def test_an_unknown_gpu_gets_the_defaults():
    unknown = AdrenoTuning.load("adreno-999")
    assert unknown.gpu == "default"
    assert unknown == AdrenoTuning.load("default")


def test_other_tunables_give_another_schedule():
    default = DeviceLimits.load("default")
    func = kn_matmul(1, 512, 1024)
    base = AdrenoTuning.for_device(default, {})
    wide = AdrenoTuning.for_device(default, {"default": {"gemv": {"threads_n": 32}}})
    assert wide.gemv.vector == base.gemv.vector  # the other values: the defaults
    a = schedule(func, [GemvKN(base)])["f"]
    b = schedule(func, [GemvKN(wide)])["f"]
    assert _work_group(b) == 2 * _work_group(a)
    # the prefill rows and vector width change the register tile
    pre = kn_matmul("seq_len", 64, 256)
    p8 = AdrenoTuning.for_device(default, {"default": {"prefill": {"rows": 8, "vector": 2}}})
    s16 = schedule(pre, [PrefillMatmulKN(base)])["f"].script()
    s8 = schedule(pre, [PrefillMatmulKN(p8)])["f"].script()
    assert "// T.int64(16)" in s16 and "// T.int64(8)" in s8
    # work-groups stay within the GPU's limits
    small = AdrenoTuning.for_device(
        default.replace(schedule_threads=256, max_work_group_size=64), {}
    )
    assert _work_group(schedule(func, [GemvKN(small)])["f"]) <= 64
    assert _work_group(schedule(pre, [PrefillMatmulKN(small)])["f"]) <= 64


def test_bad_tunables_are_refused():
    with pytest.raises(ValueError, match="keep unrolling"):
        AdrenoTuning.from_dict("x", {"prefill": {"unroll_k": 64}})
    with pytest.raises(ValueError, match="unknown keys"):
        AdrenoTuning.from_dict("x", {"gemv": {"tile": 4}})
