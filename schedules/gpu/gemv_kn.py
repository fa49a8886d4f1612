"""Decode GEMV with the weight stored ``[K, N]``, for GPUs: ``[b, 1, K] x [K, N]``.

Loop nest (V = vector, TX * TY threads in one work-group dimension, U = unroll)::

    blockIdx.y  b                          # one row of work-groups per sequence (batch_decode)
    blockIdx.x  n tiles of TX * V columns
      threadIdx.x = ty * TX + tx           # TY threads share the reduction over K
        part[V] = 0                        # fp32, registers
        for k_o in K / (TY * U)
          for k_u in U (unrolled)          # k = (k_o * TY + ty) * U + k_u
            part[:] += f32(A[k]) * f32(W[k, n:n+V])   # one vector load of V halves
        local[ty, tx * V : tx * V + V] = part          # one vector store, one barrier
        each thread: V / TY columns, sum of their TY partials (fp32), rounded to fp16
        once, epilogue (residual add, SiLU * mul, cast, ...) and store

Neighbouring threads read neighbouring V-half vectors of one weight row (coalesced);
every weight element is read once. V is the largest power of two <= the tunable dividing
N, so the guard for an N that is not a multiple of the tile falls on whole threads (no
partial vectors). TY is a power of two dividing both K and V: no guard in the reduction,
and the final sum gives every thread whole columns. Odd K or N take smaller vectors /
fewer K splits rather than idle threads.

TVM's stock GEMV (Adreno branch) gives each thread one column, loads the weight column
in pieces along K and accumulates in fp16 (~2% error at K = 4864).
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from ..kn_pattern import accumulate_in_fp32, is_fp16_matmul, largest_divisor
from .common import KNMatch, KNMatmulRule, bind_partials, pick_vector, sum_column_partials
from .tuning import GemvTuning


class GemvKN(KNMatmulRule):
    """Decode-shaped KN matmuls: one token per row (``[1, 1, K]`` or ``[b, 1, K]``).

    A row axis other than the token axis (``batch_size`` of ``batch_decode``) may be
    symbolic: each row is its own row of work-groups. Prefill chunks (a symbolic token
    axis) are left to :class:`PrefillMatmulKN`.
    """

    rule_name = "adreno.gemv_kn"
    decode_shaped = True

    def schedule(self, m: KNMatch, target: Target) -> s_tir.Schedule | None:
        sch, block, pat, epilogues, loops = m.sch, m.block, m.pat, m.epilogues, m.loops
        n_ext, k_ext = m.n, m.k
        t: GemvTuning = self.tuning.gemv
        threads = self.threads(target)
        vec = pick_vector(n_ext, t.vector)
        # K is split across ty threads, a power of two dividing K (no guard in the
        # reduction) and the vector (the final sum then gives each thread whole columns).
        ty = pick_vector(k_ext, min(t.threads_k, vec, threads))
        tx = min(t.threads_n, n_ext // vec, max(1, threads // ty))
        unroll = largest_divisor(k_ext // ty, t.unroll_k)

        m_loops = [loops[i] for i in pat.m_iters]
        n_loop, k_loop = loops[pat.n_iter], loops[pat.k_iter]
        sch.reorder(*m_loops, n_loop, k_loop)
        m_loop = (
            sch.fuse(*m_loops)
            if len(m_loops) > 1
            else (m_loops[0] if m_loops else sch.add_unit_loop(n_loop))
        )

        fp16 = is_fp16_matmul(pat)
        # The final sum goes to a per-thread accumulator (fp32 for fp16), which the
        # write-back rounds and the epilogues consume.
        writeback = sch.cache_write(block, 0, "local")

        n_g, n_v = sch.split(n_loop, [None, vec])
        n_o, n_t = sch.split(n_g, [None, tx])
        k_o, k_t, k_u = sch.split(k_loop, [None, ty, unroll])
        sch.reorder(m_loop, n_o, n_t, k_t, k_o, k_u, n_v)
        rf = sch.rfactor(k_t, 0)
        # Partials: registers while K is walked, then one store each to local memory, a
        # barrier, and a short sum by the work-group (no tree of barriers per column).
        sch.set_scope(rf, 0, "shared")
        if fp16:
            accumulate_in_fp32(sch, rf)
            accumulate_in_fp32(sch, block)
        # rf now accumulates in registers; the new block stores them to local memory.
        part, store = rf, sch.cache_write(rf, 0, "local")

        m_r, n_or, n_tr, k_tr, k_or, k_ur, n_vr = sch.get_loops(part)[-7:]
        # One flat work-group dimension, tx fastest: neighbouring threads read
        # neighbouring vectors of a weight row.
        sch.reorder(k_tr, n_tr)
        thread = bind_partials(sch, part, m_r, n_or, (k_tr, n_tr), k_or, k_ur, n_vr)
        sch.reverse_compute_at(store, thread, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(store)[-1])

        # Sum of the TY partials of each column, one column per thread (exact: ty
        # divides vec), the epilogues folded into the rounding write-back.
        sum_column_partials(sch, block, n_or, tx * vec, tx * ty, writeback, epilogues)
        self.mark(sch, part)
        return sch
