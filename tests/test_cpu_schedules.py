"""CPU schedule rules: every linear-layer pattern, built with and without the rules, vs numpy.

The model's linear layers are ``op.matmul(x, w)`` with ``w: [K, N]`` ("KN"): alone, with a
bias, with a residual add, cast to fp32 (lm_head logits), and the MLP's gate_up followed by
split + silu * up. Each is exported with a symbolic ``seq_len`` (prefill, run at 1, 7 and 16
rows), a static single row (decode) and a symbolic batch of single rows (batch decode).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import tvm
from mlc_edge.schedules.cpu import MatmulKN, MatmulNK, ParallelSpatial, cpu_rules
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec
from tvm.s_tir import dlight as dl
from tvm.target.codegen import llvm_get_system_cpu

from mlc_edge.compiler.build import fuse_into_tir

# (K, N, I): K=72, N=100: no divisor of N is a multiple of the vector width (50-wide tiles);
# N=97: no usable divisor at all (tail predicate); N=2368 = 37 register tiles: a ragged last
# column chunk; K=256, N=512, I=384: the regular case with several column chunks.
# (shape, dtype, layout): "KN" is the model's layout (MatmulKN); "NK" (nn.Linear, MatmulNK).
CASES = [
    ((72, 100, 48), "float32", "KN"),
    ((72, 100, 48), "float16", "KN"),
    ((24, 97, 20), "float32", "KN"),
    ((40, 2368, 64), "float16", "KN"),
    ((256, 512, 384), "float32", "KN"),
    ((256, 512, 384), "float16", "KN"),
    ((72, 100, 48), "float32", "NK"),
    ((256, 512, 384), "float16", "NK"),
]
PATTERNS = ["plain", "bias", "residual", "logits", "mlp"]
# name -> (x shape, rows to run it with)
KINDS = {
    "prefill": ([1, "seq_len"], [1, 7, 16]),
    "decode": ([1, 1], [1]),
    "batch": (["batch_size", 1], [3]),
}


def _target() -> tvm.target.Target:
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


class Linears(nn.Module):
    """The linear-layer patterns of the model, one method per pattern."""

    def __init__(self, k: int, n: int, inter: int, dtype: str, nk: bool = False):
        # nk: weights stored [out, in] like nn.Linear (matmul of the transpose).
        self.nk = nk
        self.w = nn.Parameter((n, k) if nk else (k, n), dtype)
        self.b = nn.Parameter((n,), dtype)
        self.w_gate_up = nn.Parameter((2 * inter, k) if nk else (k, 2 * inter), dtype)

    def _mm(self, x: nn.Tensor, w: nn.Parameter) -> nn.Tensor:
        return op.matmul(x, op.permute_dims(w) if self.nk else w)

    def plain(self, x: nn.Tensor) -> nn.Tensor:
        return self._mm(x, self.w)

    def bias(self, x: nn.Tensor) -> nn.Tensor:
        return self._mm(x, self.w) + self.b

    def residual(self, x: nn.Tensor, r: nn.Tensor) -> nn.Tensor:
        return self._mm(x, self.w) + r

    def logits(self, x: nn.Tensor) -> nn.Tensor:
        return op.astype(self._mm(x, self.w), "float32")

    def mlp(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = op.split(self._mm(x, self.w_gate_up), 2, axis=-1)
        return op.silu(gate) * up


# One exported function per (pattern, kind): Linears.<pattern>_<kind>.
for _p in PATTERNS:
    for _kind in KINDS:
        setattr(Linears, f"{_p}_{_kind}", getattr(Linears, _p))


def _export(k: int, n: int, inter: int, dtype: str, nk: bool = False) -> tvm.IRModule:
    model = Linears(k, n, inter, dtype, nk)
    specs = {}
    for p in PATTERNS:
        for kind, (lead, _) in KINDS.items():
            args = {"x": spec.Tensor([*lead, k], dtype)}
            if p == "residual":
                args["r"] = spec.Tensor([*lead, n], dtype)
            specs[f"{p}_{kind}"] = {**args, "$": {"param_mode": "plain", "effect_mode": "none"}}
    mod, _ = model.export_tvm(spec=specs)
    return fuse_into_tir()(mod)  # as the model build does


def _build(mod: tvm.IRModule, target: tvm.target.Target, schedule: bool):
    mod = mod.clone()
    if schedule:
        with target:
            mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("default_build"))
    return mod, relax.VirtualMachine(ex, tvm.cpu())


def _reference(pattern: str, x, w, b, w_gu, r, dtype: str) -> np.ndarray:
    """float64 reference; intermediate fp16 roundings are covered by the tolerance."""
    f = np.float64
    if pattern == "mlp":
        gu = x.astype(f) @ w_gu.astype(f)
        gate, up = np.split(gu, 2, axis=-1)
        return gate / (1.0 + np.exp(-gate)) * up
    y = x.astype(f) @ w.astype(f)
    if pattern == "bias":
        y = y + b.astype(f)
    if pattern == "residual":
        y = y + r.astype(f)
    return y


def _prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return _target()


@pytest.mark.parametrize(
    ("shape", "dtype", "layout"),
    CASES,
    ids=[f"K{k}_N{n}_I{i}-{d}-{lay}" for (k, n, i), d, lay in CASES],
)
def test_linear_patterns_match_numpy(
    shape: tuple[int, int, int], dtype: str, layout: str, target
) -> None:
    k, n, inter = shape
    nk = layout == "NK"
    mod = _export(k, n, inter, dtype, nk)

    # Every matmul PrimFunc must be taken by our rule for its layout, and come out parallel +
    # vectorized.
    rule = MatmulNK() if nk else MatmulKN()
    matmuls = {name: f for name, f in _prim_funcs(mod).items() if "matmul" in name}
    assert matmuls, "no matmul PrimFunc found"
    for name, f in matmuls.items():
        assert rule.apply(f, target, False) is not None, f"{layout} rule skipped {name}"

    scheduled, vm_fast = _build(mod, target, schedule=True)
    for name in matmuls:
        text = _prim_funcs(scheduled)[name].script()
        assert "T.parallel(" in text and "T.vectorized(" in text, f"{name} not scheduled"
    _, vm_ref = _build(mod, target, schedule=False)

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    w_gu = (rng.standard_normal((k, 2 * inter)) / np.sqrt(k)).astype(dtype)
    dev = tvm.cpu()
    stored = (w.T.copy(), b, w_gu.T.copy()) if nk else (w, b, w_gu)
    params = [tvm.runtime.tensor(a, dev) for a in stored]

    for pattern in PATTERNS:
        for kind, (lead, rows_list) in KINDS.items():
            for rows in rows_list:
                lead_shape = [rows if d in ("seq_len", "batch_size") else d for d in lead]
                x = rng.standard_normal((*lead_shape, k)).astype(dtype)
                r = rng.standard_normal((*lead_shape, n)).astype(dtype)
                args = [tvm.runtime.tensor(x, dev)]
                if pattern == "residual":
                    args.append(tvm.runtime.tensor(r, dev))
                ref = _reference(pattern, x, w, b, w_gu, r, dtype)
                scale = np.abs(ref).max()
                fn = f"{pattern}_{kind}"
                fast = vm_fast[fn](*args, *params).numpy()
                slow = vm_ref[fn](*args, *params).numpy()
                assert fast.shape == ref.shape and fast.dtype == slow.dtype
                if pattern == "logits":
                    assert fast.dtype == np.float32
                if dtype == "float32":
                    tol_fast = tol_slow = 1e-5
                else:
                    # fp16 output keeps 11 significant bits: each rounding (matmul result,
                    # bias/residual add, silu/mul) is <= 2**-11 relative, a few of them stack.
                    # The rule accumulates in fp32, so it only pays those roundings; the
                    # unscheduled function also accumulates k products in fp16.
                    tol_fast, tol_slow = 4e-3, 2e-2
                err_fast = np.abs(fast.astype(np.float64) - ref).max() / scale
                err_slow = np.abs(slow.astype(np.float64) - ref).max() / scale
                where = f"{fn} rows={rows} {dtype} {layout} K={k} N={n}"
                assert err_fast <= tol_fast, f"scheduled {where}: rel err {err_fast:.2e}"
                assert err_slow <= tol_slow, f"unscheduled {where}: rel err {err_slow:.2e}"


def test_fp16_accumulates_in_fp32(target) -> None:
    """A long fp16 reduction: fp32 accumulation keeps the error at output rounding level."""
    k, n = 4096, 128
    mod = _export(k, n, 16, "float16")
    _, vm_fast = _build(mod, target, schedule=True)
    _, vm_ref = _build(mod, target, schedule=False)
    rng = np.random.default_rng(1)
    # All-positive operands make fp16 accumulation drift (sums grow past fp16 spacing).
    x = rng.uniform(0, 1, (1, 1, k)).astype("float16")
    w = rng.uniform(0, 1, (k, n)).astype("float16")
    dev = tvm.cpu()
    params = [
        tvm.runtime.tensor(a, dev)
        for a in (w, np.zeros(n, "float16"), np.zeros((k, 32), "float16"))
    ]
    ref = x.astype(np.float64)[0] @ w.astype(np.float64)
    fast = vm_fast["logits_decode"](tvm.runtime.tensor(x, dev), *params).numpy()[0]
    slow = vm_ref["logits_decode"](tvm.runtime.tensor(x, dev), *params).numpy()[0]
    err_fast = np.abs(fast - ref).max() / np.abs(ref).max()
    err_slow = np.abs(slow - ref).max() / np.abs(ref).max()
    assert err_fast < 1e-3  # one fp16 rounding of the result
    assert err_fast < err_slow


def test_parallel_spatial_rule(target) -> None:
    """The fallback rule parallelizes element-wise work and leaves the results unchanged."""
    k, n, inter = 64, 64, 4096
    mod = _export(k, n, inter, "float32")
    funcs = _prim_funcs(mod)
    rest = {name: f for name, f in funcs.items() if "matmul" not in name}
    assert rest, "expected the split/silu/multiply function outside the matmul"
    scheduled = [ParallelSpatial().apply(f, target, False) for f in rest.values()]
    assert any(s is not None and "T.parallel(" in s.mod["main"].script() for s in scheduled)
    # An already-scheduled (parallel) function is left alone.
    for s in scheduled:
        if s is not None:
            assert ParallelSpatial().apply(s.mod["main"], target, False) is None

    _, vm_fast = _build(mod, target, schedule=True)
    rng = np.random.default_rng(2)
    w_gu = (rng.standard_normal((k, 2 * inter)) / np.sqrt(k)).astype("float32")
    dev = tvm.cpu()
    params = [
        tvm.runtime.tensor(a, dev)
        for a in (np.zeros((k, n), "float32"), np.zeros(n, "float32"), w_gu)
    ]
    x = rng.standard_normal((1, 16, k)).astype("float32")
    out = vm_fast["mlp_prefill"](tvm.runtime.tensor(x, dev), *params).numpy()
    ref = _reference("mlp", x, None, None, w_gu, None, "float32")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_math_calls_count_for_more_work(target) -> None:
    """Decode's SiLU for Llama-3.2-1B (8,192 sigmoids) goes to the thread pool; 8,192
    adds stay serial (waking the pool costs more), and so would the SiLU with a weight of 1."""
    from tvm import te

    x = te.placeholder((1, 1, 8192), "float16", name="x")
    y = te.placeholder((1, 1, 8192), "float16", name="y")
    silu = te.compute(x.shape, lambda *i: x(*i) * tvm.tirx.sigmoid(x(*i)) * y(*i), name="silu")
    add = te.compute(x.shape, lambda *i: x(*i) + y(*i), name="add")
    silu_f = te.create_prim_func([x, y, silu])
    add_f = te.create_prim_func([x, y, add])
    scheduled = ParallelSpatial().apply(silu_f, target, False)
    assert scheduled is not None and "T.parallel(" in scheduled.mod["main"].script()
    assert ParallelSpatial().apply(add_f, target, False) is None
    assert ParallelSpatial(call_weight=1).apply(silu_f, target, False) is None


class _OtherOps(nn.Module):
    """The model's other kernels: embedding take, RMSNorm, an NK nn.Linear, softmax."""

    def __init__(self, vocab: int, hidden: int, out: int):
        self.emb = nn.Parameter((vocab, hidden), "float32")
        self.norm = nn.Parameter((hidden,), "float32")
        self.lin = nn.Linear(hidden, out, bias=False)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        h = op.rms_norm(op.take(self.emb, ids, axis=0), self.norm, axes=[-1])
        return op.softmax(self.lin(h), axis=-1)

    def decode(self, ids: nn.Tensor) -> nn.Tensor:
        return self.forward(ids)


