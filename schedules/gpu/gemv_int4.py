"""Decode GEMV with 4-bit weights, the dequantization fused: ``[b, 1, K] x W[K, N]``.

The weight is ``mlc_edge.quantization.int4``'s layout (AutoAWQ's GEMM format):
``qweight`` int32 ``[K, N/8]`` (8 columns a word, nibble order 0,2,4,6,1,3,5,7),
``qzeros`` int32 ``[K/g, N/8]``, ``scales`` ``[K/g, N]``, ``W = (q - z) * s``.
``FuseInt4Matmul`` hands this rule one PrimFunc: a ``dequantize_int4`` block writing
``[K, N]`` fp32, the activations' fp16 -> fp32 copy, the fp32 matmul, the rounding back.
Loop nest (TX * TY threads in one work-group dimension, U = unroll)::

    blockIdx.y  b                            # one row of work-groups per sequence
    blockIdx.x  n tiles of TX * 8 columns
      threadIdx.x = ty * TX + tx             # TY threads share each group's rows
        part[8] = 0                          # fp32, registers
        a[K] = A[row, :]                     # local memory, once a work-group (if it fits)
        for grp in groups ty, ty + TY, ...   # whole groups per thread
          z = qzeros[grp, word]              # one word: 8 zero points
          s[8] = scales[grp, n:n+8]          # one vector load
          for k_o in g / U
            a_u[U] = a[k:k+U]                # registers
            for k_u in U (unrolled)          # k = grp * g + k_o * U + k_u
              q = qweight[k, word]           # one 32-bit word: 8 weights, registers
              for j in 8 (unrolled)          # shift 16 * (j & 1) + 4 * (j >> 1)
                part[j] += f32(A[k]) * f32(((q >> shift) & 15) - ((z >> shift) & 15)) * f32(s[j])
        local[ty, tx * 8 : tx * 8 + 8] = part
        each thread: 8 / TY columns, the sum of their TY partials, rounded once, stored

Neighbouring threads read neighbouring words of one row of ``qweight`` (coalesced); every
word, zero word and scale is read once per work-group. The dequantized weight never
leaves registers (``RequireFusedDequantize`` checks no buffer holds it). TY is a power of
two dividing 8 and the number of groups, so each group is one thread's and the final sum
gives every thread whole columns. ``tuning.json``'s ``gemv_int4`` section holds TX, TY and U.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.target import Target

from mlc_edge.quantization.int4 import DEQUANTIZE_NAME

from ..kn_pattern import largest_divisor, the_reduction
from .common import (
    KNMatmulRule,
    is_decode_shaped,
    pick_vector,
    static_int,
    sum_column_partials,
)
from .gemv_nk import _loops_below, local_memory_budget
from .tuning import GemvInt4Tuning

WORD = 8  # 4-bit values in one int32 word: the columns one lane owns


class Int4Parts:
    """The packed tensors a ``dequantize_int4`` block reads, and the group size."""

    def __init__(self, block: s_tir.SBlock):
        ints = [r.source for r in block.reads if str(r.source.dtype) == "int32"]
        floats = [r.source for r in block.reads if str(r.source.dtype) != "int32"]
        if len(ints) != 2 or len(floats) != 1:
            raise ValueError("not a dequantize_int4 block")
        ints.sort(key=lambda buf: -int(buf.shape[0]))
        self.qweight, self.qzeros = ints
        self.scales = floats[0]
        k, groups = int(self.qweight.shape[0]), int(self.qzeros.shape[0])
        if k % groups:
            raise ValueError("groups do not divide K")
        self.group_size = k // groups


class Int4MatmulRule(KNMatmulRule):
    """A rule for the PrimFuncs ``FuseInt4Matmul`` makes: finds their one
    ``dequantize_int4`` block and its packed tensors and hands them to ``schedule_int4``;
    a primitive refusing an unexpected variant passes the function to the next rule."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            dequantize = [b for b in blocks if sch.get(b).name_hint.startswith(DEQUANTIZE_NAME)]
            if len(dequantize) != 1:
                return None
            (deq,) = dequantize
            return self.schedule_int4(sch, deq, Int4Parts(sch.get(deq)), target)
        except (s_tir.schedule.ScheduleError, ValueError):
            return None

    def schedule_int4(
        self, sch: s_tir.Schedule, deq: s_tir.schedule.SBlockRV, parts: Int4Parts, target: Target
    ) -> s_tir.Schedule | None:
        raise NotImplementedError


