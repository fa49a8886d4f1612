"""The per-group 4-bit decode GEMVs (``schedules/cpu/int4_gemv.py``; on AVX-512 VNNI,
``schedules/cpu/int4_gemv_vnni_bytes.py`` for groups of up to 32 rows and
``schedules/cpu/int4_gemv_vnni.py`` for larger ones; on AVX2 without VNNI,
``schedules/cpu/int4_gemv_avx2.py`` for groups of up to 32 rows): which functions they take,
what their hot loops compile to, and their results against numpy."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import tvm
from mlc_edge.schedules.cpu import cpu_rules, int4_gemv_avx2
from mlc_edge.schedules.cpu.int4_gemv import Int4DecodeGEMV
from mlc_edge.schedules.cpu.int4_gemv_avx2 import Int4DecodeGEMVAVX2
from mlc_edge.schedules.cpu.int4_gemv_vnni import Int4DecodeGEMVVNNI, has_vnni
from mlc_edge.schedules.cpu.int4_gemv_vnni_bytes import (
    LANES,
    PREFETCH_STREAMS,
    PREFETCH_STRIPS,
    Int4DecodeGEMVVNNIBytes,
    prefetch_word,
    scales_ahead,
    strip_ahead,
)
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import spec
from tvm.s_tir import dlight as dl
from tvm.target.codegen import llvm_get_system_cpu, target_has_features

from mlc_edge.compiler.build import fuse_into_tir
from mlc_edge.quantization.int4 import (
    Int4KNLinear,
    Int4Layout,
    dequantize,
    quantize_rtn,
    tile_qweight,
    unpack_int4,
)


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


# The instruction checks compile (and do not run) for one named CPU, AMD's Zen 4 (AVX-512
# VNNI), where they were written: LLVM's tuning for another CPU changes what they count.
# For Intel's (rocketlake, icelake-server, sapphirerapids) it turns most of the 16-bit
# kernel's vpdpwssd into vpmaddwd + vpaddd and schedules the byte kernel's step so that a
# few registers are spilled (9-12 stores among its 128 vpdpbusd).
ASM_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
# AVX2 without AVX-512 (Intel's Haswell): what the AVX2 kernel's results are built for, which
# any AVX2 machine runs. Its instruction check compiles for AMD's Zen 3, where it was
# written and measured: with Haswell's tuning LLVM schedules the last pairs so that a few
# accumulators are stored.
AVX2_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
AVX2_ASM_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})


class _Layer(nn.Module):
    def __init__(self, k: int, n: int, group: int, dtype: str, tiles: bool = False):
        self.lin = Int4KNLinear(k, n, False, dtype, Int4Layout(group, tiles=tiles))

    def decode(self, x: nn.Tensor) -> nn.Tensor:
        return self.lin(x)

    prefill = batch = decode


KINDS = {"decode": [1, 1], "prefill": [1, "seq_len"], "batch": ["batch_size", 1]}


def _fused(k: int, n: int, group: int, dtype: str, tiles: bool = False) -> tvm.IRModule:
    model = _Layer(k, n, group, dtype, tiles)
    model.to(dtype)
    plain = {"param_mode": "plain", "effect_mode": "none"}
    mod, _ = model.export_tvm(
        spec={
            name: {"x": spec.Tensor([*lead, k], dtype), "$": plain} for name, lead in KINDS.items()
        }
    )
    return fuse_into_tir()(mod)


def _rules(integer: bool) -> list:
    """``cpu_rules()``, without the integer-dot-product GEMVs (VNNI, AVX2) unless
    ``integer`` (so the fp32-form rule is tested on fp16 too: CPUs without either run it)."""
    integer_rules = (Int4DecodeGEMVVNNI, Int4DecodeGEMVVNNIBytes, Int4DecodeGEMVAVX2)
    return [r for r in cpu_rules() if integer or not isinstance(r, integer_rules)]


def _decode_func(mod: tvm.IRModule) -> tirx.PrimFunc:
    """The fused 4-bit function of the decode kind (static shapes throughout)."""
    return next(
        f
        for f in _int4_funcs(mod).values()
        if all(isinstance(d, tirx.IntImm) for p in f.params for d in p.shape)
    )


def _int4_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {
        gv.name_hint: f
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and "dequantize_int4" in gv.name_hint
    }


def test_takes_the_one_row_gemv_only(target) -> None:
    """Only a function with one static activation row is rewritten; prefill and batch decode
    (a symbolic row count) are left to ``Int4Matmul``."""
    mod = _fused(256, 512, 32, "float16")
    taken = {}
    for name, func in _int4_funcs(mod).items():
        taken[name] = Int4DecodeGEMV().apply(func, target, False) is not None
    # One function per kind: the decode one has static shapes throughout.
    statics = [
        name
        for name, func in _int4_funcs(mod).items()
        if all(isinstance(d, tirx.IntImm) for p in func.params for d in p.shape)
    ]
    assert len(taken) == 3 and len(statics) == 1
    assert taken == {name: name in statics for name in taken}


@pytest.mark.parametrize(("k", "n"), [(512, 2048), (256, 8192)], ids=["short-rows", "long-rows"])
def test_hot_loop_masks_converts_and_fmas_whole_registers(k: int, n: int) -> None:
    """The per-row loop unpacks by mask alone: 16-lane ANDs, conversions (the unsigned one
    for the nibble holding bit 31) and FMAs; no variable shift is left in the function's
    hottest loop (the loop with the most FMAs), for short rows and long ones; the fp16
    scales are staged by shuffles."""
    mod = _fused(k, n, 32, "float16")
    sch = Int4DecodeGEMV().apply(_decode_func(mod), ASM_TARGET, False)
    func = sch.mod["main"].with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=ASM_TARGET)
    asm = lib.inspect_source("asm")
    # Split the assembly into basic blocks; the hot loop is the one with the most FMAs.
    blocks = re.split(r"\n\.LBB\d+_\d+:", asm)
    hot = max(blocks, key=lambda b: len(re.findall(r"\bvfmadd\w*ps\s[^\n]*%zmm", b)))
    fmas = len(re.findall(r"\bvfmadd\w*ps\s[^\n]*%zmm", hot))
    assert fmas >= 8, fmas  # the 8 nibbles of a row of words, at least
    assert re.search(r"\bvpandd?\s+[^\n]*%zmm", hot) or re.search(r"\bvandps\s+[^\n]*%zmm", hot)
    assert re.search(r"\bvcvtudq2ps\b", hot), "nibble 7 (bit 31) needs the unsigned convert"
    assert not re.search(r"\bvps[rl][la]v?d\b", hot), "a shift is left in the hot loop"
    # The scales of a strip are staged with whole loads and shuffles, not 16 scalar
    # loads and inserts a register.
    assert re.search(r"\bvpermt2w\b", asm), "the scales are gathered one by one"


CASES = [
    # (K, N, group, dtype): 16-word vectors split over the cores; group 128; fp32; a width
    # whose words do not fill a 16-lane register (40 words: 8 lanes); long rows (1024 words)
    # in both dtypes.
    (512, 2048, 32, "float16"),
    (256, 8192, 32, "float16"),
    (256, 8192, 128, "float32"),
    (1024, 1024, 128, "float16"),
    (256, 4096, 32, "float32"),
    (96, 320, 32, "float16"),
]


@pytest.mark.parametrize(
    ("k", "n", "group", "dtype"), CASES, ids=[f"K{k}_N{n}_g{g}-{d}" for k, n, g, d in CASES]
)
def test_matches_numpy_on_the_dequantized_weight(
    k: int, n: int, group: int, dtype: str, target
) -> None:
    """Built through ``cpu_rules()`` as the model is (the integer rules left out: they have
    their own tests): the decode result equals numpy's matmul with the dequantized weight
    (float64), to fp32 summation error (fp16: the output's rounding). Weights with every
    nibble value and zero points across 0..15."""
    run, x, stored = _build_and_inputs(k, n, group, dtype, target, integer=False)
    assert "group_part" in run.script, "the decode GEMV was not rewritten"
    w_deq = dequantize(stored["qweight"], stored["qzeros"], stored["scales"], group)
    ref = x.astype(np.float64) @ w_deq.astype(np.float64)
    out = run(x)
    err = np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= (1e-3 if dtype == "float16" else 2e-6), err


class _Built:
    """A compiled decode function and its weights: ``run(x)`` is its result in numpy."""

    def __init__(self, scheduled: tvm.IRModule, target, stored: dict[str, np.ndarray], tiles: bool):
        self.script = scheduled.script()
        ex = tvm.compile(
            scheduled, target=target, relax_pipeline=relax.get_pipeline("default_build")
        )
        self.vm = relax.VirtualMachine(ex, tvm.cpu())
        group = stored["qweight"].shape[0] // stored["qzeros"].shape[0]
        qweight = tile_qweight(stored["qweight"], group) if tiles else stored["qweight"]
        self.params = [
            tvm.runtime.tensor(a, tvm.cpu()) for a in (qweight, stored["qzeros"], stored["scales"])
        ]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.vm["decode"](tvm.runtime.tensor(x, tvm.cpu()), *self.params).numpy()


def _build_and_inputs(
    k: int, n: int, group: int, dtype: str, target, integer: bool, tiles: bool = False
) -> tuple[_Built, np.ndarray, dict[str, np.ndarray]]:
    """The decode GEMV built through the rules, an input row and the weights (in rows;
    passed to the kernel in CPU tiles with ``tiles``)."""
    mod = _fused(k, n, group, dtype, tiles)
    with target:
        scheduled = dl.ApplyDefaultSchedule(*_rules(integer))(mod)
    rng = np.random.default_rng(7)
    # A column offset per column makes the zero points range over 0..15.
    w = rng.standard_normal((k, n)) / np.sqrt(k) + rng.uniform(-0.05, 0.05, n)
    stored = quantize_rtn(w.astype(np.float32), group, dtype)
    assert len(np.unique(stored["qzeros"].view(np.uint32) & 0xF)) > 4
    x = rng.standard_normal((1, 1, k)).astype(dtype)
    return _Built(scheduled, target, stored, tiles), x, stored


_VNNI = has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()}))
needs_vnni = pytest.mark.skipif(not _VNNI, reason="this CPU has no AVX-512 VNNI")


def _rounded_activations(x: np.ndarray, group: int, level: int) -> tuple[np.ndarray, np.ndarray]:
    """A VNNI kernel's activations: per group of rows, ``round(x * level / m)`` and the
    factor ``m / level`` that undoes it (``m = max |x|`` of the group), in float64."""
    xg = x.reshape(-1, group).astype(np.float32)
    m = np.abs(xg).max(axis=1, keepdims=True)
    factor = np.where(m > 0, np.float32(level) / np.where(m > 0, m, 1), 0).astype(np.float32)
    a = np.round(xg * factor)  # half to even, as the kernels round (nearbyint)
    return a.reshape(-1).astype(np.float64), (m / np.float32(level)).astype(np.float64)


# (K, N, group, the kernel's dot product, its activation level): groups of up to 32 rows
# take int4_gemv_vnni_bytes.py (15 bits), larger ones int4_gemv_vnni.py (16 bits).
VNNI_CASES = [
    (512, 2048, 32, "vpdpbusd", 16383),
    (256, 8192, 32, "vpdpbusd", 16383),
    (128, 16896, 32, "vpdpbusd", 16383),  # groups over 256 KB: read in passes of 16 rows
    (2048, 256, 32, "vpdpbusd", 16383),
    (1024, 1024, 128, "vpdpwssd", 32767),
]


@needs_vnni
@pytest.mark.parametrize(
    ("k", "n", "group", "dot", "level"),
    VNNI_CASES,
    ids=[f"K{k}_N{n}_g{g}" for k, n, g, _, _ in VNNI_CASES],
)
def test_vnni_gemv_matches_its_rounding_and_stays_within_its_bound(
    k: int, n: int, group: int, dot: str, level: int, target
) -> None:
    """Built through ``cpu_rules()``, an fp16 decode GEMV is a VNNI kernel. Its result
    equals numpy's float64 computation of the same sum (activations rounded to integers
    under ``level`` per group, integer dot products, scale and zero point per group) to the
    fp16 output's rounding; and it differs from the exact product with the dequantized
    weight by no more than that rounding can: ``sum_k |w[k, n]| * m_g / (2 level)`` plus
    the output's rounding (``_check_integer_gemv``)."""
    run, x, stored = _build_and_inputs(k, n, group, "float16", target, integer=True)
    assert dot in run.script and "group_part" not in run.script
    _check_integer_gemv(run, x, stored, group, level)


