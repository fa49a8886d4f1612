"""The CPU rule for fp16 4-bit decode GEMVs with groups of 16 or 32 rows on AVX-512 VNNI:
byte dot products (``vpdpbusd``) over 4 rows at once, the group's rows summed in registers.

It computes what ``int4_gemv_vnni.py`` computes, ``y[n] = sum_g s * (P - z * A) * m / L``
with ``P = sum_{k in g} a[k] * q[k, n]`` in integers, but with a 4-way product:
``vpdpbusd`` adds four unsigned-byte by signed-byte products into each int32 lane, so a lane
is one column and 4 rows. The activations are rounded to 15 bits per group,
``a = round(x * L / m)`` with ``L = 16383``, and split in two signed bytes,
``a = 128 * hi + lo`` (``hi`` in [-128, 127], ``lo`` in [0, 127]); ``P = 128 * P_hi + P_lo``,
each a separate accumulator. 4 rows' words become bytes of one lane by two levels of unpacks
(``vpunpck{l,h}bw`` then ``vpunpck{l,h}wd``): register ``u`` of the 4 holds, in lane
``4L + i``, byte ``i`` of word ``4L + u`` of the 4 rows; its low nibbles (``& 0x0F``) are
nibble ``2i`` of those words and its high nibbles (``>> 4 & 0x0F``) nibble ``2i + 1``.
Per 4 rows and 16 words (512 weights): 8 unpacks, 12 shifts and masks and 16 ``vpdpbusd``,
against 28 shuffles, shifts and masks and 16 ``vpdpwssd`` for ``int4_gemv_vnni.py``.

The accumulators of a 16-word strip are 16 registers, so a strip takes all rows of a group
before its epilogue (``P``, the zero point as ``z * A`` in int32, the scale and ``m / L`` in
fp32, added to ``y``), and ``P`` never goes to memory. That reads the group's 32 rows at
once: 32 short streams, which the hardware prefetcher does not keep ahead of, so each step
prefetches 4 lines (64 bytes) of words, 32 a strip, into L2:
- where a group's rows are at most 256 KB (``WHOLE_GROUP_AHEAD_BYTES``; every layer of
  Llama-3.2-1B), the next group's rows, whole, in address order: the group's ``strips``
  strips prefetch its ``32 * strips`` lines once, as 4 forward streams (``PREFETCH_STREAMS``,
  each a quarter of the rows; ``next_group_line``). A core reads from several forward
  streams faster than from one (a plain 2-thread read of 1 GB on the Intel host below:
  18 GB/s in one stream a core, 23-27 in 4 or 8), and faster than from 32 short ones.
- wider rows (an output layer: 32 rows of 64 KB) would not leave the current group's lines
  in L2 until they are read (``2048 x 24576``, 384 KB, was 9% slower, ``2048 x 128256`` 50%),
  so each step prefetches its 4 rows' words 8 strips ahead (the next group's rows past a
  row's end). Reading the columns in chunks, to make such groups small, was slower still.
  Such groups are read in two passes of 16 rows (``WIDE_PASS_ROWS``), each over all strips
  with its own epilogue (its ``P`` and its rows' ``A``: both still exact; ``y`` gets two
  fp32 terms a group instead of one): 16 streams a core instead of 32, ``2048 x 128256``
  4-11% faster. Passes made the narrower layers 9-18% slower, so they keep one. Each
  strip also prefetches the scales and zero points of the strip 8 on (``scales_ahead``):
  their rows (256 KB and 64 KB a group here, read by both passes) were not kept ahead by
  the hardware either.
Groups larger than 32 rows (``q4f16t-g128``) would read 128 rows at once and stay with
``int4_gemv_vnni.py``.

Numerically: ``P`` is exact (``|P| <= 32 * 15 * 16383 < 2**24``) and so is ``P - z * A``.
The activations' rounding is at most ``m / 32766`` an element, 1/16 of half an fp16 ulp of
the group's largest (``int4_gemv_vnni.py``: 1/32). fp32 compute (``q4f32t``) keeps the exact
kernel of ``int4_gemv.py``; ``tests/test_cpu_int4_gemv.py`` checks this kernel against
numpy's computation of the same rounding and against the exact product within its bound.

Loop nest::

    parallel band                            # a band of whole groups per core
      for g in the band
        a = round(x * L / m); hi, lo bytes of 4 rows packed in an int32 each
        for passes (one; groups over 256 KB: two of 16 rows), A = the pass's sum of a
          for strips of 16 words
            16 accumulators <- 0
            for the pass's rows, 4 at a time (unrolled)
              prefetch 4 lines: the next group's rows in 4 streams (wide: 8 strips on)
              load 4 rows, 8 unpacks, 8 nibble registers x (hi, lo): 16 vpdpbusd
            (wide: prefetch the scales and zero points 8 strips on)
            y_band[nibble register, strip] += s * m/L * (128 * P_hi + P_lo - z * A)
    parallel strip                           # the bands' y summed, put in column order
      out[strip's columns] = y at each column's register and lane

Measured on this CPU (2 cores of an AMD EPYC (Zen 4) with AVX-512 VNNI; each GEMV alone,
weights cycled through 384 MB of copies, the two kernels timed alternately, best of 6
rounds), ``int4_gemv_vnni.py`` -> this kernel: ``2048 x 16384`` 1.23 -> 1.03 ms, ``8192 x
2048`` 0.70 -> 0.55, ``2048 x 3072`` 0.29 -> 0.19, ``2048 x 2048`` 0.19 -> 0.16, ``2048 x
128256`` 8.8 -> 6.5 ms. Without the prefetch the narrow ones were slower than before
(``8192 x 2048``: 1.26 ms); with groups of 128 rows, 1.3-1.7x slower. Rounding the
activations in vectors (``round_group``) and putting the columns in order in parallel made
it 5-10% faster from L3 (``2048 x 16384`` 0.48 -> 0.43 ms, ``8192 x 2048`` 0.18 -> 0.16 ms)
and left it as it was from DRAM: 26-29 GB/s there, where a plain 2-thread read of the same
matrix in order reaches 26-28 GB/s and in this kernel's order (32 rows at once, no
prefetch) 17-25 GB/s.

On an Intel Xeon with AMX (2 vCPUs, which LLVM takes for a Rocket Lake; same method, 300
calls a variant, variants alternating) the prefetch matters as much: without it the
Llama-3.2-1B shapes take 26-40% longer (``8192 x 2048`` 0.58 -> 0.80 ms); 4, 8 or 16 strips
ahead are within 3% of each other; into L1 the narrow shapes take 10-13% longer, and
non-temporal 2-4x. With half the dot products (the high bytes' only: wrong sums, timed)
the DRAM times stay within 3% (from cache 5-13% faster): here too the kernel waits on its
reads, not on its arithmetic, so 8-bit activations (one ``vpdpbusd`` per 4 weights, as
llama.cpp's Q4_0 x Q8_0) would not make decode faster. From DRAM ``2048 x 16384`` reads at
18.5-19.6 GB/s and the narrow ``2048 x 2048``, ``2048 x 3072`` and ``8192 x 2048`` at 15-16.5,
against 21 GB/s for a plain 2-thread read (10.8 on one thread) and 35-40 GB/s for this
kernel from cache. A plain read of 1 KB rows in this kernel's order reached 17-19 GB/s, in
page order (the 4 rows of a 4 KB page one after another: one forward stream a page, what
Intel's L2 streamer follows) 22-25; but this kernel in page order (a strip's sums kept in
memory between the passes) measured the same as in strip order, so it was not kept. A
tiled layout (a group's 32 rows of a strip stored together: one forward stream a core),
timed by reading the words at those addresses (wrong sums), with the prefetch 8 tiles on:
``2048 x 3072`` 0.21 -> 0.18 ms, ``2048 x 2048`` 0.15 -> 0.13, ``8192 x 2048`` 0.66 -> 0.55,
``2048 x 16384`` unchanged (1.09 -> 1.10); a Llama-3.2-1B layer 7% faster, not enough to
reach llama.cpp's decode here, and without the prefetch slower than this kernel.

All the Intel figures above are of the kernel before it read the next group's rows ahead
whole (each row's words 8 strips on; rows of at most 16 strips the next group's same
strip). That change, same method (7 rounds, the two kernels alternating, best round):
``2048 x 3072`` 0.232 -> 0.184 ms, ``2048 x 2048`` 0.190 -> 0.144, ``8192 x 2048`` 0.675 ->
0.515, ``2048 x 16384`` 1.12 -> 1.07, the output layer unchanged (its rows keep the old
prefetch); a Llama-3.2-1B layer 2.22 -> 1.91 ms. In 1, 2, 4 or 8 streams, ``2048 x 2048``
took 0.158, 0.149, 0.144 and 0.151 ms, ``8192 x 2048`` 0.714, 0.587, 0.575 and 0.567.
Passes of 16 rows (wide groups only) then took the output layer ``2048 x 128256`` from
6.90 to 6.62 ms and 7.13 to 6.36 in two runs.

What limits the layers now is this order of reads, not the arithmetic. The same loads
and prefetches without the arithmetic (a C loop, 2 threads, 700 MB of copies) read ``2048
x 16384`` at 20-26 GB/s and ``8192 x 2048`` at 24-26, where each thread's share read as 4
contiguous streams (no software prefetch) reached 26-29 GB/s in the same minutes (paired:
0.76-1.01, median 0.86); the kernel runs at about its loop's speed (one thread: ``2048 x
16384`` 11.4-12.7 GB/s against 12.4, ``8192 x 2048`` 12.4 against 12.7). The loop in
address order instead of 32 rows at once, 8 or 16 prefetch streams, or a strip's ``y``
kept in L1 changed nothing measurable. llama.cpp's Q4_0 decode here reads a repacked
layout (16 columns x 32 rows and their 16 scales in 288 contiguous bytes, 4 such column
tiles at once: 4 forward streams, no software prefetch), the order the plain read above
times: a tile layout for the CPU is what would close that gap. The output layer was the
exception: its loop (16 rows a pass, each row read ahead 8 strips on) reads at 28-30 GB/s
in C, the kernel read at 21-23 (6.8-7.1 ms), and with no scales or zero points read (the
first group's in L1 for all: wrong sums) took 5.7. Read 8 strips ahead like the rows'
words, they took it from 6.73 and 6.77 to 6.02 and 6.04 ms (two runs, old and new kernel
alternating, median of 7; the layers unchanged). The same prefetch of the next group's
scales did nothing for the layers read ahead whole.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.target import Target

from mlc_edge.quantization.int4 import AWQ_PACK_ORDER

from .int4_gemv import nibble_of_column
from .int4_gemv_vnni import (
    LANES,
    columns_in_order,
    fp16_decode_operands,
    hand_written,
    round_group,
    with_gemv_signature,
)
from .matmul_kn import CPURule

VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
LEVEL = 16383  # activations in 15 bits: two signed bytes, 128 * hi + lo with lo >= 0
PREFETCH_STRIPS = 8  # rows read ahead one by one: this many strips on
# A group's rows of at most this many bytes: the next group's are read ahead whole, in
# PREFETCH_STREAMS forward streams (module docstring)
WHOLE_GROUP_AHEAD_BYTES = 256 * 1024
PREFETCH_STREAMS = 4
MAX_GROUP = 32
WIDE_PASS_ROWS = 16  # wider groups are read in passes of this many rows (module docstring)


def _unpack(a: tirx.PrimExpr, b: tirx.PrimExpr, bits: int, high: int) -> tirx.PrimExpr:
    """``vpunpck{l,h}{bw,wd}`` of two int32x16 registers, as an int32x16: in each 128-bit
    lane, the low (``high`` 0) or high half's ``bits``-wide elements of ``a`` and ``b``
    interleaved."""
    per_lane = 128 // bits
    dtype = f"int{bits}x{512 // bits}"
    half = per_lane // 2
    indices = []
    for lane in range(4):
        for t in range(half):
            src = per_lane * lane + half * high + t
            indices += [src, 512 // bits + src]
    both = [T.reinterpret(dtype, a), T.reinterpret(dtype, b)]
    return T.reinterpret("int32x16", tirx.Shuffle(both, indices))


def to_l2(buf: tirx.Buffer, row: Any, col: Any) -> tirx.PrimExpr:
    """A prefetch of ``buf[row, col]``'s line into L2: read (0), keep in L2 (2), data (1)."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buf[row, col]), 0, 2, 1)


