"""The CPU rule for 4-bit decode GEMVs: the matmul rewritten per group, the words unpacked
by mask alone.

A decode step multiplies one activation row by every 4-bit weight, so its time is the
packed words' bytes if the unpacking keeps up. Written as ``Int4KNLinear`` defines it,
``sum_k x[k] * (q[k, n] - z[g, n]) * s[g, n]``, each weight costs a shift, a mask, a
zero-point subtraction, a conversion, a scale and an FMA: on this AVX-512 CPU that was
compute-bound, 4.5 ms for a Llama-3.2-1B layer whose bytes take about 1.4 ms to read.
The zero point and the scale are constant over a group of ``g`` rows, so this rule
computes the same sum as

    y[n] = sum_g s[g, n] * (P[g, n] - z[g, n] * X[g])
    P[g, n] = sum_{k in g} x[k] * q[k, n]        X[g] = sum_{k in g} x[k]

and keeps ``P`` in nibble order: the vector loop runs over consecutive *words* (16 on
AVX-512), and nibble ``j`` of every word is one register, ``w & (0xF << 4j)`` converted to
fp32, which is ``q * 16**j`` exactly; the ``16**-j`` goes into the group's scale. So a
weight costs a mask, a conversion and an FMA. Once per group the scales (read at stride 8:
the columns of nibble ``j``; staged per strip by a loop LLVM turns into whole loads and
``vpermt2w`` shuffles), zero points and ``X`` fold ``P`` into ``y``; a last loop writes
``y`` back in column order (AWQ's nibble order, ``mlc_edge.quantization.int4``).

Every product ``x * q`` is exact in fp32 as before; only the order of the fp32 sums
differs from the direct form (``tests/test_cpu_int4_gemv.py`` checks both dtypes against
numpy, and the model tests against transformers). Loop nest::

    parallel band                       # a band of whole groups per core: contiguous rows
      for g in the band
        for b in 0 .. size/8             # 8 rows of the group at a time, size/8 apart:
          for strips of words            #   rows b, b + size/8, ..., b + 7 size/8
            for the 8 rows
              for j unroll 8, w vectorized 16
                P[j, w] += x[k] * cvt(word & mask_j)   (P of the strip in registers)
        for strips                       # y_band += s * (P / 16**j - z * X)
          stage s[j, w] (fp32)
          for j unroll, w vectorized 16
    y = sum of the bands; out[n] = y[nibble of n, n // 8]

Why 8 rows ``size / 8`` apart (``size``: the group's rows): one core keeps about eight
cache lines in flight from its own instruction window; reading 8 rows at once gives the
hardware 8 streams to prefetch, and rows that far apart make each stream run on through
consecutive rows (the next ``b``) instead of ending at a row's end. Measured on this CPU
(2 cores; each GEMV alone, weights cycled through copies larger than the caches; two
builds in one process timed alternately, best of 30), against the earlier order (rows up
to 512 words one at a time with P in L1, longer ones 8 consecutive rows at a time):
``2048 x 2048`` 0.25 -> 0.17 ms, ``2048 x 3072`` 0.24 -> 0.19, ``2048 x 16384`` 0.94 -> 0.87,
``2048 x 128256`` 6.5 -> 6.0; ``8192 x 2048`` 0.54-0.65 ms either way (it varies more
between runs than between the two). 4 rows at once were no better, 16 slower (1.2-1.5x:
registers), and so was holding P of a strip in registers over the whole group (32 streams:
1.6-2.3x slower). Staging the scales made the L3-resident GEMV 10% faster and changed
little from DRAM. Huge pages (the loaded weights collapsed with ``MADV_COLLAPSE``) took a
plain 2-thread read of 1 GB from 32 to 59 GB/s, but a 16-layer ``q4f16t`` decode step
only from 37.6-38.8 to 36.2-38.2 ms (two runs each) at 2 s more loading per GB: the GEMV is
bound by its unpacking, not the TLB, so the engine does not ask for them.

Only functions with one activation row (the ``decode`` functions) are taken; prefill and
batch decode share each unpacked word among rows and are ``Int4Matmul``'s (``int4.py``).
"""

from __future__ import annotations

from tvm import s_tir, te, tirx
from tvm.target import Target

from mlc_edge.quantization.int4 import AWQ_NIBBLE_OF_COLUMN, AWQ_PACK_ORDER, Int4Layout

from .int4 import dequantize_blocks
from .matmul_kn import CPURule, _num_cores, vector_bytes


def nibble_of_column(c: tirx.PrimExpr) -> tirx.PrimExpr:
    """The nibble of its word that holds column ``c``: ``4 (c % 2) + (c % 8) // 2``, the
    inverse of ``AWQ_PACK_ORDER`` (an expression: the kernels' column loops are TIR)."""
    column = c % 8
    return 4 * (column % 2) + column // 2