def _check_integer_gemv(
    run: _Built, x: np.ndarray, stored: dict[str, np.ndarray], group: int, level: int
) -> None:
    """An integer-dot-product kernel's result equals numpy's float64 computation of the same
    sum (activations rounded under ``level`` per group, exact integer products, scale and
    zero point per group) to the fp16 output's rounding, and differs from the exact product
    by no more than that rounding can (a bound that int8 activations would break)."""
    q = unpack_int4(stored["qweight"]).astype(np.float64)
    z = np.repeat(unpack_int4(stored["qzeros"]).astype(np.float64), group, axis=0)
    s = np.repeat(stored["scales"].astype(np.float64), group, axis=0)
    a, unit = _rounded_activations(x, group, level)
    w = (q - z) * s
    simulated = (a * np.repeat(unit.reshape(-1), group)) @ w
    exact = x.reshape(-1).astype(np.float64) @ w
    out = run(x).reshape(-1).astype(np.float64)
    output_rounding = np.abs(simulated) * 2.0**-11 + 1e-7 * np.abs(simulated).max()
    assert np.all(np.abs(out - simulated) <= output_rounding), np.abs(out - simulated).max()
    bound = (np.repeat(unit.reshape(-1), group) / 2) @ np.abs(w)
    assert np.all(np.abs(out - exact) <= bound + output_rounding)
    # The bound is not vacuous: activations rounded to int8 instead (llama.cpp's Q8_0)
    # break it.
    xg = x.reshape(-1, group).astype(np.float64)
    m = np.abs(xg).max(axis=1, keepdims=True)
    int8 = (np.round(xg * 127 / m) * m / 127).reshape(-1)
    assert np.any(np.abs(int8 @ w - exact) > bound + output_rounding)


