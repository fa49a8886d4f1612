"""The CPU rule for fp16 4-bit decode GEMVs with groups of 16 or 32 rows on AVX2 (no
AVX-512 VNNI): 16-bit integer dot products (``vpmaddwd``) over 2 rows at once, the group's
rows summed in registers.

It computes what the VNNI kernels compute (``int4_gemv_vnni.py``),
``y[n] = sum_g s * (P - z * A) * m / L`` with ``P = sum_{k in g} a[k] * q[k, n]`` in integers
and the activations rounded per group, ``a = round(x * L / m)``, ``L = 16383``, on the
instructions an AVX2 CPU has. ``vpmaddwd`` multiplies 16 int16 pairs and adds each pair's
two products into one int32 lane, so a lane holds one column and two rows: two adjacent
rows' words are interleaved by 16-bit halves (shifts and ``vpblendw``), each half holding 4
nibbles. Nibble ``j`` (0..2) of a half is masked in place, ``half & (0xF << 4j)``, which is
``q * 16**j`` (the ``16**-j`` goes into the fold); nibble 3 is ``half >> 12``. Per two rows
and 8 words (128 weights): 2 loads, 4 shifts and blends, 8 masks and shifts, 8
``vpmaddwd`` and 8 adds; the fp32 form (``int4_gemv.py``) spends a mask, a conversion and
an FMA on every 8 weights, and on AVX2 spills its masks (16 registers).

The 8 accumulators (one a nibble, 8 word columns) take all of a group's rows for a strip of
8 words, so ``P`` never goes to memory; then the strip is folded into ``y``: its 64 scales
loaded as 8 vectors of one word's 8 columns, converted (``vcvtph2ps``) and transposed by
shuffles into the nibbles' order, the zero points shifted out of their word. Reading a
group's 32 rows at once leaves the hardware 32 short streams, so each step prefetches one
line into L2: where a group's rows are at most 256 KB, the next group's rows in 4 forward
streams (``next_group_line``, as the byte kernel). Wider rows (an output layer's: 32 rows
of 64 KB a group) are read ahead in chunks of 32 strips, two chunks on, one row after
another (each row's 16 lines of a chunk in address order: ``prefetch_word``), and each
strip prefetches the scales and zero points of the strip 16 on.

Reading rows, each strip reads 32 B of each of the group's 32 rows, one row's bytes far
from the next: however it was prefetched, that ran at 12-15 GB/s where a plain 2-thread read
reaches 22-28. So on these CPUs the 4-bit weights are stored in *CPU tiles*
(``mlc_edge.quantization.int4``: ``qweight[K/g, N/64, g * 8]``, a strip's 8 words of the
group's rows together; ``reads_tiles`` says where, ``spec_for_target`` makes the bundle so):
the kernel then reads its weights in address order, one forward stream a core, each step
prefetching the line ``TILES_AHEAD_LINES`` on. Everything else is the same.

Numerically: ``P`` is exact. Its largest term is nibble 2's, ``15 * 256 * 16383`` a product,
``32`` rows of them under ``2**31``; the fold's ``16**-j`` is exact in fp32, and ``P`` is a
multiple of ``16**j``, under ``2**24 * 16**j``: exact in fp32 too. The activations' rounding
is that of ``int4_gemv_vnni_bytes.py`` (same ``L``): at most ``m / 32766`` an element.
Groups larger than 32 rows would overflow ``P`` and keep ``int4_gemv.py``, as does fp32
compute (``q4f32t``). ``tests/test_cpu_int4_gemv.py`` checks the result against numpy's
computation of the same rounding and against the exact product within its bound.

Measured on 2 cores of an AMD EPYC (Zen 3, AVX2, 512 KB L2 a core; each GEMV alone,
weights cycled through 256 MB of copies, variants built in one process and timed in turn,
best of 5-9 rounds), against ``int4_gemv.py``: ``2048 x 2048`` 0.285 -> 0.205 ms, ``2048 x
3072`` 0.371 -> 0.273, ``2048 x 16384`` 2.03 -> 1.65, ``8192 x 2048`` 1.07 -> 0.69, ``2048 x
128256`` 12.2 -> 10.7 (a Llama-3.2-1B layer 3.8 -> 2.8 ms; the output layer's prefetch
below took it to 8.9); ``benchmarks/int4_cpu.py``'s
decode against llama.cpp's Q4_0 went from 0.66 to 0.97 (median of the paired rounds). The
fp32 form was bound by its arithmetic (its masks spilled); this kernel is bound by its
reads, at 12-15 GB/s where a plain 2-thread read reaches 22-28 (the machine is shared:
rounds vary by 15%). Half the dot products (wrong sums) or a fold of one nibble in 8 took
as long; without the prefetch ``2048 x 2048`` took 0.27 ms instead of 0.17, ``8192 x 2048``
0.99 instead of 0.62. No better: the next group's rows read ahead whole two groups on or
into L1; ``2048 x 16384``'s groups (256 KB, half the L2 with the group being read) read
ahead row by row as wide ones (1.36 -> 1.87 ms); both halves of a line at each step (16
accumulators, which spill): the layers 13-60% slower. The output layer's rows were first
read ahead each row's line 16 strips on (32 rows at once, 64 KB apart: 4 or 8 strips on
were no different); in chunks of 16 strips, one row after another, ``2048 x 128256`` took
10.2 ms where that took 11.5 (medians 11.8 and 13.5), chunks of 32 9.1 (10.6), of 64 no
better than 32; the scales read ahead too, 8.9 against 10.8 (medians 9.6 and 12.1).
In tiles, against rows (each time's ratio to rows' in the same round, median of 20-30
rounds): ``2048 x 3072`` 0.82, ``2048 x 2048`` 0.81, ``2048 x 16384`` 0.61 (1.36 ms
against 2.17, medians), ``8192 x 2048`` 0.85, ``2048 x 128256`` 0.69; prefetching 256 lines
on instead of 1024 was within 5% of it, none 1.2x slower. Without tiles, consuming both
halves of a row's line at once (the group's lines copied into a 2 KB staging tile first)
was no faster, nor were blocks of columns read group after group.

Loop nest::

    parallel band                            # a band of whole groups per core
      for g in the band
        a = round(x * L / m); pairs of rows' a packed in an int32 each
        for strips of 8 words
          8 accumulators <- 0
          for the group's row pairs (unrolled)
            prefetch 1 line: tiles: 1024 lines on; rows: the next group's rows in 4
              streams (wide: chunk 2 on)
            load 2 rows' 8 words, interleave their halves,
              8 x (mask or shift, vpmaddwd, add)
          (wide: prefetch the scales and zero points 16 strips on)
          y_band[nibble, strip] += s * m/L * (P / 16**(j % 4 < 3 ? j % 4 : 0) - z * A)
    parallel strip                           # the bands' y summed, put in column order
      out[strip's columns] = y at each column's nibble and word
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.target import Target
from tvm.target.codegen import target_has_features

from mlc_edge.quantization.int4 import AWQ_PACK_ORDER

from .int4_gemv import _decode_operands, nibble_of_column
from .int4_gemv_vnni import (
    columns_in_order,
    hand_written,
    has_vnni,
    round_group,
    with_gemv_signature,
)
from .int4_gemv_vnni_bytes import WHOLE_GROUP_AHEAD_BYTES, next_group_line, to_l2
from .matmul_kn import CPURule

LANES = 8  # int32 lanes of an AVX2 register: 8 word columns
PMADDWD = "llvm.x86.avx2.pmadd.wd"
LEVEL = 16383  # 15-bit activations: nibble 2 in place (x 256) keeps P under 2**31
MAX_GROUP = 32
LINE_WORDS = 16  # words of a 64-byte cache line: two strips
WIDE_CHUNK_STRIPS = 32  # wide rows are read ahead in chunks of this many strips
SCALES_AHEAD_STRIPS = 16  # and their scales and zero points this many strips on
TILES_AHEAD_LINES = 1024  # weights in CPU tiles: read ahead this many lines (64 KB)

assert MAX_GROUP * 15 * 256 * LEVEL < 2**31


def has_avx2(target: Target) -> bool:
    """Whether ``target`` has AVX2 (256-bit ``vpmaddwd``)."""
    return target_has_features("avx2", target)


def reads_tiles(target: Target, group_size: int, dtype: str) -> bool:
    """Whether 4-bit weights of ``group_size`` rows computed in ``dtype`` are stored in CPU
    tiles (``mlc_edge.quantization.int4``) for ``target``: where this kernel serves them,
    on AVX2 CPUs without VNNI (whose kernels read rows)."""
    return (
        has_avx2(target)
        and not has_vnni(target)
        and dtype == "float16"
        and group_size <= MAX_GROUP
        and group_size % 16 == 0
    )


def nibble_unit(j: int) -> float:
    """What nibble ``j``'s sum is multiplied by to undo its masking in place (``16**-j`` for
    nibbles 0-2 of a half; nibble 3 is shifted down)."""
    return 16.0 ** -(j % 4) if j % 4 < 3 else 1.0


def _column_slot(c: tirx.PrimExpr) -> tirx.PrimExpr:
    """Where column ``c`` of a strip (0..63) sits in ``y_band``'s 8 x 8 values of the strip:
    its nibble's row, lane ``c // 8`` (its word)."""
    return nibble_of_column(c) * LANES + c // 8


