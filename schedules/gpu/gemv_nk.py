"""GEMV with the weight stored ``[N, K]`` ("NT"), for GPUs: ``[b, 1, K] x [N, K]^T``.

The tied output layer (the embedding table ``[vocab, hidden]`` used as the lm_head, as in
Llama-3.2-1B/3B, Qwen2.5 and Qwen3 small models) of ``decode``, ``prefill``,
``batch_decode`` (``[b, 1, K]``) and ``batch_prefill`` (``[1, b, K]``: the last token of
each sequence): one token per sequence, so a GEMV per sequence. Our KN rules never match
it (its weight is ``[N, K]``) and TVM's stock ``Matmul`` gives it fp16 accumulators
(1.7 % of max|logit|) and reads each weight tile several times.

Loop nest (V = vector, TK x TN threads in one work-group dimension, U = unroll)::

    blockIdx.y  the rows (sequences)
    blockIdx.x  n tiles of TN weight rows
      threadIdx.x = t                      # all TN * TK threads, one vector each step
        A_local[0:K] = A[m, 0:K]           # the activation row, once per work-group,
                                           # then a barrier
      threadIdx.x = tn * TK + tk           # TK threads share one weight row's reduction
        part[V] = 0                        # fp32, registers
        for k_o in K / (U * TK * V)
          for k_u in U (unrolled)          # k = ((k_o * U + k_u) * TK + tk) * V
            part[:] += f32(A_local[k:k+V]) * f32(W[n, k:k+V])  # V halves from each
        lanes = sum(part)                  # fp32, one store to local memory, one barrier
        threads tn < TN: sum of their row's TK partials (fp32), rounded to fp16 once,
        epilogue (the cast to fp32 logits) and store

The TK threads of a row read neighbouring V-half vectors of it (each row is read
contiguously, each weight element once per row of A: once per decode step at batch 1).
The activation row is read from global memory once per work-group (N / TN times, about
1.03x the kernel's minimum bytes with TN = 32), not once per weight row (2x); a row too
long for the local-memory budget stays in global memory.
V, TK and U divide K (powers of two for V and TK): no guard in the reduction; a tile
of rows past N is guarded on whole threads.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ..kn_pattern import accumulate_in_fp32, fold_epilogues, is_fp16_matmul, largest_divisor
from .common import KNMatch, KNMatmulRule, bind_partials, pick_vector, read_index, sum_loops
from .tuning import GemvNKTuning

# Row extents of one token per sequence: the sequences of a batch, or 1. A prefill
# chunk's rows (``seq_len`` tokens) are a matmul's, not a GEMV's: left to the next rule.
ONE_TOKEN_PER_ROW = {"batch_size"}


def local_memory_budget(target: Target, device_bytes: int) -> int:
    """Bytes of local memory a work-group of the rule may take: the device's (Adreno
    7xx/8xx give a work-group 32 KiB, ``local_mem_bytes`` of its description), lowered by
    the target's own ``max_shared_memory_per_block`` (TVM's OpenCL targets say 16 KiB: we
    keep to it). The staged activation row and the TN * TK fp32 partials must fit; a longer
    row is read from global memory by every weight row instead (2x the kernel's minimum
    bytes, as before staging). Tied lm_heads have K = hidden size: 576-4096 halves in the
    models we compile, well inside."""
    declared = target.attrs.get("max_shared_memory_per_block")
    return min(device_bytes, int(declared)) if declared else device_bytes


def _rows_are_sequences(m: KNMatch) -> bool:
    for i in m.pat.m_iters:
        extent = m.iters[i].dom.extent
        if isinstance(extent, tirx.IntImm):
            if extent.value != 1:
                return False
        elif not (isinstance(extent, tirx.Var) and extent.name in ONE_TOKEN_PER_ROW):
            return False
    return True


class GemvNK(KNMatmulRule):
    """``C[.., n] = sum_k A[.., k] * W[n, k]`` with one token per row (sequences)."""

    rule_name = "adreno.gemv_nk"
    weight_kn = False
    decode_shaped = None  # batch_prefill's [1, b, K] logits are sequences too

    def schedule(self, m: KNMatch, target: Target) -> s_tir.Schedule | None:
        if not _rows_are_sequences(m):
            return None
        sch, block, pat, epilogues, loops = m.sch, m.block, m.pat, m.epilogues, m.loops
        n_ext, k_ext = m.n, m.k
        t: GemvNKTuning = self.tuning.gemv_nk
        threads = self.threads(target)
        vec = pick_vector(k_ext, t.vector)
        tk = pick_vector(k_ext // vec, min(t.threads_k, threads))
        tn = max(1, min(t.rows, threads // tk, n_ext))
        unroll = largest_divisor(k_ext // (tk * vec), t.unroll_k)

        m_loops = [loops[i] for i in pat.m_iters]
        n_loop, k_loop = loops[pat.n_iter], loops[pat.k_iter]
        sch.reorder(*m_loops, n_loop, k_loop)
        if len(m_loops) > 1:
            sch.fuse(*m_loops)
        elif not m_loops:
            sch.add_unit_loop(n_loop)

        fp16 = is_fp16_matmul(pat)
        # The row's final sum goes to a per-thread accumulator (fp32 for fp16), which the
        # write-back rounds once and the epilogues consume.
        writeback = sch.cache_write(block, 0, "local")

        n_o, n_t = sch.split(n_loop, [None, tn])
        k_o, k_u, k_t, k_v = sch.split(k_loop, [None, unroll, tk, vec])
        # Stage 1 (rf): each thread's V lanes, fp32 registers, over its part of K.
        lanes = sch.rfactor(sch.fuse(k_t, k_v), 0)
        # Stage 2 (rf2): each thread's lanes summed, one value to local memory.
        m_b, n_ob, n_tb, k_tv = sch.get_loops(block)[-4:]
        k_t2, _ = sch.split(k_tv, [tk, vec])
        partial = sch.rfactor(k_t2, 0)
        sch.set_scope(lanes, 0, "local")
        sch.set_scope(partial, 0, "shared")
        if fp16:
            for blk in (lanes, partial, block):
                accumulate_in_fp32(sch, blk)

        m_r, n_or, n_tr, k_or, k_ur, k_tvr = sch.get_loops(lanes)[-6:]
        k_tr, k_vr = sch.split(k_tvr, [tk, vec])
        sch.reorder(n_tr, k_tr, k_or, k_ur, k_vr)
        # One flat work-group dimension, tk fastest: the threads of a row read
        # neighbouring vectors of it.
        thread = bind_partials(sch, lanes, m_r, n_or, (n_tr, k_tr), k_or, k_ur, k_vr)
        budget = local_memory_budget(target, self.tuning.local_memory_bytes)
        _stage_activation(sch, lanes, pat.lhs, n_or, k_ext, tn * tk, vec, budget)

        # The lanes' sum, by the thread that computed them.
        sch.reverse_compute_at(partial, thread, preserve_unit_loops=True)
        sch.decompose_reduction(partial, _loops_below(sch, partial, thread)[0])

        # The TK partials of each row, summed by thread tn of the work-group.
        sch.reverse_compute_at(block, n_or, preserve_unit_loops=False)
        b_k, b_n = sum_loops(sch, block, n_or)
        # The rounding write-back (and the epilogues folded into it), by the same threads:
        # thread tn reads the row's fp32 sum it made. Placed before the threads are bound
        # (so each covers exactly TN rows), each split the same way as the sum: the
        # split's guard keeps the threads past TN from storing.
        remaining = fold_epilogues(sch, epilogues)
        for blk in [writeback, *remaining]:
            sch.reverse_compute_at(blk, n_or, preserve_unit_loops=True)
        _bind_rows(sch, b_n, tn * tk)
        sch.decompose_reduction(block, b_k)
        for blk in [writeback, *remaining]:
            _bind_rows(sch, sch.fuse(*_loops_below(sch, blk, n_or)), tn * tk)
        self.mark(sch, lanes)
        return sch


def _stage_activation(
    sch: s_tir.Schedule,
    lanes: s_tir.schedule.SBlockRV,
    lhs: tirx.Expr,
    n_or: s_tir.schedule.LoopRV,
    k_ext: int,
    threads: int,
    vec: int,
    budget: int,
) -> None:
    """The row's activation A[m, 0:K], copied once per work-group into local memory by all
    its threads (V-half vectors), so that the TN weight rows read it from there: without
    it each row re-reads all of A from global memory (2x the kernel's minimum bytes).
    A K too long for ``budget`` bytes (``local_memory_budget``) is left in global memory."""
    a_index = read_index(sch, lanes, lhs)
    if a_index is None:
        return
    a_buffer = sch.get(lanes).reads[a_index].source
    partials = threads * 4  # the fp32 partial sums' local buffer, alongside
    if k_ext * a_buffer.dtype.bits // 8 + partials > budget:
        return
    a_shared = sch.cache_read(lanes, a_index, "shared")
    sch.compute_at(a_shared, n_or, preserve_unit_loops=True)
    fetch = sch.fuse(*_loops_below(sch, a_shared, n_or))
    _, fetch_t, fetch_v = sch.split(fetch, [None, threads, vec])
    sch.bind(fetch_t, "threadIdx.x")
    sch.vectorize(fetch_v)


def _loops_below(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, loop: s_tir.schedule.LoopRV
) -> list[s_tir.schedule.LoopRV]:
    """The loops of ``block`` below ``loop``, outermost first."""
    var = sch.get(loop).loop_var
    loops = sch.get_loops(block)
    at = next(i for i, lp in enumerate(loops) if sch.get(lp).loop_var.same_as(var))
    return loops[at + 1 :]


def _bind_rows(sch: s_tir.Schedule, rows: s_tir.schedule.LoopRV, threads: int) -> None:
    """One row per thread of the flat work-group, the threads past the rows guarded."""
    _, inner = sch.split(rows, [None, threads])
    sch.bind(inner, "threadIdx.x")