@needs_vnni
def test_vnni_gemv_leaves_fp32_other_widths_and_other_cpus_alone(target) -> None:
    """fp32 compute (the exact mode), a width whose words do not fill a register (40 words)
    and a CPU without VNNI (Skylake-AVX512) keep the fp32-form rule; groups of 128 rows go
    from the byte kernel to the 16-bit one."""
    bytes_rule, words_rule = Int4DecodeGEMVVNNIBytes(), Int4DecodeGEMVVNNI()
    skylake = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    for rule in (bytes_rule, words_rule):
        assert rule.apply(_decode_func(_fused(256, 2048, 32, "float16")), target, False)
        assert rule.apply(_decode_func(_fused(256, 2048, 32, "float32")), target, False) is None
        assert rule.apply(_decode_func(_fused(96, 320, 32, "float16")), target, False) is None
        assert rule.apply(_decode_func(_fused(256, 2048, 32, "float16")), skylake, False) is None
    g128 = _decode_func(_fused(256, 2048, 128, "float16"))
    assert bytes_rule.apply(g128, target, False) is None
    assert words_rule.apply(g128, target, False)


def test_vnni_hot_loop_is_dot_products_on_registers() -> None:
    """The loop with the most ``vpdpwssd`` holds the 8 nibbles of 4 row pairs (32) and
    stores only the 8 accumulators at its end: no accumulator or temporary goes through
    memory after each pair (what TVM's workspace allocation of a ``local`` buffer did)."""
    sch = Int4DecodeGEMVVNNI().apply(
        _decode_func(_fused(512, 2048, 128, "float16")), ASM_TARGET, False
    )
    func = sch.mod["main"].with_attr("global_symbol", "main")
    asm = tvm.tirx.build(tvm.IRModule({"main": func}), target=ASM_TARGET).inspect_source("asm")
    blocks = re.split(r"\n\.LBB\d+_\d+:", asm)
    hot = max(blocks, key=lambda b: len(re.findall(r"\bvpdpwssd\b", b)))
    assert len(re.findall(r"\bvpdpwssd\b", hot)) == 32
    stores = re.findall(r"\bvmov\w+\s+%zmm\d+, [^\n]*\(", hot)
    assert len(stores) <= 8, stores