def test_other_ops_keep_results(target) -> None:
    """NK matmuls and ParallelSpatial on norms/softmax/take: same results as unscheduled."""
    vocab, hidden, out = 300, 256, 192
    model = _OtherOps(vocab, hidden, out)
    plain = {"param_mode": "plain"}
    mod, _ = model.export_tvm(
        spec={
            "forward": {"ids": spec.Tensor(["seq_len"], "int32"), "$": plain},
            "decode": {"ids": spec.Tensor([1], "int32"), "$": plain},
        }
    )
    mod = fuse_into_tir()(mod)
    # min_work=1: these test shapes are small, the rule must still take every function.
    rules = [MatmulKN(), MatmulNK(), dl.cpu.GEMV(), ParallelSpatial(min_work=1)]
    fast_mod = mod.clone()
    with target:
        fast_mod = dl.ApplyDefaultSchedule(*rules)(fast_mod)
    for name, f in _prim_funcs(fast_mod).items():
        assert "T.parallel(" in f.script(), f"{name} left serial"
    # nn.Linear's NK matmuls (inner reduction) are MatmulNK's, not MatmulKN's.
    nk = [f for name, f in _prim_funcs(mod).items() if "matmul" in name]
    assert nk and all(MatmulKN().apply(f, target, False) is None for f in nk)
    assert all(MatmulNK().apply(f, target, False) is not None for f in nk)
    pipeline = relax.get_pipeline("default_build")
    vm_fast = relax.VirtualMachine(
        tvm.compile(fast_mod, target=target, relax_pipeline=pipeline), tvm.cpu()
    )
    vm_ref = relax.VirtualMachine(
        tvm.compile(mod, target=target, relax_pipeline=pipeline), tvm.cpu()
    )

    rng = np.random.default_rng(3)
    dev = tvm.cpu()
    # Linear weights scaled so logits stay O(1): softmax turns a logit's absolute rounding
    # error into a relative one, and the dot products are summed in another order.
    params = [
        tvm.runtime.tensor((rng.standard_normal(shape) * scale).astype("float32"), dev)
        for shape, scale in (
            ((vocab, hidden), 1.0),
            ((hidden,), 1.0),
            ((out, hidden), hidden**-0.5),
        )
    ]
    for fn, rows in (("decode", 1), ("forward", 1), ("forward", 9)):
        ids = tvm.runtime.tensor(rng.integers(0, vocab, rows).astype("int32"), dev)
        fast = vm_fast[fn](ids, *params).numpy()
        ref = vm_ref[fn](ids, *params).numpy()
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-7)


