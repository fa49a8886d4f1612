"""Our paged-KV decode attention kernel (mlc_edge/models/decode_attention.py).

It runs on the OpenCL device (Intel's in real fp16 where installed, else PoCL with half
as float) against attention computed in float64 from the same fp16 inputs, the cache laid
out in shuffled pages with unused pages between: grouped-query attention of group 1, 2
and 4 (and 7), one and several sequences at once, context lengths below a page, a page
exactly, not a multiple of the page size and many tiles; the sliding-window variant with
an attention sink and a slid window; an empty sequence. ``verify --device intel`` of the
tiny model keeps it at the fp16 rounding of its output. Its signature is TVM's, the
model's KV cache is built with it on GPU targets, what it does not support is refused at
compile time, and a barrier removed from it is caught as a race. The CPU kernel
(``decode_attention_cpu``) runs here against the same float64 attention and is what a CPU
build holds.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from helpers import opencl_missing, run_verify_json
from test_oclgrind import needs_oclgrind
from test_verify_fp16 import _intel_missing
from tiny_models import make_llama
from tvm import IRModule, tirx
from tvm import relax as rx
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode, _attention_decode_cpu
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode
from tvm.target import Target

from mlc_edge.compiler.contract import PAGE_SIZE
from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.errors import UserError
from mlc_edge.models.decode_attention import (
    DECODE,
    DECODE_CPU,
    DECODE_CPU_SLIDING_WINDOW,
    DECODE_SLIDING_WINDOW,
    decode_attention,
    decode_attention_cpu,
    replace_decode_attention,
)
from mlc_edge.models.parameters import instantiate
from mlc_edge.verify import KernelChecker, OpenCLRunner, Sizes
from mlc_edge.verify.fp16 import FP16_UNIT_ROUNDOFF
from mlc_edge.verify.inputs import params_of
from mlc_edge.verify.kv_cache import DecodeRecipe
from mlc_edge.verify.lower import lower_for_device
from mlc_edge.verify.oclgrind import OclgrindHost, check_races

needs_opencl = pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))

# (KV heads, query heads, head_dim): the tiny test model (group 2), group 1, Llama-3.2-1B
# (group 4, 16 work-items a row), Qwen2.5-0.5B (group 7), head_dim 128 (8 values a
# work-item).
SHAPES = [(2, 4, 16), (4, 4, 16), (8, 32, 64), (2, 14, 64), (2, 4, 128)]


@pytest.fixture(scope="module")
def target() -> Target:
    return get_target("android-opencl").tvm_target()


@pytest.fixture(scope="module")
def runner() -> OpenCLRunner:
    return OpenCLRunner()


def _cache(kv_lens, kv_heads, head_dim, host_dtype, rng, slots=None):
    """Pages of every sequence, shuffled into one pool with unused pages between.
    ``slots[b]``: the cache slots a sequence uses (default: its length); returns the
    arrays the kernel takes (but Q) and each sequence's page ids."""
    slots = slots or kv_lens
    used = [-(-n // PAGE_SIZE) for n in slots]
    total = sum(used) + 3
    order = rng.permutation(total).astype("int32")
    ids, at = [], 0
    for n in used:
        ids.append(order[at : at + n])
        at += n
    pages = rng.standard_normal((total, 2, kv_heads, PAGE_SIZE, head_dim)).astype(host_dtype)
    arrays = {
        "pages": pages,
        "page_table_indptr": np.cumsum([0, *used]).astype("int32"),
        "page_table_values": np.concatenate([*ids, np.zeros(0, "int32")]).astype("int32"),
        "length_info": np.array(
            [n - (u - 1) * PAGE_SIZE if u else 0 for n, u in zip(slots, used, strict=True)], "int32"
        ),
        "k_rope_pos_offset": np.zeros(len(kv_lens), "int32"),
        "q_rope_position": np.array(kv_lens, "int32") - 1,
    }
    return arrays, ids


def _reference(q, pages, ids, kv_len, sm_scale, sink=0, offset=0):
    """Attention of one sequence in float64, token by token through TVM's token -> slot
    map (position p < sink: slot p; else slot p - sink + offset); lse in log2."""
    heads, d = q.shape
    kv_heads = pages.shape[2]
    group = heads // kv_heads
    slot_of = [p if p < sink else p - sink + offset for p in range(kv_len)]
    k = np.stack([pages[ids[s // PAGE_SIZE], 0, :, s % PAGE_SIZE] for s in slot_of], 1)
    v = np.stack([pages[ids[s // PAGE_SIZE], 1, :, s % PAGE_SIZE] for s in slot_of], 1)
    k, v = k.astype(np.float64), v.astype(np.float64)  # [kv_heads, tokens, d]
    q = q.astype(np.float64).reshape(kv_heads, group, d)
    s = np.einsum("hgd,htd->hgt", q, k) * sm_scale
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    o = np.einsum("hgt,htd->hgd", p / p.sum(-1, keepdims=True), v).reshape(heads, d)
    lse = (np.log(p.sum(-1)) + m[..., 0]).reshape(heads) / np.log(2)
    return o, lse


def _run(func, runner, target, arrays, q):
    symbol = str(func.attrs["global_symbol"])
    lowered = lower_for_device({symbol: func}, target)[symbol]
    batch, heads, d = q.shape
    arrays = {
        **arrays,
        "Q": q,
        "output": np.zeros_like(q),
        "lse": np.zeros((batch, heads), "float32"),
    }
    env = {
        "B": batch,
        "max_num_pages": arrays["pages"].shape[0],
        "nnz_pages": len(arrays["page_table_values"]),
        "rotary_mode": 0,
        "rope_scale": 1.0,
        "rope_theta": 1e4,
        "sm_scale": d**-0.5,
    }
    out, launches = runner.run(lowered, arrays, lowered.host_env(env), written=["output", "lse"])
    return out, launches


FP16_OUTPUT_TOLERANCE = 1.05 * FP16_UNIT_ROUNDOFF  # the fp16 output rounded once


def _assert_close(runner, out_o, out_lse, ref_o, ref_lse):
    # fp16 output: rounded once (fp32 accumulation stays far below); float: fp32 sums
    o_tol = 1e-5 if runner.as_float else FP16_OUTPUT_TOLERANCE
    _assert_within(o_tol, out_o, out_lse, ref_o, ref_lse)


def _assert_within(o_tol, out_o, out_lse, ref_o, ref_lse):
    o_err = np.abs(out_o.astype(np.float64) - ref_o).max() / np.abs(ref_o).max()
    lse_err = np.abs(out_lse - ref_lse).max() / max(np.abs(ref_lse).max(), 1.0)
    assert o_err <= o_tol and lse_err <= 1e-5, (o_err, lse_err)


@needs_opencl
@pytest.mark.parametrize(("kv_heads", "heads", "head_dim"), SHAPES)
@pytest.mark.parametrize("kv_lens", [(40, 16, 1, 100), (300,)])
def test_ours_is_attention_over_the_paged_cache(runner, target, kv_heads, heads, head_dim, kv_lens):
    rng = np.random.default_rng(sum(kv_lens) + heads)
    host = runner.host_dtype("float16")
    arrays, ids = _cache(kv_lens, kv_heads, head_dim, host, rng)
    q = rng.standard_normal((len(kv_lens), heads, head_dim)).astype(host)
    func = decode_attention(kv_heads, heads, head_dim, "float16", False, target)
    out, launches = _run(func, runner, target, arrays, q)
    for b, n in enumerate(kv_lens):
        ref_o, ref_lse = _reference(q[b], arrays["pages"], ids[b], n, head_dim**-0.5)
        _assert_close(runner, out["output"][b], out["lse"][b], ref_o, ref_lse)
    ((global_size, local_size),) = [launch for _, launch in launches]
    # one work-group per (sequence, KV head): K/V rows are read by one work-item set
    assert np.prod(local_size) <= 256
    assert [n // w for n, w in zip(global_size, local_size, strict=True)] == [
        len(kv_lens),
        kv_heads,
    ]


@needs_opencl
def test_the_sliding_window_variant_skips_slid_out_slots(runner, target):
    # sequence 0: 4 sink tokens, then the window from slot 21 to the end of 3 pages with
    # 10 tokens in the last (38 slots, 21 tokens); sequence 1: no sink, window from 5.
    kv_heads, heads, head_dim = 2, 8, 16
    slots, sinks, offsets = (42, 32), (4, 0), (21, 5)
    kv_lens = tuple(n - o + s for n, s, o in zip(slots, sinks, offsets, strict=True))
    rng = np.random.default_rng(1)
    host = runner.host_dtype("float16")
    arrays, ids = _cache(kv_lens, kv_heads, head_dim, host, rng, slots=slots)
    arrays["length_info"] = np.stack(
        [arrays["length_info"], np.array(offsets, "int32"), np.array(sinks, "int32")]
    )
    q = rng.standard_normal((2, heads, head_dim)).astype(host)
    func = decode_attention(kv_heads, heads, head_dim, "float16", True, target)
    out, _ = _run(func, runner, target, arrays, q)
    for b in range(2):
        ref_o, ref_lse = _reference(
            q[b], arrays["pages"], ids[b], kv_lens[b], head_dim**-0.5, sinks[b], offsets[b]
        )
        _assert_close(runner, out["output"][b], out["lse"][b], ref_o, ref_lse)


@needs_opencl
def test_an_empty_sequence_gives_tvms_values(runner, target):
    # TVM's kernel: o = 0 and lse = -5e4 for a sequence without pages (its initial state)
    rng = np.random.default_rng(2)
    host = runner.host_dtype("float16")
    arrays, ids = _cache((0, 20), 2, 16, host, rng)
    q = rng.standard_normal((2, 4, 16)).astype(host)
    out, _ = _run(decode_attention(2, 4, 16, "float16", False, target), runner, target, arrays, q)
    assert not out["output"][0].any() and (out["lse"][0] == -5e4).all()
    ref_o, ref_lse = _reference(q[1], arrays["pages"], ids[1], 20, 16**-0.5)
    _assert_close(runner, out["output"][1], out["lse"][1], ref_o, ref_lse)


@pytest.mark.parametrize("sliding_window", [False, True])
def test_the_signature_is_tvms(target, sliding_window):
    ours = decode_attention(8, 32, 64, "float16", sliding_window, target)
    stock = _attention_decode(8, 32, 64, "float16", sliding_window, {}, target)

    def signature(func: tirx.PrimFunc):
        # names, shapes and dtypes of the parameters, and where each buffer may start
        offsets = [str(getattr(p, "elem_offset", None)) for p in func.params]
        return [(p.name, str(p.shape), p.dtype) for p in params_of(func)], offsets

    assert signature(ours) == signature(stock)
    assert ours.attrs["global_symbol"] == stock.attrs["global_symbol"]


def _run_cpu(func: tirx.PrimFunc, arrays: dict[str, np.ndarray], q: np.ndarray):
    """``func`` built for this CPU and called as the runtime calls it (rope already
    applied: rotary_mode 0); (output, lse)."""
    target = Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    symbol = str(func.attrs["global_symbol"])
    lib = tvm.tirx.build(IRModule({symbol: func}), target=target)
    dev = tvm.cpu()
    names = [
        "pages",
        "page_table_indptr",
        "page_table_values",
        "length_info",
        "k_rope_pos_offset",
        "q_rope_position",
    ]
    output = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], "float32"), dev)
    args = [tvm.runtime.tensor(q, dev), *(tvm.runtime.tensor(arrays[n], dev) for n in names)]
    lib[symbol](*args, output, lse, 0, 1.0, 1e4, q.shape[-1] ** -0.5)
    return output.numpy(), lse.numpy()


@pytest.mark.parametrize(("kv_heads", "heads", "head_dim"), [*SHAPES, (1, 3, 24)])
@pytest.mark.parametrize("kv_lens", [(40, 16, 1, 100), (300,), (0, 20)])
def test_the_cpu_kernel_is_attention_over_the_paged_cache(kv_heads, heads, head_dim, kv_lens):
    # every shape above, and head_dim 24 (vectors of 8); an empty sequence gives TVM's
    # values: o = 0, lse = -5e4
    rng = np.random.default_rng(sum(kv_lens) + heads)
    arrays, ids = _cache(kv_lens, kv_heads, head_dim, "float16", rng)
    q = rng.standard_normal((len(kv_lens), heads, head_dim)).astype("float16")
    func = decode_attention_cpu(kv_heads, heads, head_dim, "float16", False)
    out, lse = _run_cpu(func, arrays, q)
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert not out[b].any() and (lse[b] == -5e4).all()
            continue
        ref_o, ref_lse = _reference(q[b], arrays["pages"], ids[b], n, head_dim**-0.5)
        _assert_within(FP16_OUTPUT_TOLERANCE, out[b], lse[b], ref_o, ref_lse)


def test_the_cpu_sliding_window_variant_skips_slid_out_slots():
    # as the GPU test above: a sink and a slid window, and no sink
    kv_heads, heads, head_dim = 2, 8, 16
    slots, sinks, offsets = (42, 32), (4, 0), (21, 5)
    kv_lens = tuple(n - o + s for n, s, o in zip(slots, sinks, offsets, strict=True))
    rng = np.random.default_rng(1)
    arrays, ids = _cache(kv_lens, kv_heads, head_dim, "float16", rng, slots=slots)
    arrays["length_info"] = np.stack(
        [arrays["length_info"], np.array(offsets, "int32"), np.array(sinks, "int32")]
    )
    q = rng.standard_normal((2, heads, head_dim)).astype("float16")
    out, lse = _run_cpu(decode_attention_cpu(kv_heads, heads, head_dim, "float16", True), arrays, q)
    for b in range(2):
        ref_o, ref_lse = _reference(
            q[b], arrays["pages"], ids[b], kv_lens[b], head_dim**-0.5, sinks[b], offsets[b]
        )
        _assert_within(FP16_OUTPUT_TOLERANCE, out[b], lse[b], ref_o, ref_lse)


@pytest.mark.parametrize("sliding_window", [False, True])
def test_the_cpu_kernel_has_tvms_cpu_signature(sliding_window):
    ours = decode_attention_cpu(8, 32, 64, "float16", sliding_window)
    stock = _attention_decode_cpu(8, 32, 64, "float16", sliding_window, {})
    offsets = [[str(getattr(p, "elem_offset", None)) for p in f.params] for f in (ours, stock)]
    assert [(p.name, str(p.shape), p.dtype) for p in params_of(ours)] == [
        (p.name, str(p.shape), p.dtype) for p in params_of(stock)
    ]
    assert offsets[0] == offsets[1]
    assert ours.attrs["global_symbol"] == stock.attrs["global_symbol"]


def _tiny_module(tmp_path, target_name: str):
    make_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    spec = ModelSpec.create(config, "q0f16t", load_preset(get_target(target_name).default_preset))
    target = get_target(target_name).tvm_target()
    model = instantiate(spec, target)
    mod, _, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    return mod, model.kv_cache_shape(), target


def _kernels_by_symbol(mod: IRModule) -> dict[str, tirx.PrimFunc]:
    return {
        str(f.attrs["global_symbol"]): f
        for _, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and f.attrs and "global_symbol" in f.attrs
    }


def test_the_model_builds_its_kv_cache_with_our_kernels(tmp_path):
    mod, kv, target = _tiny_module(tmp_path, "android-opencl")
    funcs = _kernels_by_symbol(mod)
    for symbol, sliding in ((DECODE, False), (DECODE_SLIDING_WINDOW, True)):
        ours = decode_attention(
            kv.num_key_value_heads, kv.num_attention_heads, kv.head_dim, "float16", sliding, target
        )
        assert tvm_ffi.structural_equal(funcs[symbol], ours), symbol


def test_a_cpu_build_gets_our_cpu_kernels(tmp_path):
    mod, kv, _ = _tiny_module(tmp_path, "cpu")
    funcs = _kernels_by_symbol(mod)
    assert DECODE not in funcs
    for symbol, sliding in ((DECODE_CPU, False), (DECODE_CPU_SLIDING_WINDOW, True)):
        ours = decode_attention_cpu(
            kv.num_key_value_heads, kv.num_attention_heads, kv.head_dim, "float16", sliding
        )
        assert tvm_ffi.structural_equal(funcs[symbol], ours), symbol


def test_what_it_does_not_support_is_refused_at_compile_time(target):
    with pytest.raises(UserError, match="RoPE applied before the KV cache"):
        replace_decode_attention(rx.BlockBuilder(), 2, 4, 16, "float16", RopeMode.INLINE, target)
    small = Target({"kind": "opencl", "max_num_threads": 256, "max_shared_memory_per_block": 1024})
    with pytest.raises(UserError, match="no work-group layout for head_dim 128"):
        decode_attention(2, 16, 128, "float16", False, small)
    with pytest.raises(UserError, match="not a multiple"):
        decode_attention(3, 4, 16, "float16", False, target)


def _race_check(target, sources=None):
    func = decode_attention(2, 4, 16, "float16", False, target)
    checker = KernelChecker(
        IRModule({}),
        IRModule({DECODE: func}),
        target,
        Sizes(vocab_size=1, seq_lens=(1,)),
        runner=OclgrindHost(),
        recipes={DECODE: DecodeRecipe(False, 1e4)},
    )
    return checker, check_races(checker, ("races",), sources=sources)


@needs_oclgrind
def test_a_missing_barrier_is_caught_as_a_race(target):
    checker, clean = _race_check(target)
    assert clean.passed, "\n".join(clean.lines())
    kernel = f"{DECODE}_kernel"
    source = checker.lowered[DECODE].sources[kernel]
    # the barrier after step 4 (the softmax weights and rescale of every head)
    at = source.index("= scale_ptr[0];")
    barrier = re.compile(r"\n\s*barrier\(CLK_LOCAL_MEM_FENCE\);")
    m = barrier.search(source, at)
    planted = source[: m.start()] + source[m.end() :]
    _, report = _race_check(target, {kernel: planted})
    assert not report.passed
    messages = [m.message for case in report.failed for _, m in case.problems()]
    assert any("data race" in m for m in messages), messages


@pytest.mark.skipif(_intel_missing() is not None, reason=str(_intel_missing()))
def test_verify_of_the_tiny_model_in_real_fp16_is_at_the_rounding_floor(tmp_path, capsys):
    # mlc-edge verify --device intel: the kernels in fp16 against the CPU's (our CPU
    # kernel) in fp32 from the same inputs; ours rounds once, its output
    make_llama(tmp_path / "hf")
    code, report = run_verify_json(
        capsys,
        str(tmp_path / "hf"),
        "--device",
        "intel",
        "--num-hidden-layers",
        "1",
        "--only",
        "batch_decode_paged_kv",
    )
    assert code == 0 and report["passed"] and not report["fp16_as_float"]
    results = report["results"]
    assert {r["function"] for r in results} == {DECODE, DECODE_SLIDING_WINDOW}
    for r in results:
        assert r["max_rel_error"] <= 1.05 * FP16_UNIT_ROUNDOFF, r