def test_vnni_bytes_hot_loop_keeps_the_group_sums_in_registers() -> None:
    """The byte kernel's strip loop holds a whole group of 32 rows: 8 steps of 4 rows, each
    16 ``vpdpbusd`` into the 16 accumulators (128, once in the function: the rows are
    unrolled), with the 4 rows' prefetches. From the first ``vpdpbusd`` to the last, no
    zmm register is stored: the accumulators stay in registers. (With one 1 KB accumulator
    buffer instead of two, TVM allocates it from the workspace and LLVM stores all 16
    after every step.)"""
    sch = Int4DecodeGEMVVNNIBytes().apply(
        _decode_func(_fused(512, 2048, 32, "float16")), ASM_TARGET, False
    )
    func = sch.mod["main"].with_attr("global_symbol", "main")
    asm = tvm.tirx.build(tvm.IRModule({"main": func}), target=ASM_TARGET).inspect_source("asm")
    assert len(re.findall(r"\bvpdpbusd\b", asm)) == 128
    assert len(re.findall(r"\bprefetcht1\b", asm)) == 32
    dots = asm[asm.index("vpdpbusd") : asm.rindex("vpdpbusd")]
    stores = re.findall(r"\bvmov\w+\s+%zmm\d+, [^\n]*\(", dots)
    assert not stores, stores


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("strips", [1, 3, 16, 24, 128])
def test_vnni_bytes_prefetch_reads_the_next_group_once_in_forward_streams(
    size: int, strips: int
) -> None:
    """Where the next group's rows are read ahead whole, a group's strips prefetch every
    line (16 words) of them once, as ``PREFETCH_STREAMS`` streams, each running forward
    through consecutive lines; otherwise each prefetch is its row's words
    ``PREFETCH_STRIPS`` strips on, past the row's end the next group's same row."""
    words, k0 = strips * LANES, 5 * size
    issued = []  # flat word offsets in qweight, in the order the kernel prefetches them
    for s in range(strips):
        for step in range(size):
            row, col = prefetch_word(k0, s, step, size, strips, True)
            assert 0 <= col < words
            issued.append(row * words + col)
    next_group = (k0 + size) * words
    assert sorted(issued) == list(range(next_group, next_group + size * words, LANES))
    per = size // PREFETCH_STREAMS
    for j in range(PREFETCH_STREAMS):
        stream = [
            issued[s * size + step] for s in range(strips) for step in range(j * per, (j + 1) * per)
        ]
        assert stream == list(range(stream[0], stream[0] + LANES * len(stream), LANES))

    if strips < PREFETCH_STRIPS:
        return  # (rows read ahead one by one are wide: whole groups are read ahead here)
    for s in range(strips):
        for step in range(size):
            if s + PREFETCH_STRIPS < strips:
                expected = (k0 + step, (s + PREFETCH_STRIPS) * LANES)
            else:
                expected = (k0 + size + step, (s + PREFETCH_STRIPS - strips) * LANES)
            assert prefetch_word(k0, s, step, size, strips, False) == expected


