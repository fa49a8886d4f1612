"""Prefill matmul with 4-bit weights, the dequantization fused: ``[1, seq_len, K] x W[K, N]``.

The weight layout and the PrimFunc are those of ``gemv_int4.py``. As in
``prefill_matmul.py`` each thread keeps all R rows of a chunk (``prefill_chunk_size``,
16) for its 8 columns in fp32 registers, so every weight word is read and unpacked once
per chunk (R = rows, T threads, U unroll, g the group size)::

    blockIdx.x  n tiles of T * 8 columns
      threadIdx.x t                          # the 8 columns of word ``bx * T + t``
        for m_o in ceil(seq_len / R)         # one pass for seq_len <= R
          acc[R, 8] = 0                      # fp32 registers
          for grp in K / g
            z = qzeros[grp, word]; s[8] = scales[grp, n:n+8]   # registers, once a group
            for k_o in g / U
              a[R, U] = A[rows, k:k+U]       # registers (rows >= seq_len: the last row)
              for k_u in U (unrolled)
                q = qweight[k, word]         # one 32-bit word, registers
                w[8] = f32((q >> shift) & 15) - f32((z >> shift) & 15)) * f32(s)   # registers
                for r in R (unrolled)
                  acc[r, :] += f32(a[r, k_u]) * w[:]
          for r in R: if row < seq_len: C[row, n:n+8] = fp16(acc[r, :])

The dequantized weights never leave registers (``RequireFusedDequantize`` checks).
Tunables: ``tuning.json``'s ``prefill`` section (rows, threads, unroll_k; the vector is
the word's 8 columns).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ..kn_pattern import fold_epilogues, largest_divisor
from .common import is_decode_shaped, static_int
from .gemv_int4 import WORD, Int4MatmulRule, Int4Parts
from .prefill_matmul import _writes_rows, stage_activation_tile
from .tuning import PrefillTuning


class PrefillInt4KN(Int4MatmulRule):
    """Fused 4-bit matmuls with a token axis of several rows (prefill chunks)."""

    rule_name = "adreno.prefill_int4"
    decode_shaped = False

    def schedule_int4(
        self, sch: s_tir.Schedule, deq: s_tir.schedule.SBlockRV, parts: Int4Parts, target: Target
    ) -> s_tir.Schedule | None:
        consumers = sch.get_consumers(deq)
        if len(consumers) != 1:
            return None
        (block,) = consumers
        # The activations' fp16 -> fp32 copy is read in place.
        for producer in sch.get_producers(block):
            if not sch.get(producer).same_as(sch.get(deq)):
                sch.compute_inline(producer)
        epilogues = []
        tail = block
        while True:
            after = sch.get_consumers(tail)
            if not after:
                break
            if len(after) != 1:
                return None
            tail = after[0]
            epilogues.append(tail)
        body = sch.get(block)
        if is_decode_shaped(body) or str(body.body.buffer.dtype) != "float32":
            return None
        iters = body.iter_vars
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in iters]
        if (
            len(loops) != len(iters)
            or kinds[-1] != tirx.IterVar.CommReduce
            or (tirx.IterVar.CommReduce in kinds[:-1])
        ):
            return None
        n_ext, k_ext = static_int(iters[-2].dom.extent), static_int(iters[-1].dom.extent)
        group = parts.group_size
        if n_ext is None or k_ext is None or n_ext % WORD or k_ext % group:
            return None
        symbolic = [i for i, iv in enumerate(iters[:-2]) if static_int(iv.dom.extent) is None]
        units = [i for i, iv in enumerate(iters[:-2]) if static_int(iv.dom.extent) == 1]
        if len(symbolic) != 1 or len(symbolic) + len(units) != len(iters) - 2:
            return None
        m_pos = symbolic[0]

        t: PrefillTuning = self.tuning.prefill
        threads = self.threads(target)
        rows = t.rows
        tx = min(t.threads, n_ext // WORD, threads)
        unroll = largest_divisor(group, t.unroll_k)

        sch.pad_einsum(block, [rows if i == m_pos else 1 for i in range(len(iters))])
        a_pad = [p for p in sch.get_producers(block) if _writes_rows(sch, p)]
        (writeback,) = sch.get_consumers(block)
        sch.set_scope(block, 0, "local")

        loops = sch.get_loops(block)[-len(iters) :]
        m_loop, n_loop, k_loop = loops[m_pos], loops[-2], loops[-1]
        m_o, m_i = sch.split(m_loop, [None, rows])
        n_g, n_w = sch.split(n_loop, [None, WORD])
        n_o, n_t = sch.split(n_g, [None, tx])
        k_grp, k_o, k_u = sch.split(k_loop, [None, group // unroll, unroll])
        sch.reorder(n_o, n_t, m_o, k_grp, k_o, k_u, m_i, n_w)
        sch.bind(n_o, "blockIdx.x")
        sch.bind(n_t, "threadIdx.x")
        sch.unroll(k_u)
        sch.unroll(m_i)
        sch.vectorize(n_w)
        init = sch.decompose_reduction(block, k_grp)
        sch.unroll(sch.get_loops(init)[-2])
        sch.vectorize(sch.get_loops(init)[-1])

        # The activations' R x U tile, loaded into registers once per k step.
        stage_activation_tile(sch, a_pad, k_o)

        # The word's 8 weights unpacked into registers once for all R rows; the zero word
        # and the 8 scales once a group, the weight word once a row.
        sch.compute_at(deq, k_u, preserve_unit_loops=True)
        sch.set_scope(deq, 0, "local")
        for buf, at, vector in (
            (parts.qzeros, k_grp, False),
            (parts.scales, k_grp, True),
            (parts.qweight, k_u, False),
        ):
            index = [r.source.same_as(buf) for r in sch.get(deq).reads].index(True)
            cached = sch.cache_read(deq, index, "local")
            sch.compute_at(cached, at, preserve_unit_loops=True)
            if vector:
                sch.vectorize(sch.get_loops(cached)[-1])
        sch.unroll(sch.get_loops(deq)[-1])

        remaining = fold_epilogues(sch, epilogues)
        for blk in [writeback, *remaining]:
            sch.reverse_compute_at(blk, m_o, preserve_unit_loops=True)
            w_loops = sch.get_loops(blk)
            sch.unroll(w_loops[-2])
            sch.vectorize(w_loops[-1])
        self.mark(sch, block)
        return sch