def transpose8(rows: list[tirx.PrimExpr]) -> list[tirx.PrimExpr]:
    """The 8 columns of 8 vectors of 8 lanes (``columns[c][v] = rows[v][c]``) by three
    rounds of two-source shuffles, each one instruction on AVX (unpack, ``vshufps``,
    ``vperm2f128``): 24 in all, where element inserts would take 64."""

    def shuffle(a: tirx.PrimExpr, b: tirx.PrimExpr, indices: list[int]) -> tirx.PrimExpr:
        return tirx.Shuffle([a, b], indices)

    unpack_lo, unpack_hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    pick_lo, pick_hi = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    low_halves, high_halves = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    t = []
    for v in range(0, 8, 2):
        t += [shuffle(rows[v], rows[v + 1], unpack_lo), shuffle(rows[v], rows[v + 1], unpack_hi)]
    # u[4h + i]: columns i and i + 4 of rows 4h .. 4h + 3
    u = []
    for h in range(2):
        lo01, hi01, lo23, hi23 = t[4 * h : 4 * h + 4]
        u += [
            shuffle(lo01, lo23, pick_lo),
            shuffle(lo01, lo23, pick_hi),
            shuffle(hi01, hi23, pick_lo),
            shuffle(hi01, hi23, pick_hi),
        ]
    columns = [None] * 8
    for i in range(4):
        columns[i] = shuffle(u[i], u[4 + i], low_halves)
        columns[i + 4] = shuffle(u[i], u[4 + i], high_halves)
    return columns