@pytest.mark.parametrize("strips", [16, 24, 132])
def test_vnni_bytes_strip_ahead_is_where_wide_rows_read_ahead(strips: int) -> None:
    """``strip_ahead``: the strip ``PREFETCH_STRIPS`` on, past a row's end the next
    group's, which is where a wide group's rows prefetch their words."""
    size, k0 = 16, 3 * 16
    for s in range(strips):
        ahead = s + PREFETCH_STRIPS
        expected = (0, ahead) if ahead < strips else (1, ahead - strips)
        assert strip_ahead(s, strips) == expected
        for step in range(size):
            assert prefetch_word(k0, s, step, size, strips, False) == (
                k0 + size * expected[0] + step,
                expected[1] * LANES,
            )


@pytest.mark.parametrize("strips", [16, 24, 132])
def test_vnni_bytes_scales_ahead_are_those_of_the_rows_read_ahead(strips: int) -> None:
    """``scales_ahead``: for each pass of 16 rows of a 32-row group (or a 16-row group's
    one pass) and each strip, the group and strip whose words the strip's rows prefetch:
    the same group's while the next pass is in it, the next group's after the last."""
    for size in (16, 32):
        passes = size // 16
        for g in range(3):
            for p in range(passes):
                for s in range(strips):
                    row, col = prefetch_word(g * size + p * 16, s, 0, 16, strips, False)
                    assert scales_ahead(g, p, s, strips, passes) == (row // size, col // LANES)


def _prefetches(k: int, n: int, target: tvm.target.Target) -> dict[str, list[str]]:
    """The fp16 decode GEMV of a ``k x n`` weight (groups of 32 rows) scheduled by
    ``cpu_rules()`` for ``target``: the indices its prefetches read per buffer, its
    ``g_on``/``s_on`` lets and the guards on ``g_on``, from its TIR."""
    mod = _fused(k, n, 32, "float16")
    with target:
        mod = dl.ApplyDefaultSchedule(*_rules(integer=True))(mod)
    text = _decode_func(mod).script()
    calls = re.findall(r"llvm\.prefetch[^,]*, T\.address_of\((\w+)\[([^\]]*)\]\)", text)
    lets = re.findall(r"((?:g|s)_on): T\.let\[T\.int32\] = (.*)", text)
    found: dict[str, list[str]] = {"lets": [f"{name} = {value}" for name, value in lets]}
    found["guards"] = re.findall(r"if (g_on < .*):", text)
    for buf, index in calls:
        found.setdefault(buf, []).append(index)
    return found


def test_vnni_bytes_wide_groups_read_their_scales_and_zero_points_ahead_with_their_words() -> None:
    """Wide groups (an output layer's) prefetch, at each strip, the scales and zero points
    of ``scales_ahead``'s group and strip: those of the rows whose words the strip
    prefetches. Groups read ahead whole do not (their scales were not slower to read).
    Scheduled for a named VNNI CPU, so that any machine runs it."""

    wide = _prefetches(128, 132 * 128, ASM_TARGET)  # 32 rows of 66 KB: over 256 KB
    assert wide["scales"] == ["g_on, s_on * 128 + 32 * i"]
    assert wide["qzeros"] == ["g_on, s_on * 16"]
    assert wide["lets"] == [
        f"g_on = g + (p + (s + {PREFETCH_STRIPS}) // 132) // 2",  # 2 passes of 16 rows
        f"s_on = (s + {PREFETCH_STRIPS}) % 132",
    ]
    assert wide["guards"] == ["g_on < 4"]  # K / 32 groups: none past the last
    narrow = _prefetches(256, 16 * 128, ASM_TARGET)  # 32 rows of 1 KB: read ahead whole
    assert narrow["qweight"] and "scales" not in narrow and "qzeros" not in narrow


_AVX2 = target_has_features(
    "avx2", tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()})
)
needs_avx2 = pytest.mark.skipif(not _AVX2, reason="this CPU has no AVX2")