# nibble j of a word holds column 2 * (j % 4) + j // 4 of its 8, and nibble_of_column is
# its inverse: AWQ's order (checked against the tables at import; on Python ints the
# expression evaluates as well).
assert all(2 * (j % 4) + j // 4 == c for j, c in enumerate(AWQ_PACK_ORDER))
assert all(nibble_of_column(c) == j for c, j in enumerate(AWQ_NIBBLE_OF_COLUMN))


def _int(value: tirx.PrimExpr) -> int | None:
    return int(value) if isinstance(value, tirx.IntImm) else None


def _decode_operands(func: tirx.PrimFunc, tiles: bool = False) -> dict[str, tirx.Buffer] | None:
    """The fused 4-bit matmul's buffers by role (x, qweight, qzeros, scales, out) when
    ``func`` is one with a single activation row and static shapes; else None. A
    ``qweight`` in CPU tiles (``mlc_edge.quantization.int4``) only with ``tiles``."""
    sch = s_tir.Schedule(func)
    dequantize = [sch.get(b) for b in dequantize_blocks(sch)]
    if len(dequantize) != 1:
        return None
    reads = [r.source for r in dequantize[0].reads]
    params = list(func.params)  # TVM 0.27: a PrimFunc's parameters are its buffers
    if (
        len(reads) != 3
        or len(params) != 5
        or not all(any(p.same_as(r) for p in params) for r in reads)
    ):
        return None
    qweight, qzeros, scales = reads
    others = [p for p in params if not any(p.same_as(r) for r in reads)]
    x, out = others  # FuseTIR puts the inputs first and the result last
    shapes = [[_int(d) for d in b.shape] for b in (x, qweight, qzeros, scales, out)]
    if any(d is None for shape in shapes for d in shape):
        return None
    xs, qws, qzs, ss, outs = shapes
    if len(xs) < 2 or not qzs[0] or xs[-1] % qzs[0] or (len(qws) == 3 and not tiles):
        return None
    k, words = xs[-1], qzs[1]
    # qweight in rows or in tiles: the shape the layout stores for this K and N
    layout = Int4Layout(k // qzs[0], tiles=len(qws) == 3)
    if (
        qweight.dtype != "int32"
        or qzeros.dtype != "int32"
        or any(d != 1 for d in xs[:-1])
        or outs[:-1] != xs[:-1]
        or outs[-1] != words * 8
        or tuple(qws) != layout.shapes(k, words * 8)["qweight"]
        or ss != [qzs[0], words * 8]
    ):
        return None
    return {"x": x, "qweight": qweight, "qzeros": qzeros, "scales": scales, "out": out}


def group_sum_gemv(ops: dict[str, tirx.Buffer], order: list[str]) -> tirx.PrimFunc:
    """The decode GEMV in the per-group form (module docstring), parameters in ``order``."""
    x_buf, qw_buf, qz_buf, s_buf, out_buf = (
        ops[r] for r in ("x", "qweight", "qzeros", "scales", "out")
    )
    k, words = (int(d) for d in qw_buf.shape)
    groups = int(qz_buf.shape[0])
    size = k // groups
    lead = len(x_buf.shape) - 1  # the activation's leading axes, all of extent 1
    x = te.placeholder(x_buf.shape, x_buf.dtype, x_buf.name)
    qweight = te.placeholder(qw_buf.shape, "int32", qw_buf.name)
    qzeros = te.placeholder(qz_buf.shape, "int32", qz_buf.name)
    scales = te.placeholder(s_buf.shape, s_buf.dtype, s_buf.name)
    zero = (0,) * lead

    def xf(row: tirx.PrimExpr) -> tirx.PrimExpr:
        return x[(*zero, row)].astype("float32")

    def shift(j: tirx.PrimExpr) -> tirx.PrimExpr:
        return (j * 4).astype("uint32")

    r = te.reduce_axis((0, size), "r")
    # q * 16**j: the nibble masked in place; bit 31 of nibble 7 makes it an unsigned convert.
    part = te.compute(
        (groups, 8, words),
        lambda g, j, w: te.sum(
            xf(g * size + r)
            * (
                qweight[g * size + r, w].astype("uint32") & (tirx.const(15, "uint32") << shift(j))
            ).astype("float32"),
            axis=r,
        ),
        name="group_part",
    )
    r2 = te.reduce_axis((0, size), "r2")
    xsum = te.compute((groups,), lambda g: te.sum(xf(g * size + r2), axis=r2), name="group_xsum")
    gr = te.reduce_axis((0, groups), "gr")

    scale_nib = te.compute(
        (groups, 8, words),
        lambda g, j, w: scales[g, w * 8 + (j % 4) * 2 + j // 4].astype("float32"),
        name="scale_nib",
    )

    def folded(j: tirx.PrimExpr, w: tirx.PrimExpr) -> tirx.PrimExpr:
        scale = scale_nib[gr, j, w]
        zero_point = ((qzeros[gr, w] >> (j * 4).astype("int32")) & 15).astype("float32")
        unit = (tirx.const(1, "uint32") << shift(j)).astype("float32")  # 16**j
        return te.sum(scale * (part[gr, j, w] / unit - zero_point * xsum[gr]), axis=gr)

    y = te.compute((8, words), folded, name="group_sum")
    out = te.compute(
        out_buf.shape,
        lambda *i: y[nibble_of_column(i[-1]), i[-1] // 8].astype(out_buf.dtype),
        name="group_sum_out",
    )
    tensors = {"x": x, "qweight": qweight, "qzeros": qzeros, "scales": scales, "out": out}
    return te.create_prim_func([tensors[role] for role in order])


def group_bands(target: Target, groups: int) -> int:
    """Bands of whole groups, one a core: the most cores (at most ``groups``) dividing
    ``groups``."""
    bands = min(_num_cores(target), groups)
    while groups % bands:
        bands -= 1
    return bands


class Int4DecodeGEMV(CPURule):
    """The per-group 4-bit GEMV (module docstring) for fused dequantize + matmul functions
    with one activation row; other functions: None.

    Each core takes a band of whole groups (the rows ``[K / cores * t, K / cores * (t + 1))``)
    and every column, so it streams one contiguous piece of ``qweight``; the cores' partial
    sums are added at the end (``rfactor``). Timed as ``benchmarks/int4_cpu.py --split``
    times a GEMV, on this CPU: splitting the columns instead leaves each core strided
    half-rows, 1.3-2.9x slower from DRAM (2048 x 8192, 8192 x 2048).

    Parameters
    ----------
    strip_rows : int
        Rows read at once (``group / strip_rows`` apart), a strip of each summed in
        registers before the next strip of the same rows; a group size it does not divide
        is read whole.
    """

    def __init__(self, strip_rows: int = 8):
        self.strip_rows = strip_rows

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        ops = _decode_operands(func)
        if ops is None:
            return None
        words = int(ops["qweight"].shape[1])
        groups = int(ops["qzeros"].shape[0])
        lanes = vector_bytes(target) // 4
        while lanes > 1 and words % lanes:
            lanes //= 2
        bands = group_bands(target, groups)
        order = [next(r for r, b in ops.items() if b.same_as(p)) for p in func.params]
        # The original's attributes only: te names its functions "main" (global_symbol),
        # which would clash between the model's many GEMVs.
        rewritten = group_sum_gemv(ops, order).without_attr("global_symbol")
        rewritten = rewritten.with_attrs(func.attrs)
        return self._schedule(s_tir.Schedule(rewritten), lanes, bands)

    def _schedule(self, sch: s_tir.Schedule, lanes: int, bands: int) -> s_tir.Schedule:
        part, xsum, y = (sch.get_sblock(n) for n in ("group_part", "group_xsum", "group_sum"))
        # Each band's partial sums in y_band[band, j, w]; y adds the bands.
        _, _, g = sch.get_loops(y)
        band, g_in = sch.split(g, [bands, None])
        y_band = sch.rfactor(band, 0)
        j, w, band, g_in = sch.get_loops(y_band)
        strip, vec = sch.split(w, [None, lanes])
        sch.reorder(band, g_in, strip, j, vec)
        sch.parallel(band)
        sch.vectorize(vec)
        sch.unroll(j)
        sch.decompose_reduction(y_band, g_in)
        # The strip's scales in nibble order: a serial loop over words reading each word's
        # 8 scales, which LLVM vectorizes with whole loads and shuffles (a vectorized read
        # at stride 8 would be 16 scalar loads and inserts a register).
        stage = sch.get_sblock("scale_nib")
        sch.compute_at(stage, strip)
        sch.set_scope(stage, 0, "local")
        if lanes > 1:  # (one word a strip leaves the stage no loop over words)
            s_j, s_w = sch.get_loops(stage)[-2:]
            sch.reorder(s_w, s_j)
            sch.unroll(s_j)

        # A group's P[j, w] and X, computed where the band's loop reaches the group.
        sch.compute_at(part, g_in)
        sch.compute_at(xsum, g_in)
        sch.set_scope(xsum, 0, "local")
        sch.set_scope(part, 0, "local")
        pj, pw, pr = sch.get_loops(part)[-3:]
        p_strip, p_vec = sch.split(pw, [None, lanes])
        size = int(sch.get(pr).extent)
        rows = self.strip_rows if size % self.strip_rows == 0 else size
        p_row, p_rows = sch.split(pr, [rows, None])  # row = p_row * (size / rows) + p_rows
        sch.reorder(p_rows, p_strip, p_row, pj, p_vec)
        sch.vectorize(p_vec)
        sch.unroll(pj)
        sch.decompose_reduction(part, p_rows)
        # The bands' sum and its write-back in column order stay serial: N * bands adds,
        # less than waking the thread pool twice more for the GEMVs of a layer.
        return sch