def prefetch_word(k0: Any, s: Any, step: Any, size: int, words: int, whole_group: bool) -> Any:
    """The ``(row, column)`` of ``qweight`` that prefetch ``step`` (one a row pair,
    0..size/2-1) of strip ``s`` of the group at row ``k0`` reads ahead (integers or TIR
    expressions). ``whole_group``: line ``next_group_line`` of the next group's rows, which
    are contiguous (line ``L`` is their words ``16 L .. 16 L + 15``). Otherwise (wide rows)
    the strips, counted across groups, go in chunks of ``WIDE_CHUNK_STRIPS``; a chunk's
    steps read ahead the lines of the chunk two on, one row after another (each row's
    ``WIDE_CHUNK_STRIPS / 2`` lines in address order), every line once."""
    strips = words // LANES
    if whole_group:
        flat = next_group_line(step, s, strips, size // 2) * LINE_WORDS
        return k0 + size + flat // words, flat % words
    at = (k0 // size) * strips + s  # the strip, counted across groups
    nth = (at % WIDE_CHUNK_STRIPS) * (size // 2) + step  # the chunk's n-th prefetch
    per_row = WIDE_CHUNK_STRIPS // 2  # lines of a row in a chunk
    target = (at // WIDE_CHUNK_STRIPS + 2) * WIDE_CHUNK_STRIPS + 2 * (nth % per_row)
    return size * (target // strips) + nth // per_row, (target % strips) * LANES


def avx2_gemv(
    x_shape: list[int],
    k: int,
    words: int,
    groups: int,
    bands: int,
    out_dtype: str,
    tiles: bool = False,
) -> tirx.PrimFunc:
    """The kernel (module docstring) with parameters ``x, qweight, qzeros, scales, out``,
    ``qweight`` in rows or (``tiles``) in CPU tiles."""
    size = k // groups
    strips = words // LANES
    pairs = size // 2
    per_band = groups // bands
    whole_group_ahead = size * words * 4 <= WHOLE_GROUP_AHEAD_BYTES

    def vec(c: int) -> tirx.PrimExpr:
        return T.broadcast(T.int32(c), LANES)

    def dot(acc: tirx.PrimExpr, halves: tirx.PrimExpr, j: int, pair: tirx.PrimExpr) -> Any:
        if j < 3:
            nibble = halves & T.broadcast(T.uint16(15 << (4 * j)), 2 * LANES)
        else:
            nibble = halves >> T.broadcast(T.uint16(12), 2 * LANES)
        return acc + T.call_llvm_pure_intrin(
            "int32x8", PMADDWD, T.reinterpret("int16x16", nibble), pair
        )

    def scale_of(strip_scales: list[tirx.PrimExpr], j: int) -> tirx.PrimExpr:
        # nibble j of a word holds column AWQ_PACK_ORDER[j] of its 8
        return transpose8(strip_scales)[AWQ_PACK_ORDER[j]]

    def words_of(qweight: tirx.Buffer, g: Any, row: Any, s: Any) -> tirx.PrimExpr:
        """Words ``8 s .. 8 s + 7`` of row ``row`` of group ``g``."""
        if tiles:
            return qweight[g, s, T.ramp(row * LANES, 1, LANES)]
        return qweight[g * size + row, T.ramp(s * LANES, 1, LANES)]

    @T.macro
    def pair_step(acc, qweight, g, i, s, pair_act):
        lo: T.let[T.int32x8] = words_of(qweight, g, 2 * i, s)
        hi: T.let[T.int32x8] = words_of(qweight, g, 2 * i + 1, s)
        pair: T.let[T.int16x16] = T.reinterpret("int16x16", T.broadcast(pair_act, LANES))
        # halves 0 of both rows (nibbles 0-3, a column a lane), then halves 1 (nibbles 4-7)
        low4: T.let[T.uint16x16] = T.reinterpret("uint16x16", (lo & vec(0xFFFF)) | (hi << vec(16)))
        high4: T.let[T.uint16x16] = T.reinterpret(
            "uint16x16",
            T.reinterpret(
                "int32x8", T.reinterpret("uint32x8", lo) >> T.broadcast(T.uint32(16), LANES)
            )
            | (hi & vec(-65536)),
        )
        acc[T.ramp(0 * LANES, 1, LANES)] = dot(acc[T.ramp(0 * LANES, 1, LANES)], low4, 0, pair)
        acc[T.ramp(1 * LANES, 1, LANES)] = dot(acc[T.ramp(1 * LANES, 1, LANES)], low4, 1, pair)
        acc[T.ramp(2 * LANES, 1, LANES)] = dot(acc[T.ramp(2 * LANES, 1, LANES)], low4, 2, pair)
        acc[T.ramp(3 * LANES, 1, LANES)] = dot(acc[T.ramp(3 * LANES, 1, LANES)], low4, 3, pair)
        acc[T.ramp(4 * LANES, 1, LANES)] = dot(acc[T.ramp(4 * LANES, 1, LANES)], high4, 0, pair)
        acc[T.ramp(5 * LANES, 1, LANES)] = dot(acc[T.ramp(5 * LANES, 1, LANES)], high4, 1, pair)
        acc[T.ramp(6 * LANES, 1, LANES)] = dot(acc[T.ramp(6 * LANES, 1, LANES)], high4, 2, pair)
        acc[T.ramp(7 * LANES, 1, LANES)] = dot(acc[T.ramp(7 * LANES, 1, LANES)], high4, 3, pair)

    def folded(
        y: Any, acc: Any, strip_scales: list[Any], words_z: Any, unit: Any, a_sum: Any, j: int
    ) -> Any:
        """``y`` plus nibble ``j``'s sums of the strip, scaled, less the zero points' part."""
        return y + scale_of(strip_scales, j) * T.broadcast(unit, LANES) * (
            T.Cast("float32x8", acc[T.ramp(j * LANES, 1, LANES)])
            * T.broadcast(T.float32(nibble_unit(j)), LANES)
            - T.Cast("float32x8", (words_z >> vec(4 * j)) & vec(15))
            * T.broadcast(T.Cast("float32", a_sum), LANES)
        )

    @T.macro
    def fold(y_band, band, s, acc, words_z, unit, a_sum, strip_scales):
        y_band[band, 0, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 0, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 0
        )
        y_band[band, 1, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 1, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 1
        )
        y_band[band, 2, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 2, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 2
        )
        y_band[band, 3, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 3, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 3
        )
        y_band[band, 4, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 4, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 4
        )
        y_band[band, 5, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 5, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 5
        )
        y_band[band, 6, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 6, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 6
        )
        y_band[band, 7, T.ramp(s * LANES, 1, LANES)] = folded(
            y_band[band, 7, T.ramp(s * LANES, 1, LANES)], acc, strip_scales, words_z, unit, a_sum, 7
        )

    @T.macro
    def body(x_row, qweight, qzeros, scales, out_row):
        y_band = T.alloc_buffer((bands, 8, words), "float32")
        q_flat = T.decl_buffer((1, k * words), "int32", data=qweight.data)
        for band in T.parallel(bands):
            # Per-core buffers under TVM's 1 KB stack limit: global scope (docs/tvm-0.27.md).
            a = T.alloc_buffer((size,), "int32")
            pair_act = T.alloc_buffer((pairs,), "int32")
            stats = T.alloc_buffer((2,), "float32")  # m, L / m
            a_sum = T.alloc_buffer((1,), "int32")
            acc = T.alloc_buffer((8 * LANES,), "int32")
            for r, w in T.grid(8, words):
                y_band[band, r, w] = T.float32(0)
            for gi in range(per_band):
                g: T.let[T.int32] = band * per_band + gi
                k0: T.let[T.int32] = g * size
                round_group(x_row, k0, size, LEVEL, a, stats, a_sum, 1)
                for i in range(pairs):
                    pair_act[i] = (a[2 * i] & 0xFFFF) | (a[2 * i + 1] << 16)
                unit: T.let[T.float32] = stats[0] / T.float32(LEVEL)
                for s in range(strips):
                    for r in T.unroll(8):
                        acc[T.ramp(r * LANES, 1, LANES)] = vec(0)
                    for i in T.unroll(pairs):
                        if tiles:
                            # one forward stream: the line TILES_AHEAD_LINES on
                            ahead: T.let[T.int32] = (
                                (g * strips + s) * size + 2 * i + 2 * TILES_AHEAD_LINES
                            ) * LANES
                            if ahead < k * words:
                                T.evaluate(to_l2(q_flat, 0, ahead))
                        elif prefetch_word(k0, s, i, size, words, whole_group_ahead)[0] < k:
                            T.evaluate(
                                to_l2(
                                    qweight,
                                    *prefetch_word(k0, s, i, size, words, whole_group_ahead),
                                )
                            )
                        pair_step(acc, qweight, g, i, s, pair_act[i])
                    if not whole_group_ahead:
                        # wide rows: the scales (2 lines) and zero points of the strip ahead
                        g_on: T.let[T.int32] = g + (s + SCALES_AHEAD_STRIPS) // strips
                        s_on: T.let[T.int32] = (s + SCALES_AHEAD_STRIPS) % strips
                        if g_on < groups:
                            T.evaluate(to_l2(scales, g_on, s_on * 64))
                            T.evaluate(to_l2(scales, g_on, s_on * 64 + 32))
                            T.evaluate(to_l2(qzeros, g_on, s_on * LANES))
                    words_z: T.let[T.int32x8] = qzeros[g, T.ramp(s * LANES, 1, LANES)]
                    sc0: T.let[T.float32x8] = T.Cast("float32x8", scales[g, T.ramp(s * 64, 1, 8)])
                    sc1: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 8, 1, 8)]
                    )
                    sc2: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 16, 1, 8)]
                    )
                    sc3: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 24, 1, 8)]
                    )
                    sc4: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 32, 1, 8)]
                    )
                    sc5: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 40, 1, 8)]
                    )
                    sc6: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 48, 1, 8)]
                    )
                    sc7: T.let[T.float32x8] = T.Cast(
                        "float32x8", scales[g, T.ramp(s * 64 + 56, 1, 8)]
                    )
                    fold(
                        y_band,
                        band,
                        s,
                        acc,
                        words_z,
                        unit,
                        a_sum[0],
                        [sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7],
                    )
        columns_in_order(y_band, out_row, strips, bands, out_dtype, _column_slot, LANES)

    return with_gemv_signature(body, x_shape, k, words, groups, out_dtype, tiles)


class Int4DecodeGEMVAVX2(CPURule):
    """The 16-bit-dot-product 4-bit GEMV (module docstring) for fp16 fused dequantize +
    matmul functions with one activation row and groups of 16 or 32 rows, on AVX2 targets
    without AVX-512 VNNI (which the byte kernel serves); other functions and targets:
    None."""

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        if not has_avx2(target):
            return None
        ops = _decode_operands(func, tiles=True)
        if ops is None or ops["x"].dtype != "float16" or ops["scales"].dtype != "float16":
            return None
        groups, words = (int(d) for d in ops["qzeros"].shape)
        size = int(ops["x"].shape[-1]) // groups
        if words % LANES or size > MAX_GROUP or size % 16:
            return None
        tiles = len(ops["qweight"].shape) == 3
        if has_vnni(target) and not tiles:  # rows: the VNNI kernels' (tiles only here)
            return None
        return hand_written(func, ops, target, avx2_gemv, tiles)