# (K, N, group): rows read ahead whole; 16 KB rows; groups over 256 KB (read ahead in
# chunks of strips, across groups); a tall one; groups of 16 rows and 40 words (5 strips:
# an odd count, rows not whole lines).
AVX2_CASES = [(512, 2048, 32), (256, 8192, 32), (128, 16896, 32), (2048, 256, 32), (192, 320, 16)]


@needs_avx2
@pytest.mark.parametrize("tiles", [False, True], ids=["rows", "tiles"])
@pytest.mark.parametrize(
    ("k", "n", "group"), AVX2_CASES, ids=[f"K{k}_N{n}_g{g}" for k, n, g in AVX2_CASES]
)
def test_avx2_gemv_matches_its_rounding_and_stays_within_its_bound(
    k: int, n: int, group: int, tiles: bool
) -> None:
    """Built through ``cpu_rules()`` for an AVX2 CPU without VNNI, an fp16 decode GEMV is
    the AVX2 kernel (``vpmaddwd``), with the byte kernel's 15-bit activations, reading
    ``qweight`` in rows or in CPU tiles; its result passes ``_check_integer_gemv``.
    (Planted: nibble 2 left unscaled, a strip's scales transposed into the wrong nibbles,
    or a tile's rows read in the wrong order, fail it.)"""
    run, x, stored = _build_and_inputs(
        k, n, group, "float16", AVX2_TARGET, integer=True, tiles=tiles
    )
    assert "llvm.x86.avx2.pmadd.wd" in run.script and "group_part" not in run.script
    _check_integer_gemv(run, x, stored, group, int4_gemv_avx2.LEVEL)


