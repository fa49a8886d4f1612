"""The CPU rule for fp16 4-bit decode GEMVs on AVX-512 VNNI: integer dot products
(``vpdpwssd``) on the packed words, the activation row as int16 per group of rows.

Groups of up to 32 rows (``q4f16t``'s) go to ``int4_gemv_vnni_bytes.py`` first, which takes
4 rows a product and keeps a group's sums in registers; this kernel serves larger groups
(``q4f16t-g128``), whose rows that one would read all at once.

``int4_gemv.py`` regroups the sum per group, ``y[n] = sum_g s[g, n] * (P[g, n] - z[g, n] * X[g])``
with ``P[g, n] = sum_{k in g} x[k] * q[k, n]``, and spends a mask, an int-to-float conversion
and an FMA on every 16 weights. Here ``P`` is computed in integers. Per group, each core turns
the fp16 activations into int16 under one factor, ``a[k] = round(x[k] * 32767 / m)`` with
``m = max |x|`` over the group's rows (``X`` becomes ``A = sum a``, ``y`` takes ``m / 32767``).
``vpdpwssd`` multiplies 32 int16 pairs and adds each pair's two products to one int32 lane,
so a lane holds one column and two rows of it: two rows' words for 16 word columns are
interleaved by 16-bit halves (``vpermt2w``), each 16-bit half holds 4 nibbles, and nibble
``j`` is ``(half >> 4j) & 0xF``. Per two rows and 16 words (256 weights): 2 shuffles, 14
shifts and masks, 8 ``vpdpwssd`` against the broadcast activation pair, against 48 ops in
the fp32 form. ``P`` is exact: ``|P| <= 32 * 15 * 32767 < 2**24``, and so is ``P - z * A``
in fp32; the scale, ``m / 32767`` and the sum over groups are fp32.

The one difference from ``int4_gemv.py``'s result is the activations' rounding to int16 under
the group's largest: at most ``m / 65534`` an element, 1/32 of half an fp16 ulp of that
largest element (fp16 keeps 11 bits, this 15 relative to it). The kernel is used for fp16
models only; fp32 compute (``q4f32t``, the exact mode the tests compare against
transformers to 1e-4) keeps ``int4_gemv.py``. ``tests/test_cpu_int4_gemv.py`` checks the
result against numpy's computation of the same int16 rounding (fp32 summation error) and
against the exact product within the rounding's bound.

Loop nest (``rows`` = 8 rows of a group at a time, ``size / 8`` apart, as in ``int4_gemv.py``:
8 memory streams a core)::

    parallel band                        # a band of whole groups per core
      for g in the band
        a, A, m of the group              # int16 activations, pairs packed in int32
        for b in 0 .. size / 8
          for strips of 16 words
            8 accumulators (nibble j) <- P[j, strip]      (zero at b = 0)
            for the 4 row pairs (unrolled): load, interleave, 8 x (shift, mask, vpdpwssd)
            P[j, strip] <- accumulators
        for strips: stage the scales (shuffles), y_band[j, w] += s * m/32767 * (P - z * A)
    parallel strip                       # the bands' y summed, put in column order
      out[strip's columns] = y at each column's nibble and word

Measured on this CPU (2 cores, AVX-512 VNNI; each GEMV alone, weights cycled through copies
larger than the caches; best of 20 rounds against ``int4_gemv.py`` in the same process):
``2048 x 16384`` 0.85 -> 0.78 ms, ``8192 x 2048`` 0.53 -> 0.47, ``2048 x 3072`` 0.20 -> 0.19,
``2048 x 128256`` 6.4 -> 5.8 ms; with the weights in cache 1.3-1.4x faster. From DRAM both
stay at 20-26 GB/s, while a kernel that only reads the words in this order (8 rows at
once) reaches 35 GB/s: the kernel is still bound by its own work, not by the access pattern.
Software prefetching and huge pages did not change that.

Two TVM 0.27 traps this kernel is written around (``docs/tvm-0.27.md``): a ``local``-scope
buffer is always allocated with ``TVMBackendAllocWorkspace``, so LLVM cannot keep it in
registers: the small per-core buffers here are ``global``-scope allocations inside the
parallel loop, which become stack allocations; and a plain ``name = value`` inside a loop
of TVMScript becomes a one-element buffer, so the vector temporaries are ``T.let``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.target import Target
from tvm.target.codegen import target_has_features

from mlc_edge.quantization.int4 import Int4Layout

from .int4_gemv import _decode_operands, group_bands, nibble_of_column
from .lanes import across_lanes
from .matmul_kn import CPURule

LANES = 16  # int32 lanes of an AVX-512 register: 16 word columns
VPDPWSSD = "llvm.x86.avx512.vpdpwssd.512"
INT16_MAX = 32767


def has_vnni(target: Target) -> bool:
    """Whether ``target`` has 512-bit ``vpdpwssd`` (AVX-512 VNNI and BW)."""
    return target_has_features("avx512vnni", target) and target_has_features("avx512bw", target)


def _vectors(buf: tirx.Buffer, start: tirx.PrimExpr, size: int) -> list[tirx.PrimExpr]:
    """``buf[start : start + size]`` as vectors of 16."""
    ramps = [tirx.Ramp(start + v * LANES, 1, LANES) for v in range(size // LANES)]
    return [tirx.BufferLoad(buf, [ramp]) for ramp in ramps]


def _peak_lanes(x_row: tirx.Buffer, k0: tirx.PrimExpr, size: int) -> tirx.PrimExpr:
    """The lane-wise largest magnitude of the group's fp16 activations, in fp32."""
    magnitudes = [tirx.abs(tirx.Cast("float32x16", v)) for v in _vectors(x_row, k0, size)]
    return functools.reduce(tirx.max, magnitudes)