class GemvInt4KN(Int4MatmulRule):
    """Decode-shaped fused 4-bit matmuls (``[1, 1, K]`` or ``[b, 1, K]`` rows)."""

    rule_name = "adreno.gemv_int4"
    decode_shaped = True

    def schedule_int4(
        self, sch: s_tir.Schedule, deq: s_tir.schedule.SBlockRV, parts: Int4Parts, target: Target
    ) -> s_tir.Schedule | None:
        sch.compute_inline(deq)
        infos = normalize_prim_func(sch)
        infos = infos and try_inline_contiguous_spatial(sch, infos)
        if not infos:
            return None
        r = the_reduction(infos)
        if r is None:
            return None
        block = infos[r].block_rv
        epilogues = [info.block_rv for info in infos[r + 1 :]]
        if not is_decode_shaped(sch.get(block)):
            return None
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in iters]
        if (
            len(loops) != len(iters)
            or kinds[-1] != tirx.IterVar.CommReduce
            or tirx.IterVar.CommReduce in kinds[:-1]
        ):
            return None
        n_ext, k_ext = static_int(iters[-2].dom.extent), static_int(iters[-1].dom.extent)
        group = parts.group_size
        if n_ext is None or k_ext is None or n_ext % WORD or k_ext % group:
            return None
        if str(sch.get(block).body.buffer.dtype) != "float32":
            return None  # Int4KNLinear accumulates in fp32; anything else is not ours

        t: GemvInt4Tuning = self.tuning.gemv_int4
        threads = self.threads(target)
        # K is split across ty threads by whole groups (each group's zero word and scales
        # are then read by one thread only): ty divides the number of groups and 8.
        ty = pick_vector(k_ext // group, min(t.threads_k, WORD, threads))
        tx = min(t.threads_n, n_ext // WORD, max(1, threads // ty))
        unroll = largest_divisor(group, t.unroll_k)

        *m_loops, n_loop, k_loop = loops
        m_loop = (
            sch.fuse(*m_loops)
            if len(m_loops) > 1
            else (m_loops[0] if m_loops else sch.add_unit_loop(n_loop))
        )
        writeback = sch.cache_write(block, 0, "local")

        n_g, n_w = sch.split(n_loop, [None, WORD])
        n_o, n_t = sch.split(n_g, [None, tx])
        k_grp, k_t, k_o, k_u = sch.split(k_loop, [None, ty, group // unroll, unroll])
        sch.reorder(m_loop, n_o, n_t, k_t, k_grp, k_o, k_u, n_w)
        rf = sch.rfactor(k_t, 0)
        sch.set_scope(rf, 0, "shared")
        part, store = rf, sch.cache_write(rf, 0, "local")

        m_r, n_or, n_tr, k_tr, k_gr, k_or, k_ur, n_wr = sch.get_loops(part)[-8:]
        sch.reorder(k_tr, n_tr)
        sch.bind(m_r, "blockIdx.y")
        sch.bind(n_or, "blockIdx.x")
        thread = sch.fuse(k_tr, n_tr)
        sch.bind(thread, "threadIdx.x")
        # The packed operands in registers: the group's zero word and 8 scales once a
        # group, one weight word a row; the 8 columns unpacked from them unrolled.
        for buf, at, vector in (
            (parts.qzeros, k_gr, False),
            (parts.scales, k_gr, True),
            (parts.qweight, k_ur, False),
        ):
            index = [r.source.same_as(buf) for r in sch.get(part).reads].index(True)
            cached = sch.cache_read(part, index, "local")
            sch.compute_at(cached, at, preserve_unit_loops=True)
            if vector:
                sch.vectorize(sch.get_loops(cached)[-1])
        # The activation row: copied once per work-group into local memory where it fits
        # (else each of the TX lanes of a K range reads it from global memory: half the
        # bytes of the words again), then a thread's U rows in one vector load a step.
        packed = (parts.qweight, parts.qzeros, parts.scales)
        reads = [r.source for r in sch.get(part).reads]
        index = next(
            i
            for i, buf in enumerate(reads)
            if buf.scope() == "global" and not any(buf.same_as(p) for p in packed)
        )
        a_bytes = k_ext * reads[index].dtype.bits // 8
        partials = ty * tx * WORD * 4
        if a_bytes + partials <= local_memory_budget(target, self.tuning.local_memory_bytes):
            staged = sch.cache_read(part, index, "shared")
            sch.compute_at(staged, n_or, preserve_unit_loops=True)
            fetch = sch.fuse(*_loops_below(sch, staged, n_or))
            _, fetch_t, fetch_v = sch.split(fetch, [None, tx * ty, unroll])
            sch.bind(fetch_t, "threadIdx.x")
            sch.vectorize(fetch_v)
            index = [
                r.source.same_as(sch.get(staged).writes[0].source) for r in sch.get(part).reads
            ].index(True)
        cached = sch.cache_read(part, index, "local")
        sch.compute_at(cached, k_or, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(cached)[-1])
        sch.unroll(k_ur)
        sch.unroll(n_wr)
        init = sch.decompose_reduction(part, k_gr)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.reverse_compute_at(store, thread, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(store)[-1])

        # Sum of the TY partials of each column, one column per thread.
        sum_column_partials(sch, block, n_or, tx * WORD, tx * ty, writeback, epilogues)
        self.mark(sch, part)
        return sch