def prefetch_word(k0: Any, s: Any, step: Any, size: int, strips: int, whole_group: bool) -> Any:
    """The ``(row, column)`` of ``qweight`` that prefetch ``step`` (0..size-1) of strip
    ``s`` of the group at row ``k0`` reads ahead (integers or TIR expressions).
    ``whole_group``: line ``next_group_line`` of the next group's rows in address order.
    Otherwise its row's words ``PREFETCH_STRIPS`` strips on, past a row's end the next
    group's."""
    if whole_group:
        line = next_group_line(step, s, strips, size)
        return k0 + size + line // strips, (line % strips) * LANES
    groups_on, strip = strip_ahead(s, strips)
    return k0 + size * groups_on + step, strip * LANES


def strip_ahead(s: Any, strips: int) -> tuple[Any, Any]:
    """Where the strip ``PREFETCH_STRIPS`` strips on from strip ``s`` is: ``(groups on,
    strip)``, past a row's end the next group's. Wide groups read their rows' words and
    their scales and zero points that far ahead."""
    ahead = s + PREFETCH_STRIPS
    return ahead // strips, ahead % strips


def scales_ahead(g: Any, p: Any, s: Any, strips: int, passes: int) -> tuple[Any, Any]:
    """``(group, strip)`` of the scales and zero points that strip ``s`` of pass ``p`` of
    wide group ``g`` reads ahead: those of the rows whose words it prefetches
    (``prefetch_word`` sees a pass as a group: past a row's end, the next pass's rows,
    which are the next group's only after the last pass)."""
    passes_on, strip = strip_ahead(s, strips)
    return g + (p + passes_on) // passes, strip