def _run_sum(a: tirx.Buffer, p: tirx.PrimExpr, run: int) -> tirx.PrimExpr:
    """``a[p * run : (p + 1) * run]`` summed in one vector of 16."""
    return functools.reduce(operator.add, _vectors(a, p * run, run))


@T.macro
def round_group(x_row, k0, size, level, a, stats, a_sum, parts):
    """The group's activations ``x_row[k0 : k0 + size]`` (``size`` a multiple of 16) as
    integers under ``level``: ``stats = (m, level / m)`` with ``m`` their largest
    magnitude, ``a = round(x * level / m)`` (half to even), ``a_sum[p]`` the sum of ``a``
    over the ``p``-th of ``parts`` equal runs of rows (each a multiple of 16). In vectors
    of 16: one element at a time, LLVM vectorized the rounding but kept the largest
    magnitude a serial chain of scalar fp16 compares (this and the byte kernel's column
    pass took 5-10% of its GEMVs from L3)."""
    peak: T.let[T.float32x16] = _peak_lanes(x_row, k0, size)
    stats[0] = across_lanes(peak, tirx.max)
    stats[1] = T.Select(stats[0] > T.float32(0), T.float32(level) / stats[0], T.float32(0))
    for v in T.unroll(size // LANES):
        a[T.ramp(v * LANES, 1, LANES)] = T.Cast(
            "int32x16",
            T.nearbyint(
                T.Cast("float32x16", x_row[T.ramp(k0 + v * LANES, 1, LANES)])
                * T.broadcast(stats[1], LANES)
            ),
        )
    for p in T.unroll(parts):
        a_sum[p] = across_lanes(_run_sum(a, p, size // parts), operator.add)


def _column_slot(c: tirx.PrimExpr) -> tirx.PrimExpr:
    """Where column ``c`` of a strip (0..127) sits in ``y_band``'s 8 x 16 values of the
    strip: its nibble's row, lane ``c // 8`` (its word)."""
    return nibble_of_column(c) * LANES + c // 8


@T.macro
def columns_in_order(y_band, out_row, strips, bands, out_dtype, column_slot, lanes):
    """``out_row`` from ``y_band[bands, 8, words]``: a strip's bands summed in vectors, then
    its ``8 * lanes`` columns in order, column ``c`` from slot ``column_slot(c)`` of the
    strip's 8 x ``lanes`` sums; strips in parallel. Unrolled, so each column's slot is a
    constant (one serial loop over the columns, indexing per column, took 8% of the 2048 x
    16384 GEMV from L3)."""
    for s in T.parallel(strips):
        y_sum = T.alloc_buffer((8 * lanes,), "float32")
        for r in T.unroll(8):
            y_sum[T.ramp(r * lanes, 1, lanes)] = y_band[0, r, T.ramp(s * lanes, 1, lanes)]
            for band in range(1, bands):
                y_sum[T.ramp(r * lanes, 1, lanes)] = (
                    y_sum[T.ramp(r * lanes, 1, lanes)]
                    + y_band[band, r, T.ramp(s * lanes, 1, lanes)]
                )
        for c in T.unroll(8 * lanes):
            out_row[s * 8 * lanes + c] = T.Cast(out_dtype, y_sum[column_slot(c)])


def with_gemv_signature(
    body: Any,
    x_shape: list[int],
    k: int,
    words: int,
    groups: int,
    out_dtype: str,
    tiles: bool = False,
) -> tirx.PrimFunc:
    """A hand-written 4-bit decode GEMV with parameters ``x, qweight, qzeros, scales, out``
    (``hand_written`` puts them in the replaced function's order) around ``body``, a
    ``T.macro`` taking ``(x_row, qweight, qzeros, scales, out_row)``: ``x`` and ``out``
    seen as flat rows, ``qweight`` in rows or (``tiles``) in CPU tiles."""
    n = words * 8
    qweight_shape = Int4Layout(k // groups, tiles=tiles).shapes(k, n)["qweight"]

    @T.prim_func(s_tir=True)
    def func(
        x: T.Buffer(x_shape, "float16"),
        qweight: T.Buffer(qweight_shape, "int32"),
        qzeros: T.Buffer((groups, words), "int32"),
        scales: T.Buffer((groups, n), "float16"),
        out: T.Buffer([*x_shape[:-1], n], out_dtype),
    ):
        x_row = T.decl_buffer((k,), "float16", data=x.data)
        out_row = T.decl_buffer((n,), out_dtype, data=out.data)
        body(x_row, qweight, qzeros, scales, out_row)

    return func


def vnni_gemv(
    x_shape: list[int],
    k: int,
    words: int,
    groups: int,
    bands: int,
    out_dtype: str,
    rows: int = 8,
) -> tirx.PrimFunc:
    """The kernel (module docstring) with parameters ``x, qweight, qzeros, scales, out``."""
    size = k // groups
    strips = words // LANES
    passes = size // rows
    half = rows // 2
    per_band = groups // bands

    def vec(c: int) -> tirx.PrimExpr:
        return T.broadcast(T.int32(c), LANES)

    def dot(
        acc: tirx.PrimExpr, halves: tirx.PrimExpr, j: tirx.PrimExpr, pair: tirx.PrimExpr
    ) -> tirx.PrimExpr:
        """``acc`` plus nibble ``j`` of each 16-bit half times the activation pair."""
        nibble = (halves >> T.broadcast(T.Cast("uint16", j * 4), 2 * LANES)) & T.broadcast(
            T.uint16(15), 2 * LANES
        )
        return T.call_llvm_pure_intrin(
            "int32x16", VPDPWSSD, acc, T.reinterpret("int16x32", nibble), pair
        )

    @T.macro
    def body(x_row, qweight, qzeros, scales, out_row):
        y_band = T.alloc_buffer((bands, 8, words), "float32")
        for band in T.parallel(bands):
            # P of one group in nibble order; the rest is small enough for the stack.
            P = T.alloc_buffer((8, words), "int32", scope="local")
            a = T.alloc_buffer((size,), "int32")
            pairs = T.alloc_buffer((size // 2,), "int32")
            stats = T.alloc_buffer((2,), "float32")  # m, 32767 / m
            a_sum = T.alloc_buffer((1,), "int32")
            acc = T.alloc_buffer((8 * LANES,), "int32")
            scale = T.alloc_buffer((8 * LANES,), "float32")
            for j, w in T.grid(8, words):
                y_band[band, j, w] = T.float32(0)
            for gi in range(per_band):
                g: T.let[T.int32] = band * per_band + gi
                k0: T.let[T.int32] = g * size
                round_group(x_row, k0, size, INT16_MAX, a, stats, a_sum, 1)
                # Pass b takes rows b + i * passes (i < rows); slot i pairs with i + half.
                for b, i in T.grid(passes, half):
                    pairs[b * half + i] = (a[b + i * passes] & 0xFFFF) | (
                        a[b + (i + half) * passes] << 16
                    )
                for b, s in T.grid(passes, strips):
                    for j in T.unroll(8):
                        acc[T.ramp(j * LANES, 1, LANES)] = T.if_then_else(
                            b == 0, vec(0), P[j, T.ramp(s * LANES, 1, LANES)]
                        )
                    for i in T.unroll(half):
                        lo: T.let[T.int32x16] = qweight[
                            k0 + b + i * passes, T.ramp(s * LANES, 1, LANES)
                        ]
                        hi: T.let[T.int32x16] = qweight[
                            k0 + b + (i + half) * passes, T.ramp(s * LANES, 1, LANES)
                        ]
                        pair: T.let[T.int16x32] = T.reinterpret(
                            "int16x32", T.broadcast(pairs[b * half + i], LANES)
                        )
                        # nibbles 0-3 of both rows, then nibbles 4-7: one column a lane
                        low4: T.let[T.uint16x32] = T.reinterpret(
                            "uint16x32", (lo & vec(0xFFFF)) | (hi << vec(16))
                        )
                        high4: T.let[T.uint16x32] = T.reinterpret(
                            "uint16x32", ((lo >> vec(16)) & vec(0xFFFF)) | (hi & vec(-65536))
                        )
                        for j in T.unroll(4):
                            acc[T.ramp(j * LANES, 1, LANES)] = dot(
                                acc[T.ramp(j * LANES, 1, LANES)], low4, j, pair
                            )
                            acc[T.ramp((j + 4) * LANES, 1, LANES)] = dot(
                                acc[T.ramp((j + 4) * LANES, 1, LANES)], high4, j, pair
                            )
                    for j in T.unroll(8):
                        P[j, T.ramp(s * LANES, 1, LANES)] = acc[T.ramp(j * LANES, 1, LANES)]
                unit: T.let[T.float32] = stats[0] / T.float32(INT16_MAX)
                for s in range(strips):
                    # A serial loop over words that LLVM turns into whole loads and
                    # shuffles (nibble j of word w is column 8w + 2(j % 4) + j // 4).
                    for v in range(LANES):
                        for j in T.unroll(8):
                            scale[j * LANES + v] = T.Cast(
                                "float32", scales[g, (s * LANES + v) * 8 + (j % 4) * 2 + j // 4]
                            )
                    for j in T.unroll(8):
                        for v in T.vectorized(LANES):
                            y_band[band, j, s * LANES + v] = y_band[band, j, s * LANES + v] + scale[
                                j * LANES + v
                            ] * unit * (
                                T.Cast("float32", P[j, s * LANES + v])
                                - T.Cast("float32", (qzeros[g, s * LANES + v] >> (j * 4)) & 15)
                                * T.Cast("float32", a_sum[0])
                            )
        columns_in_order(y_band, out_row, strips, bands, out_dtype, _column_slot, LANES)

    return with_gemv_signature(body, x_shape, k, words, groups, out_dtype)


class Int4DecodeGEMVVNNI(CPURule):
    """The integer-dot-product 4-bit GEMV (module docstring) for fp16 fused dequantize +
    matmul functions with one activation row, on targets with AVX-512 VNNI; other
    functions and targets: None (``Int4DecodeGEMV`` takes them).

    Parameters
    ----------
    rows : int
        Rows of a group read at once (``group / rows`` apart); the group size must be a
        multiple of it (and of 16: ``fp16_decode_operands``).
    """

    def __init__(self, rows: int = 8):
        self.rows = rows

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        ops = fp16_decode_operands(func, target)
        if ops is None:
            return None
        k, words = (int(d) for d in ops["qweight"].shape)
        groups = int(ops["qzeros"].shape[0])
        if words % LANES or (k // groups) % self.rows:
            return None
        return hand_written(func, ops, target, vnni_gemv, self.rows)


def fp16_decode_operands(func: tirx.PrimFunc, target: Target) -> dict[str, tirx.Buffer] | None:
    """``func``'s operands (``_decode_operands``) when a VNNI kernel may take it: a one-row
    4-bit GEMV with fp16 activations and scales and groups of a multiple of 16 rows
    (``round_group``'s vectors), on a target with VNNI; else None."""
    if not has_vnni(target):
        return None
    ops = _decode_operands(func)
    if ops is None or ops["x"].dtype != "float16" or ops["scales"].dtype != "float16":
        return None
    k = int(ops["qweight"].shape[0])
    if (k // int(ops["qzeros"].shape[0])) % LANES:
        return None
    return ops


def hand_written(
    func: tirx.PrimFunc,
    ops: dict[str, tirx.Buffer],
    target: Target,
    make_kernel: Callable[..., tirx.PrimFunc],
    *options: int,
) -> s_tir.Schedule:
    """``make_kernel(x_shape, k, words, groups, bands, out_dtype, *options)`` for ``func``'s
    shapes, in place of ``func``: the kernel's parameters ``x, qweight, qzeros, scales, out``
    in ``func``'s order, with ``func``'s attributes only (the script's global_symbol would
    clash between the model's GEMVs)."""
    groups, words = (int(d) for d in ops["qzeros"].shape)
    k = int(ops["x"].shape[-1])
    kernel = make_kernel(
        [int(d) for d in ops["x"].shape],
        k,
        words,
        groups,
        group_bands(target, groups),
        str(ops["out"].dtype),
        *options,
    )
    mine = dict(zip(("x", "qweight", "qzeros", "scales", "out"), kernel.params, strict=True))
    order = [next(r for r, b in ops.items() if b.same_as(p)) for p in func.params]
    rewritten = tirx.PrimFunc([mine[r] for r in order], kernel.body, kernel.ret_type)
    return s_tir.Schedule(rewritten.with_attrs(func.attrs))