def test_avx2_gemv_takes_fp16_groups_of_up_to_32_rows_on_avx2_without_vnni() -> None:
    """The AVX2 rule takes an fp16 one-row GEMV with groups of 16 or 32 rows and whole
    8-word strips, on AVX2 without VNNI; fp32 compute, groups of 128 rows (``P`` would
    overflow), 12 words a row, a VNNI CPU (the byte kernel's) and a CPU without AVX2 are
    left to the other rules."""
    rule = Int4DecodeGEMVAVX2()
    nehalem = tvm.target.Target({"kind": "llvm", "mcpu": "nehalem", "num-cores": 2})
    fp16 = _decode_func(_fused(256, 2048, 32, "float16"))
    assert rule.apply(fp16, AVX2_TARGET, False)
    assert rule.apply(_decode_func(_fused(256, 2048, 16, "float16")), AVX2_TARGET, False)
    assert rule.apply(_decode_func(_fused(256, 2048, 32, "float32")), AVX2_TARGET, False) is None
    assert rule.apply(_decode_func(_fused(256, 2048, 128, "float16")), AVX2_TARGET, False) is None
    assert rule.apply(_decode_func(_fused(256, 96, 32, "float16")), AVX2_TARGET, False) is None
    assert rule.apply(fp16, ASM_TARGET, False) is None
    assert rule.apply(fp16, nehalem, False) is None


