"""CPU schedule rule for matmul / GEMV whose weight is stored ``[K, N]`` ("KN" layout).

Target pattern (after ``LegalizeOps ... FuseTIR``)::

    C[b.., m, n] += A[b.., m, k] * W[k, n]      (+ injective epilogues: bias, residual, cast)

With W indexed ``[k, n]`` the reduction runs over the weight's *first* axis, so the
contiguous direction of W is n: the schedule vectorizes over n, keeps the reduction loop
outside the vector loop and accumulates a tile of outputs in registers (see ``MatmulKN``
for the loop nest). Column chunks run in parallel on TVM's thread pool; each weight element
is read once per call for all the rows of a prefill chunk.

fp16 inputs are accumulated in fp32 (products computed in fp32 too); the result is rounded
to the original fp16 intermediate before the epilogue, so the function keeps its meaning while
losing far less precision than the fp16 accumulation of the unscheduled function.
"""

from __future__ import annotations

import os

from tvm import DataType, s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target
from tvm.target.codegen import target_has_features

from ..kn_pattern import (
    KNPattern,
    accumulate_in_fp32,
    find_kn_matmul,
    fold_epilogues,
    is_fp16_matmul,
    largest_divisor,
    match_kn_matmul,
    operand_dtype,
)


def vector_bytes(target: Target) -> int:
    """Width of one SIMD register of the target in bytes (x86 AVX-512/AVX2, else 128-bit)."""
    # Feature names of another architecture simply answer False (aarch64 NEON: 16 bytes).
    if target_has_features("avx512f", target):
        return 64
    if target_has_features("avx2", target) or target_has_features("avx", target):
        return 32
    return 16


