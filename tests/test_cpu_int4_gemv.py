"""The per-group 4-bit decode GEMV (``schedules/cpu/int4_gemv.py``): which functions it
takes, what its hot loop compiles to, and its results against numpy."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import tvm
from mlc_edge.schedules.cpu import cpu_rules
from mlc_edge.schedules.cpu.int4_gemv import Int4DecodeGEMV
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import spec
from tvm.s_tir import dlight as dl
from tvm.target.codegen import llvm_get_system_cpu, target_has_features

from mlc_edge.compiler.build import fuse_into_tir
from mlc_edge.quantization.int4 import Int4KNLinear, Int4Layout, dequantize, quantize_rtn


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


class _Layer(nn.Module):
    def __init__(self, k: int, n: int, group: int, dtype: str):
        self.lin = Int4KNLinear(k, n, False, dtype, Int4Layout(group))

    def decode(self, x: nn.Tensor) -> nn.Tensor:
        return self.lin(x)

    prefill = batch = decode


KINDS = {"decode": [1, 1], "prefill": [1, "seq_len"], "batch": ["batch_size", 1]}


def _fused(k: int, n: int, group: int, dtype: str) -> tvm.IRModule:
    model = _Layer(k, n, group, dtype)
    model.to(dtype)
    plain = {"param_mode": "plain", "effect_mode": "none"}
    mod, _ = model.export_tvm(
        spec={
            name: {"x": spec.Tensor([*lead, k], dtype), "$": plain} for name, lead in KINDS.items()
        }
    )
    return fuse_into_tir()(mod)


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


@pytest.mark.skipif(
    not target_has_features(
        "avx512f", tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()})
    ),
    reason="the instruction check is written for AVX-512",
)
@pytest.mark.parametrize(("k", "n"), [(512, 2048), (256, 8192)], ids=["short-rows", "long-rows"])
def test_hot_loop_masks_converts_and_fmas_whole_registers(k: int, n: int, target) -> None:
    """The per-row loop unpacks by mask alone: 16-lane ANDs, conversions (the unsigned one
    for the nibble holding bit 31) and FMAs; no variable shift is left in the function's
    hottest loop (the loop with the most FMAs), for short rows and long ones; the fp16
    scales are staged by shuffles."""
    mod = _fused(k, n, 32, "float16")
    decode = next(
        f
        for f in _int4_funcs(mod).values()
        if all(isinstance(d, tirx.IntImm) for p in f.params for d in p.shape)
    )
    sch = Int4DecodeGEMV().apply(decode, target, False)
    func = sch.mod["main"].with_attr("global_symbol", "main")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=target)
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
    """Built through ``cpu_rules()`` as the model is: the decode result equals numpy's
    matmul with the dequantized weight (float64), to fp32 summation error (fp16: the
    output's rounding). Weights with every nibble value and zero points across 0..15."""
    mod = _fused(k, n, group, dtype)
    with target:
        scheduled = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    assert "group_part" in scheduled.script(), "the decode GEMV was not rewritten"
    ex = tvm.compile(scheduled, target=target, relax_pipeline=relax.get_pipeline("default_build"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(7)
    # A column offset per column makes the zero points range over 0..15.
    w = rng.standard_normal((k, n)) / np.sqrt(k) + rng.uniform(-0.05, 0.05, n)
    stored = quantize_rtn(w.astype(np.float32), group, dtype)
    w_deq = dequantize(stored["qweight"], stored["qzeros"], stored["scales"], group)
    assert len(np.unique(stored["qzeros"].view(np.uint32) & 0xF)) > 4
    dev = tvm.cpu()
    params = [tvm.runtime.tensor(stored[p], dev) for p in ("qweight", "qzeros", "scales")]
    x = rng.standard_normal((1, 1, k)).astype(dtype)
    ref = x.astype(np.float64) @ w_deq.astype(np.float64)
    out = vm["decode"](tvm.runtime.tensor(x, dev), *params).numpy()
    err = np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= (1e-3 if dtype == "float16" else 2e-6), err