def test_avx2_hot_loop_keeps_the_group_sums_in_registers() -> None:
    """The AVX2 kernel's strip loop holds a whole group of 32 rows: 16 row pairs, each 8
    ``vpmaddwd`` into the 8 accumulators (128, once in the function), with one prefetch a
    pair; up to the last pair no ymm register is stored. The strip's scales are converted
    whole and transposed by shuffles (no element inserts)."""
    sch = Int4DecodeGEMVAVX2().apply(
        _decode_func(_fused(512, 2048, 32, "float16")), AVX2_ASM_TARGET, False
    )
    func = sch.mod["main"].with_attr("global_symbol", "main")
    asm = tvm.tirx.build(tvm.IRModule({"main": func}), target=AVX2_ASM_TARGET).inspect_source("asm")
    assert len(re.findall(r"\bvpmaddwd\b", asm)) == 128
    assert len(re.findall(r"\bprefetcht1\b", asm)) == 16
    # (LLVM starts the fold among the last pair's dot products: up to there)
    starts = [m.start() for m in re.finditer(r"\bvpmaddwd\b", asm)]
    dots = asm[starts[0] : starts[-8]]
    stores = re.findall(r"\bvmov\w+\s+%ymm\d+, [^\n]*\(", dots)
    assert not stores, stores
    assert len(re.findall(r"\bvcvtph2ps\b", asm)) >= 8
    # (fp16 elements inserted from memory; the library's own fp16 rounding helper inserts
    # one from a register)
    assert not re.search(r"\bvpinsrw\s+\$\d+, [^\n]*\(", asm), "the scales gathered one by one"


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("words", [8, 16, 40, 256, 2048])
def test_avx2_prefetch_reads_the_next_group_once_in_forward_streams(size: int, words: int) -> None:
    """Where the next group's rows are read ahead whole, a group's strips prefetch every
    line (16 words) of them once, in ``PREFETCH_STREAMS`` forward streams."""
    prefetch_word = int4_gemv_avx2.prefetch_word
    strips, pairs, k0 = words // 8, size // 2, 3 * size
    issued = []  # line offsets in qweight, in the order the kernel prefetches them
    for s in range(strips):
        for step in range(pairs):
            row, col = prefetch_word(k0, s, step, size, words, True)
            assert 0 <= col < words
            issued.append((row * words + col) // 16)
    first = (k0 + size) * words // 16
    assert sorted(issued) == list(range(first, first + size * words // 16))
    per = pairs // PREFETCH_STREAMS
    for j in range(PREFETCH_STREAMS):
        stream = [
            issued[s * pairs + step]
            for s in range(strips)
            for step in range(j * per, (j + 1) * per)
        ]
        assert stream == list(range(stream[0], stream[0] + len(stream)))


def test_avx2_prefetch_in_tiles_is_one_forward_stream() -> None:
    """In CPU tiles the weights are read in address order, so each step prefetches the line
    ``TILES_AHEAD_LINES`` past the row pair it reads (where a tile's pair is by the layout:
    ``((g * strips + s) * size + 2 i) * 8`` words), which makes the GEMV's prefetches one
    forward stream over every line once, none past the weights. Read from the TIR."""
    k, n, size = 256, 2048, 32
    words, groups = n // 8, k // size
    strips = words // 8
    mod = _fused(k, n, size, "float16", tiles=True)
    with AVX2_TARGET:
        mod = dl.ApplyDefaultSchedule(*_rules(integer=True))(mod)
    text = _decode_func(mod).script()
    ahead = re.search(r"ahead: T\.let\[T\.int32\] = (.*)", text).group(1)
    assert int(re.search(r"if ahead < (\d+):", text).group(1)) == k * words
    assert re.search(r"llvm\.prefetch[^,]*, T\.address_of\(q_flat\[0, ahead\]\)", text)
    steps = [(g, s, i) for g in range(groups) for s in range(strips) for i in range(size // 2)]
    issued = [eval(ahead, {}, {"g": g, "s": s, "i": i}) for g, s, i in steps]
    reads = [((g * strips + s) * size + 2 * i) * 8 for g, s, i in steps]
    lead = int4_gemv_avx2.TILES_AHEAD_LINES * 16
    assert [a - r for a, r in zip(issued, reads, strict=True)] == [lead] * len(steps)
    assert issued == list(range(lead, lead + 16 * len(steps), 16))


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize(("strips", "groups"), [(64, 3), (80, 2), (2004, 8)])
def test_avx2_wide_prefetch_reads_each_line_once_two_chunks_ahead(
    size: int, strips: int, groups: int
) -> None:
    """Wide rows: the strips, counted across groups, prefetch in chunks; the chunk's steps
    read every line (two strips) of every row of the chunk two on once (a chunk may span two
    groups, or end past the last row), each row's lines of it one after another."""
    chunk = int4_gemv_avx2.WIDE_CHUNK_STRIPS
    prefetch_word = int4_gemv_avx2.prefetch_word
    words, pairs = strips * 8, size // 2
    assert groups * strips % chunk == 0  # (a last partial chunk reads ahead a part)
    issued = []  # (row, strip) in the order the kernel prefetches them
    for g in range(groups):
        for s in range(strips):
            for step in range(pairs):
                row, col = prefetch_word(g * size, s, step, size, words, False)
                assert 0 <= col < words and col % 16 == 0
                issued.append((row, col // 8))
    ahead = [
        (row, strip)
        for at in range(2 * chunk, groups * strips + 2 * chunk, 2)  # two chunks on
        for row in range(size * (at // strips), size * (at // strips + 1))
        for strip in [at % strips]
    ]
    assert sorted(issued) == sorted(ahead)
    # the first chunk's first prefetches: the first row of each line two chunks on, in order
    assert issued[: chunk // 2] == [
        (size * (at // strips), at % strips) for at in range(2 * chunk, 3 * chunk, 2)
    ]


def test_avx2_wide_groups_read_their_scales_and_zero_points_ahead() -> None:
    """Wide groups (an output layer's) prefetch, at each strip, the scales (2 lines) and
    zero points of the strip ``SCALES_AHEAD_STRIPS`` on, past a row's end the next
    group's, none past the last group; groups read ahead whole do not."""
    ahead = int4_gemv_avx2.SCALES_AHEAD_STRIPS

    wide = _prefetches(128, 264 * 64, AVX2_TARGET)  # 32 rows of 66 KB: over 256 KB
    assert wide["scales"] == ["g_on, s_on * 64", "g_on, s_on * 64 + 32"]
    assert wide["qzeros"] == ["g_on, s_on * 8"]
    assert wide["lets"] == [f"g_on = g + (s + {ahead}) // 264", f"s_on = (s + {ahead}) % 264"]
    assert wide["guards"] == ["g_on < 4"]
    narrow = _prefetches(256, 16 * 128, AVX2_TARGET)  # 32 rows of 1 KB: read ahead whole
    assert narrow["qweight"] and "scales" not in narrow and "qzeros" not in narrow