# 4-bit (q4f16t-hf / q4f32t-hf) layers: (K, N, group, dtype, bias). N=40: five words, a 10-wide
# register tile (no multiple of the vector lanes divides 40), so lanes straddle words; N=2368:
# 148 register tiles, a ragged last column chunk, g128; K=96: three groups.
INT4_CASES = [
    (96, 40, 32, "float16", False),
    (256, 2368, 128, "float16", True),
    (64, 1024, 32, "float32", False),
]
INT4_KINDS = {
    "decode": ([1, 1], [1]),
    "prefill": ([1, "seq_len"], [1, 7, 16]),
    "batch": (["batch_size", 1], [3]),
}


class _Int4Linear(nn.Module):
    def __init__(self, k: int, n: int, group: int, dtype: str, bias: bool):
        from mlc_edge.quantization.int4 import Int4KNLinear, Int4Layout

        self.lin = Int4KNLinear(k, n, bias, dtype, Int4Layout(group))

    def decode(self, x: nn.Tensor) -> nn.Tensor:
        return self.lin(x)

    prefill = batch = decode


def _int4_vector_loop(func: tirx.PrimFunc) -> tuple[list[tirx.For], list[str]]:
    """The loops around the matmul's update block (outermost first) and the buffers it reads."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    update = sch.get_sblock("matmul_update")
    loops = [sch.get(loop) for loop in sch.get_loops(update)]
    reads = [str(r.source.name) for r in sch.get(update).reads]
    return loops, reads


@pytest.mark.parametrize(
    ("k", "n", "group", "dtype", "bias"),
    INT4_CASES,
    ids=[f"K{k}_N{n}_g{g}-{d}{'-bias' if b else ''}" for k, n, g, d, b in INT4_CASES],
)
def test_int4_rule_vectorizes_unpacks_in_registers_and_matches_numpy(
    k: int, n: int, group: int, dtype: str, bias: bool, target
) -> None:
    """The 4-bit rule runs MatmulKN's nest: parallel column chunks outermost, a vector loop
    over one fp32 register of columns innermost reading the packed words themselves (no
    dequantized copy of the weight anywhere), and LLVM emits vector shifts and FMAs; the
    results match numpy's dequantized matmul for decode, prefill and batch rows."""
    from mlc_edge.schedules.cpu.int4 import Int4Matmul
    from mlc_edge.schedules.cpu.matmul_kn import vector_bytes
    from tvm.target.codegen import target_has_features

    from mlc_edge.quantization.int4 import dequantize, quantize_rtn

    model = _Int4Linear(k, n, group, dtype, bias)
    model.to(dtype)
    plain = {"param_mode": "plain", "effect_mode": "none"}
    mod, _ = model.export_tvm(
        spec={
            name: {"x": spec.Tensor([*lead, k], dtype), "$": plain}
            for name, (lead, _) in INT4_KINDS.items()
        }
    )
    mod = fuse_into_tir()(mod)
    fused = {name: f for name, f in _prim_funcs(mod).items() if "dequantize_int4" in name}
    assert len(fused) == 3, sorted(_prim_funcs(mod))
    lanes = vector_bytes(target) // 4  # fp32 accumulators
    for name, f in fused.items():
        sch = Int4Matmul().apply(f, target, False)
        assert sch is not None, name
        func = sch.mod["main"]
        text = func.script()
        # The [K, N] intermediate is gone: only the packed tensors are read.
        assert "dequantize_int4_intermediate" not in text, name
        assert 'T.sblock("matmul_update")' in text, f"{name}: the matmul was not tiled"
        loops, reads = _int4_vector_loop(func)
        assert loops[0].kind == tirx.ForKind.PARALLEL, name
        assert loops[-1].kind == tirx.ForKind.VECTORIZED, name
        tile = int(loops[-1].extent)
        assert tile == (lanes if n % lanes == 0 else 10), (name, tile)
        assert any("qweight" in r for r in reads) and any("qzeros" in r for r in reads), reads
        if "decode" in name and n % lanes == 0 and target_has_features("avx2", target):
            # Variable per-lane shifts (the nibbles) and FMAs on whole registers.
            lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=target)
            asm = lib.inspect_source("asm")
            assert re.search(r"\bvpsr[al]vd\b", asm), "no vector shift: the nibbles unpack scalar"
            assert re.search(r"\bvfmadd\w*ps\b", asm), "no vector FMA"

    with target:
        scheduled = dl.ApplyDefaultSchedule(*cpu_rules())(mod.clone())
    ex = tvm.compile(scheduled, target=target, relax_pipeline=relax.get_pipeline("default_build"))
    vm = relax.VirtualMachine(ex, tvm.cpu())

    rng = np.random.default_rng(4)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    stored = quantize_rtn(w, group, dtype)
    w_deq = dequantize(stored["qweight"], stored["qzeros"], stored["scales"], group)
    b = rng.standard_normal(n).astype(dtype)
    dev = tvm.cpu()
    params = [tvm.runtime.tensor(stored[p], dev) for p in ("qweight", "qzeros", "scales")]
    if bias:
        params.append(tvm.runtime.tensor(b, dev))
    for name, (lead, rows_list) in INT4_KINDS.items():
        for rows in rows_list:
            shape = [rows if d in ("seq_len", "batch_size") else d for d in lead]
            x = rng.standard_normal((*shape, k)).astype(dtype)
            ref = x.astype(np.float64) @ w_deq.astype(np.float64)
            if bias:
                ref = ref + b.astype(np.float64)
            out = vm[name](tvm.runtime.tensor(x, dev), *params).numpy()
            assert out.shape == ref.shape and out.dtype == np.dtype(dtype)
            err = np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max()
            # fp32 accumulation: fp16 pays only the output's (and the bias add's) rounding.
            assert err <= (4e-3 if dtype == "float16" else 1e-5), (name, rows, err)