def next_group_line(step: Any, s: Any, strips: int, size: int) -> Any:
    """Which line (16 words) of the next group's ``size * strips``, in address order,
    prefetch ``step`` of strip ``s`` reads: the lines are ``PREFETCH_STREAMS`` forward
    streams, each a run of the group's rows, of which each strip reads ``size /
    PREFETCH_STREAMS`` lines; the group's ``strips`` strips read every line once."""
    per = size // PREFETCH_STREAMS
    return (step // per) * (per * strips) + s * per + step % per


def _column_slot(c: tirx.PrimExpr) -> tirx.PrimExpr:
    """Where column ``c`` of a strip (0..127) sits among its 8 nibble registers of 16 lanes:
    word ``w = c // 8``, nibble ``j = 4 (c % 2) + (c % 8) // 2`` (the inverse of
    ``AWQ_PACK_ORDER``) is at register ``2 (w % 4) + j % 2``, lane ``4 (w // 4) + j // 2``."""
    j = nibble_of_column(c)
    return (2 * ((c // 8) % 4) + j % 2) * LANES + 4 * (c // 32) + j // 2


def vnni_bytes_gemv(
    x_shape: list[int], k: int, words: int, groups: int, bands: int, out_dtype: str
) -> tirx.PrimFunc:
    """The kernel (module docstring) with parameters ``x, qweight, qzeros, scales, out``."""
    size = k // groups
    strips = words // LANES
    quads = size // 4
    per_band = groups // bands
    whole_group_ahead = size * words * 4 <= WHOLE_GROUP_AHEAD_BYTES
    rows = size if whole_group_ahead else min(WIDE_PASS_ROWS, size)  # a pass's
    passes = size // rows

    # Prefetches see each pass's rows as a group (its rows, the next pass's rows ahead).
    def prefetch(qweight: tirx.Buffer, k0: Any, s: Any, step: Any) -> tirx.PrimExpr:
        return to_l2(qweight, *prefetch_word(k0, s, step, rows, strips, whole_group_ahead))

    def prefetch_reads(k0: Any, s: Any) -> Any:
        # a strip's prefetches fall in one group, which exists where step 0's row does
        return prefetch_word(k0, s, 0, rows, strips, whole_group_ahead)[0] < k

    def vec(c: int) -> tirx.PrimExpr:
        return T.broadcast(T.int32(c), LANES)

    def dot(acc: tirx.PrimExpr, nibbles: tirx.PrimExpr, act: tirx.PrimExpr) -> tirx.PrimExpr:
        return T.call_llvm_pure_intrin(
            "int32x16",
            VPDPBUSD,
            acc,
            T.reinterpret("int8x64", nibbles),
            T.reinterpret("int8x64", T.broadcast(act, LANES)),
        )

    def scale_lanes(r: int) -> list[int]:
        # lane 4L + i of nibble register r = 2u + h: word 4L + u of the strip, nibble 2i + h
        u, h = divmod(r, 2)
        # (nibble j of a word holds column AWQ_PACK_ORDER[j] of its 8)
        return [
            32 * lane + 8 * u + AWQ_PACK_ORDER[2 * i + h] for lane in range(4) for i in range(4)
        ]

    def zero_point(words_z: tirx.PrimExpr, r: int) -> tirx.PrimExpr:
        u, h = divmod(r, 2)
        word = tirx.Shuffle([words_z], [4 * lane + u for lane in range(4) for i in range(4)])
        shift = ((T.ramp(T.int32(0), 1, LANES) & vec(3)) << vec(3)) + vec(4 * h)  # 4 (2i + h)
        return (word >> shift) & vec(15)

    @T.macro
    def accumulate(acc_hi, acc_lo, u, reg, act_hi, act_lo):
        low: T.let[T.int32x16] = u & vec(0x0F0F0F0F)
        high: T.let[T.int32x16] = (u >> vec(4)) & vec(0x0F0F0F0F)
        acc_hi[T.ramp(2 * reg * LANES, 1, LANES)] = dot(
            acc_hi[T.ramp(2 * reg * LANES, 1, LANES)], low, act_hi
        )
        acc_lo[T.ramp(2 * reg * LANES, 1, LANES)] = dot(
            acc_lo[T.ramp(2 * reg * LANES, 1, LANES)], low, act_lo
        )
        acc_hi[T.ramp((2 * reg + 1) * LANES, 1, LANES)] = dot(
            acc_hi[T.ramp((2 * reg + 1) * LANES, 1, LANES)], high, act_hi
        )
        acc_lo[T.ramp((2 * reg + 1) * LANES, 1, LANES)] = dot(
            acc_lo[T.ramp((2 * reg + 1) * LANES, 1, LANES)], high, act_lo
        )

    @T.macro
    def fold(y_band, band, s, acc_hi, acc_lo, strip_scales, words_z, unit, a_sum, r):
        # the strip's 128 scales (4 registers) shuffled into register r's lanes
        scale: T.let[T.float32x16] = T.Cast(
            "float32x16", tirx.Shuffle(strip_scales, scale_lanes(r))
        )
        y_band[band, r, T.ramp(s * LANES, 1, LANES)] = y_band[
            band, r, T.ramp(s * LANES, 1, LANES)
        ] + scale * T.broadcast(unit, LANES) * T.Cast(
            "float32x16",
            (acc_hi[T.ramp(r * LANES, 1, LANES)] << vec(7))
            + acc_lo[T.ramp(r * LANES, 1, LANES)]
            - zero_point(words_z, r) * T.broadcast(a_sum, LANES),
        )

    @T.macro
    def body(x_row, qweight, qzeros, scales, out_row):
        y_band = T.alloc_buffer((bands, 8, words), "float32")
        for band in T.parallel(bands):
            # Per-core buffers under TVM's 1 KB stack limit (else a workspace call, and
            # LLVM keeps storing the accumulators): global scope, docs/tvm-0.27.md.
            a = T.alloc_buffer((size,), "int32")
            act_hi = T.alloc_buffer((quads,), "int32")
            act_lo = T.alloc_buffer((quads,), "int32")
            stats = T.alloc_buffer((2,), "float32")  # m, L / m
            a_part = T.alloc_buffer((passes,), "int32")  # each pass's sum of activations, A
            acc_hi = T.alloc_buffer((8 * LANES,), "int32")
            acc_lo = T.alloc_buffer((8 * LANES,), "int32")
            for r, w in T.grid(8, words):
                y_band[band, r, w] = T.float32(0)
            for gi in range(per_band):
                g: T.let[T.int32] = band * per_band + gi
                k0: T.let[T.int32] = g * size
                round_group(x_row, k0, size, LEVEL, a, stats, a_part, passes)
                # byte b of act_*[q] is row 4q + b: each int32 lane truncated to its byte
                for v in T.unroll(size // LANES):
                    act_hi[T.ramp(v * 4, 1, 4)] = T.reinterpret(
                        "int32x4", T.Cast("int8x16", a[T.ramp(v * LANES, 1, LANES)] >> vec(7))
                    )
                    act_lo[T.ramp(v * 4, 1, 4)] = T.reinterpret(
                        "int32x4", T.Cast("int8x16", a[T.ramp(v * LANES, 1, LANES)] & vec(127))
                    )
                unit: T.let[T.float32] = stats[0] / T.float32(LEVEL)
                for p, s in T.grid(passes, strips):
                    kp: T.let[T.int32] = k0 + p * rows  # the pass's first row
                    for r in T.unroll(8):
                        acc_hi[T.ramp(r * LANES, 1, LANES)] = vec(0)
                        acc_lo[T.ramp(r * LANES, 1, LANES)] = vec(0)
                    for q in T.unroll(rows // 4):
                        if prefetch_reads(kp, s):
                            for i in T.unroll(4):
                                T.evaluate(prefetch(qweight, kp, s, 4 * q + i))
                        r0: T.let[T.int32x16] = qweight[kp + 4 * q, T.ramp(s * LANES, 1, LANES)]
                        r1: T.let[T.int32x16] = qweight[kp + 4 * q + 1, T.ramp(s * LANES, 1, LANES)]
                        r2: T.let[T.int32x16] = qweight[kp + 4 * q + 2, T.ramp(s * LANES, 1, LANES)]
                        r3: T.let[T.int32x16] = qweight[kp + 4 * q + 3, T.ramp(s * LANES, 1, LANES)]
                        # the 4 rows' activation bytes (the group's quad p * rows / 4 + q)
                        hi: T.let[T.int32] = act_hi[p * (rows // 4) + q]
                        lo: T.let[T.int32] = act_lo[p * (rows // 4) + q]
                        # bytes of rows 0/1 and 2/3 paired, then the pairs paired
                        p01_lo: T.let[T.int32x16] = _unpack(r0, r1, 8, 0)
                        p01_hi: T.let[T.int32x16] = _unpack(r0, r1, 8, 1)
                        p23_lo: T.let[T.int32x16] = _unpack(r2, r3, 8, 0)
                        p23_hi: T.let[T.int32x16] = _unpack(r2, r3, 8, 1)
                        accumulate(acc_hi, acc_lo, _unpack(p01_lo, p23_lo, 16, 0), 0, hi, lo)
                        accumulate(acc_hi, acc_lo, _unpack(p01_lo, p23_lo, 16, 1), 1, hi, lo)
                        accumulate(acc_hi, acc_lo, _unpack(p01_hi, p23_hi, 16, 0), 2, hi, lo)
                        accumulate(acc_hi, acc_lo, _unpack(p01_hi, p23_hi, 16, 1), 3, hi, lo)
                    if not whole_group_ahead:
                        # wide rows: the scales and zero points too, as the rows' words
                        g_on: T.let[T.int32] = scales_ahead(g, p, s, strips, passes)[0]
                        s_on: T.let[T.int32] = scales_ahead(g, p, s, strips, passes)[1]
                        if g_on < groups:
                            for i in T.unroll(4):  # a strip's 128 scales: 4 lines
                                T.evaluate(to_l2(scales, g_on, s_on * 128 + 32 * i))
                            T.evaluate(to_l2(qzeros, g_on, s_on * LANES))
                    words_z: T.let[T.int32x16] = qzeros[g, T.ramp(s * LANES, 1, LANES)]
                    sc0: T.let[T.float16x32] = scales[g, T.ramp(s * 128, 1, 32)]
                    sc1: T.let[T.float16x32] = scales[g, T.ramp(s * 128 + 32, 1, 32)]
                    sc2: T.let[T.float16x32] = scales[g, T.ramp(s * 128 + 64, 1, 32)]
                    sc3: T.let[T.float16x32] = scales[g, T.ramp(s * 128 + 96, 1, 32)]
                    # eight calls: a register's scale and zero point lanes are Python lists
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 0,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 1,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 2,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 3,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 4,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 5,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 6,
                    )  # fmt: skip
                    fold(
                        y_band, band, s, acc_hi, acc_lo, [sc0, sc1, sc2, sc3], words_z, unit,
                        a_part[p], 7,
                    )  # fmt: skip
        columns_in_order(y_band, out_row, strips, bands, out_dtype, _column_slot, LANES)

    return with_gemv_signature(body, x_shape, k, words, groups, out_dtype)


class Int4DecodeGEMVVNNIBytes(CPURule):
    """The byte-dot-product 4-bit GEMV (module docstring) for fp16 fused dequantize + matmul
    functions with one activation row and groups of 16 or 32 rows, on targets with
    AVX-512 VNNI; other functions and targets: None."""

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        ops = fp16_decode_operands(func, target)
        if ops is None:
            return None
        k, words = (int(d) for d in ops["qweight"].shape)
        size = k // int(ops["qzeros"].shape[0])
        if words % LANES or size > MAX_GROUP or size % WIDE_PASS_ROWS:
            return None
        return hand_written(func, ops, target, vnni_bytes_gemv)