def _pick_tile(extent: int | tirx.Expr, lanes: int, max_tile: int) -> tuple[int, bool]:
    """Pick the n tile: prefer a multiple of the vector lanes that divides the extent.

    Returns (tile, exact) where exact says the extent is a multiple of the tile (no tail
    predicate, so the vector loop stays a plain vector loop).
    """
    if not isinstance(extent, int):
        return max_tile, False
    if extent <= max_tile:
        return extent, True
    for tile in range(max_tile - max_tile % lanes, lanes - 1, -lanes):
        if extent % tile == 0:
            return tile, True
    # No multiple of the lanes divides N: a divisor that still fills half a register...
    for tile in range(max_tile, lanes // 2 - 1, -1):
        if tile > 0 and extent % tile == 0:
            return tile, True
    # ...else a tail predicate (correct; the vectorizer scalarizes that loop).
    return max_tile, False


def _vectorize_inner(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, width: int) -> None:
    """Vectorize the innermost loop of ``block`` in pieces of ``width`` (a register tile)."""
    inner = sch.get_loops(block)[-1]
    extent = get_extent(sch, inner)
    if isinstance(extent, int) and extent > width and extent % width == 0:
        inner = sch.split(inner, [None, width])[-1]
    sch.vectorize(inner)


def _num_cores(target: Target) -> int:
    cores = target.attrs.get("num-cores", None)
    if cores is not None and int(cores) > 0:
        return int(cores)
    return os.cpu_count() or 1


def _tiles_per_chunk(tiles: int | None, want: int, min_tasks: int) -> int:
    """Register tiles per parallel chunk: about ``want``, at least ``min_tasks`` chunks.

    A divisor of the tile count avoids a ragged last chunk; when the only divisors are much
    smaller (e.g. 2374 = 2 x 1187 tiles for a 151936-wide vocabulary), keep ``want`` and
    let the last chunk be partial, which keeps each weight row's run long and contiguous.
    """
    if tiles is None:
        return want
    want = max(1, min(want, -(-tiles // min_tasks)))
    best = largest_divisor(tiles, want)
    return best if 2 * best >= want else want


class CPURule(CPUScheduleRule):
    """A rule of ours for a CPU target: hands each PrimFunc to ``schedule_func``."""

    def apply(
        self,
        func: tirx.PrimFunc,
        target: Target,
        tunable: bool,
    ) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return self.schedule_func(func, target)

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class _MatmulRule(CPURule):
    """What MatmulKN and MatmulNK share: the function's one matmul with its weight as
    ``weight_kn`` says, whose loops are its iterators, handed to ``schedule``."""

    weight_kn: bool

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        try:
            sch = s_tir.Schedule(func)
            found = find_kn_matmul(sch, weight_kn=self.weight_kn)
            if found is None:
                return None
            main, pat, epilogues = found
            if len(main.get_loops()) != len(sch.get(main.block_rv).iter_vars):
                return None
            return self.schedule(sch, target, main, pat, epilogues)
        except Exception:  # noqa: BLE001
            # A primitive refused this function (an unexpected variant of the pattern):
            # leave it to the next rule rather than failing the whole build.
            return None

    def schedule(
        self,
        sch: s_tir.Schedule,
        target: Target,
        main: SBlockInfo,
        pat: KNPattern,
        epilogues: list[s_tir.schedule.SBlockRV],
    ) -> s_tir.Schedule | None:
        raise NotImplementedError


class MatmulKN(_MatmulRule):
    """Parallel, vectorized schedule for ``A[.., m, k] x W[k, n]`` matmul/GEMV on CPU.

    Loop nest (n = weight columns, k = reduction, m = rows of A)::

        parallel n_o                       # column chunks: one task per chunk
          for m_oo                         # blocks of m_block rows (prefill chunks fit one)
            acc[m_block, chunk] = 0        # local accumulator (L1/L2 resident)
            for k_o                        # k in steps of k_tile
              for m_o                      # m_tile-row groups of the block
                for n_m                    # register tiles across the chunk
                  for k_i (k_tile)         # acc tile stays in registers over these k
                    for m_i (m_tile) unroll
                      for n_v vectorized   # acc[m, n] += A[m, k] * W[k, n]
            out / epilogue[m_block, chunk] = f(acc)

    Every row of the chunk is a contiguous ``chunk``-wide run of W; k_tile rows are streamed
    side by side, which the hardware prefetchers follow, and each weight vector loaded is used
    by all the rows of the m block.

    Parameters
    ----------
    reg_vectors : int
        Register tile width in SIMD registers of the accumulator dtype.
    chunk_bytes : int
        Target bytes of one weight row inside a chunk (contiguous run per row).
    k_tile : int
        Weight rows streamed together while the accumulator tile stays in registers.
    m_tile : int
        Rows per register tile (m_tile * reg_vectors accumulator registers).
    m_block : int
        Rows sharing one pass over the weights when the row count is static. A symbolic row
        count (prefill ``seq_len``, batch decode) is one block of all its rows: every weight
        element is read once per call, and the accumulator holds rows x chunk values.
    min_tasks : int | None
        Minimum number of column chunks, so that all threads get work (default: the
        target's ``num-cores``, else this machine's core count).
    fp32_accumulate : bool
        Accumulate fp16 matmuls in fp32 (rounded back to fp16 before the epilogue).
    """

    weight_kn = True

    def __init__(
        self,
        reg_vectors: int = 4,
        chunk_bytes: int = 4096,
        k_tile: int = 16,
        m_tile: int = 4,
        m_block: int = 16,
        min_tasks: int | None = None,
        fp32_accumulate: bool = True,
    ):
        self.reg_vectors = reg_vectors
        self.chunk_bytes = chunk_bytes
        self.k_tile = k_tile
        self.m_tile = m_tile
        self.m_block = m_block
        self.min_tasks = min_tasks
        self.fp32_accumulate = fp32_accumulate

    def schedule(
        self,
        sch: s_tir.Schedule,
        target: Target,
        main: SBlockInfo,
        pat: KNPattern,
        epilogues: list[s_tir.schedule.SBlockRV],
    ) -> s_tir.Schedule | None:
        block = main.block_rv
        n_iters = len(sch.get(block).iter_vars)
        m_doms = [sch.get(block).iter_vars[i].dom.extent for i in pat.m_iters]
        m_static = all(isinstance(d, tirx.IntImm) for d in m_doms)
        m_total = 1
        for d in m_doms:
            m_total = m_total * d.value if isinstance(d, tirx.IntImm) else None
        m_tile = min(self.m_tile, m_total) if m_static else self.m_tile
        m_block = max(self.m_block, m_tile)

        # Rows that do not fill whole register tiles: pad the row dimension (A is copied into
        # a zero-padded buffer, results of padding rows are dropped by the write-back) instead
        # of guarding every row in the inner loops, which would keep the accumulators out of
        # registers. Only for a single row iterator (prefill seq_len / decode batch).
        padded = len(pat.m_iters) == 1 and (not m_static or m_total % m_tile != 0)
        if padded:
            sch.pad_einsum(block, [m_tile if i == pat.m_iters[0] else 1 for i in range(n_iters)])
            # pad_einsum's output-copy block is the consumer of the matmul: the write-back.
            (writeback,) = sch.get_consumers(block)
            sch.set_scope(block, 0, "local")
            # The block now reads the padded copy of A: take the operands again.
            pat = match_kn_matmul(sch.get(block))
            if pat is None:
                return None
        else:
            writeback = sch.cache_write(block, 0, "local")

        loops = sch.get_loops(block)[-n_iters:]
        m_loops = [loops[i] for i in pat.m_iters]
        n_loop, k_loop = loops[pat.n_iter], loops[pat.k_iter]
        sch.reorder(*m_loops, n_loop, k_loop)

        acc_fp32 = self.fp32_accumulate and is_fp16_matmul(pat) and accumulate_in_fp32(sch, block)
        acc_bytes = 4 if acc_fp32 else DataType(pat.out_dtype).itemsize
        w_bytes = DataType(operand_dtype(pat.rhs)).itemsize
        lanes = max(1, vector_bytes(target) // acc_bytes)

        if m_loops:
            m_loop = sch.fuse(*m_loops) if len(m_loops) > 1 else m_loops[0]
        else:
            m_loop = sch.add_unit_loop(n_loop)
        n_extent = get_extent(sch, n_loop)
        k_extent = get_extent(sch, k_loop)

        # n: [chunks (parallel), register tiles per chunk, register tile (vector)].
        n_v, exact = _pick_tile(n_extent, lanes, lanes * self.reg_vectors)
        min_tasks = self.min_tasks or _num_cores(target)
        n_m = _tiles_per_chunk(
            n_extent // n_v if exact and isinstance(n_extent, int) else None,
            max(1, self.chunk_bytes // (w_bytes * n_v)),
            min_tasks,
        )
        if exact:
            # Register tiles first, then chunks of tiles: a ragged last chunk is tested per
            # tile, outside the vector and k loops.
            n_t, n_vi = sch.split(n_loop, [None, n_v])
            n_o, n_mi = sch.split(n_t, [None, n_m])
        else:
            n_o, n_mi, n_vi = sch.split(n_loop, [None, n_m, n_v])

        # m: [m blocks, register-tile groups, rows of a register tile]. Rows are padded to
        # whole register tiles, so no split below leaves a tail test: a symbolic row count is
        # one block of all its tiles (prefill chunks have <= 16 rows; a batch of b rows reads
        # the weights once), a static one blocks of a divisor of its tile count.
        m_g, m_i = sch.split(m_loop, [None, m_tile])
        groups = get_extent(sch, m_g)
        if isinstance(groups, int):
            m_oo, m_o = sch.split(m_g, [None, largest_divisor(groups, m_block // m_tile)])
        else:
            m_oo, m_o = sch.split(m_g, [1, None])

        # k: [k steps, rows streamed together].
        if isinstance(k_extent, int):
            k_i = largest_divisor(k_extent, self.k_tile)
        else:
            k_i = self.k_tile
        k_o, k_ii = sch.split(k_loop, [None, k_i])

        sch.reorder(n_o, m_oo, k_o, m_o, n_mi, k_ii, m_i, n_vi)

        sch.parallel(n_o)
        sch.vectorize(n_vi)
        sch.unroll(m_i)

        # Fold the epilogue chain into the write-back (bias/residual/cast become one store).
        remaining = fold_epilogues(sch, epilogues)  # the others: computed per tile below
        sch.reverse_compute_at(writeback, m_oo, preserve_unit_loops=True)
        _vectorize_inner(sch, writeback, n_v)
        for epi in remaining:
            try:
                sch.reverse_compute_at(epi, m_oo, preserve_unit_loops=True)
                _vectorize_inner(sch, epi, n_v)
            except ScheduleError:  # leave it at the root (serial, still correct)
                continue

        # Zero the accumulator block right before the k loop.
        init = sch.decompose_reduction(block, k_o)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


class MatmulNK(_MatmulRule):
    """Parallel, vectorized schedule for ``A[.., m, k] x W[n, k]^T`` (weight stored ``[N, K]``).

    The reduction runs over W's contiguous axis, so each output is a dot product: k is cut
    into vectors whose lanes keep partial sums (rfactor), summed once at the end::

        parallel n_o                         # groups of n_tile weight rows
          for m                              # rows of A (decode: 1)
            part[n_tile, kv] = 0             # partial sums, registers
            for k_o
              for n_i (n_tile) unroll        # n_tile weight rows streamed side by side
                for kv vectorized            # part[n_i, kv] += A[m, k] * W[n, k]
            C[m, n_i] = sum_kv part[n_i, kv] -> epilogue

    TVM's ``dl.cpu.GEMV`` vectorizes over the output rows instead (a strided gather per
    lane) and unrolls the reduction: slow code, and LLVM needed from seconds to minutes to
    compile it. fp16 is accumulated in fp32 (partials and final sum).

    Parameters
    ----------
    n_tile : int
        Weight rows (outputs) per group; each A vector loaded is used for all of them.
    k_vectors : int
        SIMD registers of partial sums per output row (independent FMA chains).
    fp32_accumulate : bool
        Accumulate fp16 matmuls in fp32.
    """

    weight_kn = False

    def __init__(self, n_tile: int = 4, k_vectors: int = 2, fp32_accumulate: bool = True):
        self.n_tile = n_tile
        self.k_vectors = k_vectors
        self.fp32_accumulate = fp32_accumulate

    def schedule(
        self,
        sch: s_tir.Schedule,
        target: Target,
        main: SBlockInfo,
        pat: KNPattern,
        epilogues: list[s_tir.schedule.SBlockRV],
    ) -> s_tir.Schedule | None:
        block = main.block_rv
        loops = main.get_loops()
        m_loops = [loops[i] for i in pat.m_iters]
        n_loop, k_loop = loops[pat.n_iter], loops[pat.k_iter]
        sch.reorder(*m_loops, n_loop, k_loop)
        if m_loops:
            m_loop = sch.fuse(*m_loops) if len(m_loops) > 1 else m_loops[0]
        else:
            m_loop = sch.add_unit_loop(n_loop)

        fp16 = self.fp32_accumulate and is_fp16_matmul(pat)
        if fp16:
            # Final sum into a local fp32 accumulator too; its copy rounds to fp16.
            writeback = sch.cache_write(block, 0, "local")
        acc_bytes = 4 if fp16 else DataType(pat.out_dtype).itemsize
        lanes = max(1, vector_bytes(target) // acc_bytes)

        k_extent = get_extent(sch, k_loop)
        n_extent = get_extent(sch, n_loop)
        k_v = lanes * self.k_vectors
        if isinstance(k_extent, int):
            while k_v > 1 and k_extent % k_v:
                k_v //= 2  # a divisor of K keeps the vector loop free of tail tests
        n_i = largest_divisor(n_extent, self.n_tile) if isinstance(n_extent, int) else 1

        n_o, n_ii = sch.split(n_loop, [None, n_i])
        k_o, k_vi = sch.split(k_loop, [None, k_v])
        sch.reorder(n_o, m_loop, n_ii, k_o, k_vi)
        # Lanes last in the partial-sum buffer: each row's partials are one contiguous vector.
        rf = sch.rfactor(k_vi, len(sch.get(block).writes[0].region))
        sch.set_scope(rf, 0, "local")
        if fp16:
            accumulate_in_fp32(sch, rf)
            accumulate_in_fp32(sch, block)

        rf_loops = sch.get_loops(rf)
        rf_no, rf_m, rf_ni, rf_ko, rf_kv = rf_loops[-5:]
        sch.reorder(rf_no, rf_m, rf_ko, rf_ni, rf_kv)
        sch.parallel(rf_no)
        sch.vectorize(rf_kv)
        sch.unroll(rf_ni)
        init = sch.decompose_reduction(rf, rf_ko)
        sch.vectorize(sch.get_loops(init)[-1])

        # Lane sums, then the (fp16) write-back and epilogues, per group of rows.
        sch.reverse_compute_at(block, rf_m, preserve_unit_loops=True)
        tail = [writeback] if fp16 else []
        for blk in tail + fold_epilogues(sch, epilogues):
            try:
                sch.reverse_compute_at(blk, rf_m, preserve_unit_loops=True)
            except ScheduleError:  # leave it at the root (serial, still correct)
                continue
        return sch
