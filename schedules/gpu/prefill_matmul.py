"""Prefill matmul with the weight stored ``[K, N]``, for GPUs: ``[1, seq_len, K] x [K, N]``.

Prefill runs chunks of at most ``prefill_chunk_size`` (16) tokens, so one thread can hold
a whole chunk's rows: every weight vector it loads is used for all of them, and a 16-row
chunk reads the weights once, as a decode step does. Loop nest (R rows, V vector,
T threads, U unroll)::

    blockIdx.x  n tiles of T * V columns
      threadIdx.x t                          # V columns: n = (bx * T + t) * V
        for m_o in ceil(seq_len / R)         # one pass for seq_len <= R
          acc[R, V] = 0                      # fp32 registers
          for k_o in K / U
            a[R, U] = A[rows, k:k+U]         # registers (rows >= seq_len: the last row)
            for k_u in U (unrolled)
              w[V] = W[k, n:n+V]             # one vector load of V halves, registers
              for r in R (unrolled)
                acc[r, :] += f32(a[r, k_u]) * f32(w[:])
          for r in R: if row < seq_len: C[row, n:n+V] = epilogue(fp16(acc[r, :]))

No shared memory, no barriers, no padded copy of the activations in global memory (TVM's
stock matmul writes one first, as a separate kernel): rows past ``seq_len`` repeat the
last row in registers (no branch in the loads) and are not stored. Correct for any
``seq_len`` (more than R rows take more passes over the weights). N that is not a
multiple of V shrinks V to a power of two that divides it; a last partial tile of threads
is guarded per thread.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir import Call, TensorLoad
from tvm.target import Target

from ..kn_pattern import accumulate_in_fp32, fold_epilogues, is_fp16_matmul, largest_divisor
from .common import KNMatch, KNMatmulRule, pick_vector, read_index
from .tuning import PrefillTuning


class PrefillMatmulKN(KNMatmulRule):
    """KN matmuls with a token axis of several rows (prefill chunks, ``seq_len``)."""

    rule_name = "adreno.prefill_matmul_kn"
    decode_shaped = False

    def schedule(self, m: KNMatch, target: Target) -> s_tir.Schedule | None:
        sch, block, pat, iters, epilogues = m.sch, m.block, m.pat, m.iters, m.epilogues
        if len(pat.m_iters) != 1:  # one row axis: the tokens
            return None
        n_ext, k_ext = m.n, m.k
        t: PrefillTuning = self.tuning.prefill
        threads = self.threads(target)
        rows = t.rows
        vec = pick_vector(n_ext, t.vector)
        tx = min(t.threads, n_ext // vec, threads)
        unroll = largest_divisor(k_ext, t.unroll_k)

        # Rows padded to whole register tiles: the padded activations are made in
        # registers below (0 past seq_len), the padded results dropped by the write-back.
        m_pos = pat.m_iters[0]
        sch.pad_einsum(block, [rows if i == m_pos else 1 for i in range(len(iters))])
        a_pad = [p for p in sch.get_producers(block) if _writes_rows(sch, p)]
        (writeback,) = sch.get_consumers(block)
        sch.set_scope(block, 0, "local")
        if is_fp16_matmul(pat):
            accumulate_in_fp32(sch, block)

        loops = sch.get_loops(block)[-len(iters) :]
        m_loop, n_loop, k_loop = loops[m_pos], loops[pat.n_iter], loops[pat.k_iter]
        m_o, m_i = sch.split(m_loop, [None, rows])
        n_g, n_v = sch.split(n_loop, [None, vec])
        n_o, n_t = sch.split(n_g, [None, tx])
        k_o, k_u = sch.split(k_loop, [None, unroll])
        sch.reorder(n_o, n_t, m_o, k_o, k_u, m_i, n_v)
        sch.bind(n_o, "blockIdx.x")
        sch.bind(n_t, "threadIdx.x")
        sch.unroll(k_u)
        sch.unroll(m_i)
        sch.vectorize(n_v)
        init = sch.decompose_reduction(block, k_o)
        sch.unroll(sch.get_loops(init)[-2])
        sch.vectorize(sch.get_loops(init)[-1])

        # The activations' R x U tile, loaded into registers once per k step.
        stage_activation_tile(sch, a_pad, k_o)

        # The weight vector of each k, loaded (and converted) once for all R rows.
        w_index = read_index(sch, block, pat.rhs)
        if w_index is not None:
            w_local = sch.cache_read(block, w_index, "local")
            sch.compute_at(w_local, k_u, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(w_local)[-1])

        # Epilogues folded into the write-back (round to fp16, residual add, cast...).
        remaining = fold_epilogues(sch, epilogues)
        for blk in [writeback, *remaining]:
            sch.reverse_compute_at(blk, m_o, preserve_unit_loops=True)
            w_loops = sch.get_loops(blk)
            # Unrolled: the accumulator rows stay registers (indexed by constants).
            sch.unroll(w_loops[-2])
            sch.vectorize(w_loops[-1])
        self.mark(sch, block)
        return sch


def _writes_rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether a producer made by pad_einsum is the padded activation copy."""
    return "pad" in sch.get(block).name_hint


def stage_activation_tile(
    sch: s_tir.Schedule, a_pad: list[s_tir.schedule.SBlockRV], k_o: s_tir.schedule.LoopRV
) -> None:
    """The padded activations' R x U tile of each k step in registers (rows past the
    chunk read its last row), loaded once per ``k_o`` iteration; the prefill rules share it."""
    for pad in a_pad:
        _clamp_rows(sch, pad)
        sch.compute_at(pad, k_o, preserve_unit_loops=True)
        sch.set_scope(pad, 0, "local")
        p_loops = sch.get_loops(pad)
        sch.unroll(p_loops[-2])
        sch.vectorize(p_loops[-1])


def _clamp_rows(sch: s_tir.Schedule, pad: s_tir.schedule.SBlockRV) -> None:
    """``a = row < seq_len ? A[row, k] : 0``  ->  ``a = A[min(row, seq_len - 1), k]``.

    Rows past ``seq_len`` repeat the last row instead of reading zeros: their results are
    never stored, and the loads of the register tile lose their per-row branch.
    """
    block = sch.get(pad)
    store = block.body
    value = store.value
    if not (isinstance(value, Call) and value.op.name.endswith("if_then_else")):
        return
    cond, load = value.args[0], value.args[1]
    if not (
        isinstance(cond, tirx.LT) and isinstance(cond.a, tirx.Var) and isinstance(load, TensorLoad)
    ):
        return
    row, bound = cond.a, cond.b
    last = tirx.Max(bound - tirx.IntImm(bound.ty.dtype, 1), tirx.IntImm(bound.ty.dtype, 0))
    indices = [
        tirx.Min(i, last) if isinstance(i, tirx.Var) and i.same_as(row) else i for i in load.indices
    ]
    body = tirx.BufferStore(store.buffer, tirx.BufferLoad(load.source, indices), store.indices)
    new_block = s_tir.SBlock(
        block.iter_vars,
        block.reads,
        block.writes,
        block.name_hint,
        body,
        block.init,
        block.alloc_buffers,
        block.match_buffers,
        block.annotations,
    )
    sch.state.replace(sch.get_sref(pad), new_block, {block: new_block})
