"""CPU schedule rule for matmul / GEMV whose weight is stored ``[K, N]`` ("KN" layout).

Target pattern (after ``LegalizeOps ... FuseTIR``)::

    C[b.., m, n] += A[b.., m, k] * W[k, n]      (+ injective epilogues: bias, residual, cast)

With W indexed ``[k, n]`` the reduction runs over the weight's *first* axis, so the
contiguous direction of W is n. The schedule therefore vectorizes over n and keeps the
reduction loop outside the vector loop::

    parallel n_o                      # chunks of n_tile columns, spread over the thread pool
      for m_o                         # row tiles (prefill); extent 1 at decode
        acc[m_tile, n_tile] = 0       # accumulator tile, local scope -> registers / L1
        for k
          for m_i (m_tile)            # every weight vector is used by all rows of the tile
            for n_i (n_tile) vector   # acc[m_i, n_i] += A[m, k] * W[k, n]
        C / epilogue[m_tile, n_tile] = f(acc)

fp16 inputs are accumulated in fp32 (products computed in fp32 too); the result is rounded
to the original fp16 intermediate before the epilogue, so the function keeps its meaning while
losing far less precision than the fp16 accumulation of the unscheduled function.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import DataType, s_tir, tirx
from tvm.ir import TensorLoad
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import target_has_features


def vector_bytes(target: Target) -> int:
    """Width of one SIMD register of the target in bytes (x86 AVX-512/AVX2, else 128-bit)."""
    try:
        if target_has_features("avx512f", target):
            return 64
        if target_has_features("avx2", target) or target_has_features("avx", target):
            return 32
    except Exception:  # noqa: BLE001 - non-x86 targets do not know these feature names
        pass
    return 16


@dataclass
class _KNPattern:
    """Roles of the iterators / operands of a ``C[.., m, n] += A[.., m, k] * W[k, n]`` block."""

    m_iters: list[int]  # positions (in the block's iter list) of the row/batch iterators
    n_iter: int
    k_iter: int
    lhs: tirx.Expr  # the A operand expression (BufferLoad or Cast of one)
    rhs: tirx.Expr  # the W operand expression
    out_dtype: str


def _strip_cast(expr: tirx.Expr) -> tirx.Expr:
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _is_var(expr: tirx.Expr, var: tirx.Var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _dtype(expr: tirx.Expr) -> str:
    return str(expr.ty.dtype)


def _same_index(a: tirx.Expr, b: tirx.Expr) -> bool:
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return a.value == b.value
    return a.same_as(b)


def _is_zero_index(expr: tirx.Expr) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == 0


def match_kn_matmul(block: s_tir.SBlock) -> _KNPattern | None:
    """Return the KN matmul roles of ``block``, or None when it is not that pattern."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or block.init is None:
        return None
    iter_vars = [iv.var for iv in block.iter_vars]
    red = [i for i, iv in enumerate(block.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    spatial = [i for i, iv in enumerate(block.iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
    if len(red) != 1 or len(red) + len(spatial) != len(iter_vars):
        return None
    k_iter = red[0]
    k_var = iter_vars[k_iter]
    # The output is indexed by the spatial iterators themselves, each exactly once and in
    # order (normalize_prim_func turns unit dimensions into constant 0 indices).
    out_idx = list(store.indices)
    out_vars = [i for i in out_idx if not _is_zero_index(i)]
    if len(out_vars) != len(spatial) or not all(
        _is_var(i, iter_vars[pos]) for i, pos in zip(out_vars, spatial)
    ):
        return None
    if not _is_var(out_idx[-1], iter_vars[spatial[-1]]):
        return None
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    acc, prod = value.a, value.b
    if isinstance(prod, TensorLoad) and prod.source.same_as(store.buffer):
        acc, prod = prod, acc
    if not (isinstance(acc, TensorLoad) and acc.source.same_as(store.buffer)):
        return None
    if not all(_same_index(a, b) for a, b in zip(acc.indices, out_idx)):
        return None
    if not isinstance(prod, tirx.Mul):
        return None
    n_pos = spatial[-1]
    n_var = iter_vars[n_pos]
    ops = [prod.a, prod.b]
    loads = [_strip_cast(o) for o in ops]
    if not all(isinstance(ld, TensorLoad) for ld in loads):
        return None

    def is_weight(ld: TensorLoad) -> bool:
        idx = list(ld.indices)
        return (
            len(idx) >= 2
            and _is_var(idx[-2], k_var)
            and _is_var(idx[-1], n_var)
            and all(_is_zero_index(i) for i in idx[:-2])
        )

    def is_lhs(ld: TensorLoad) -> bool:
        idx = list(ld.indices)
        if not idx or not _is_var(idx[-1], k_var):
            return False
        # Remaining indices must be row/batch iterators (never n or k), so that A is read per row.
        allowed = [iter_vars[p] for p in spatial[:-1]]
        return all(
            _is_zero_index(i) or any(_is_var(i, v) for v in allowed) for i in idx[:-1]
        )

    if is_weight(loads[1]) and is_lhs(loads[0]):
        lhs, rhs = ops[0], ops[1]
    elif is_weight(loads[0]) and is_lhs(loads[1]):
        lhs, rhs = ops[1], ops[0]
    else:
        return None
    return _KNPattern(
        m_iters=spatial[:-1],
        n_iter=n_pos,
        k_iter=k_iter,
        lhs=lhs,
        rhs=rhs,
        out_dtype=str(store.buffer.dtype),
    )


def _accumulate_in_fp32(
    sch: s_tir.Schedule, block_rv: s_tir.schedule.SBlockRV, pat: _KNPattern
) -> bool:
    """Turn the (cache-written, fp16) accumulator block into an fp32 multiply-accumulate.

    ``unsafe_set_dtype`` alone would keep the arithmetic in fp16
    (``acc = f32(f16(acc) + a * b)``), so the block body is rebuilt as
    ``acc = acc + f32(a) * f32(b)`` and swapped in with ``ScheduleState.replace``.
    """
    if _dtype(pat.lhs) != "float16" or _dtype(pat.rhs) != "float16":
        return False
    sch.unsafe_set_dtype(block_rv, 0, "float32")
    block = sch.get(block_rv)
    store = block.body
    acc_buf = store.buffer
    idx = list(store.indices)
    zero = tirx.FloatImm("float32", 0.0)
    init = tirx.BufferStore(acc_buf, zero, idx)
    mac = tirx.Add(
        tirx.BufferLoad(acc_buf, idx),
        tirx.Mul(tirx.Cast("float32", pat.lhs), tirx.Cast("float32", pat.rhs)),
    )
    body = tirx.BufferStore(acc_buf, mac, idx)
    new_block = s_tir.SBlock(
        block.iter_vars,
        block.reads,
        block.writes,
        block.name_hint,
        body,
        init,
        block.alloc_buffers,
        block.match_buffers,
        block.annotations,
    )
    sch.state.replace(sch.get_sref(block_rv), new_block, {block: new_block})
    return True


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


def _largest_divisor(x: int, cap: int) -> int:
    """Largest divisor of x that is <= cap (>= 1)."""
    for d in range(min(cap, x), 0, -1):
        if x % d == 0:
            return d
    return 1


class MatmulKN(CPUScheduleRule):
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
        Rows sharing one pass over the weights (prefill chunks have <= 16 rows).
    min_tasks : int
        Minimum number of column chunks, so that all threads get work.
    fp32_accumulate : bool
        Accumulate fp16 matmuls in fp32 (rounded back to fp16 before the epilogue).
    """

    def __init__(
        self,
        reg_vectors: int = 4,
        chunk_bytes: int = 2048,
        k_tile: int = 8,
        m_tile: int = 4,
        m_block: int = 16,
        min_tasks: int = 8,
        fp32_accumulate: bool = True,
    ):
        self.reg_vectors = reg_vectors
        self.chunk_bytes = chunk_bytes
        self.k_tile = k_tile
        self.m_tile = m_tile
        self.m_block = m_block
        self.min_tasks = min_tasks
        self.fp32_accumulate = fp32_accumulate

    def apply(  # noqa: C901 - one linear recipe
        self,
        func: tirx.PrimFunc,
        target: Target,
        tunable: bool,
    ) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None:
            return None
        reductions = [i for i, info in enumerate(infos) if info.is_reduction()]
        if len(reductions) != 1 or not all(
            info.is_injective() for i, info in enumerate(infos) if i != reductions[0]
        ):
            return None
        main: SBlockInfo = infos[reductions[0]]
        pat = match_kn_matmul(sch.get(main.block_rv))
        if pat is None:
            return None
        epilogues = [info.block_rv for info in infos[reductions[0] + 1 :]]
        block = main.block_rv
        loops = main.get_loops()
        if len(loops) != len(sch.get(block).iter_vars):
            return None

        # Loop order: rows, n, k (normalize_prim_func gives one loop per block iterator).
        m_loops = [loops[i] for i in pat.m_iters]
        n_loop, k_loop = loops[pat.n_iter], loops[pat.k_iter]
        sch.reorder(*m_loops, n_loop, k_loop)

        # Accumulator in local scope; its write-back block is where epilogues get merged.
        writeback = sch.cache_write(block, 0, "local")
        acc_fp32 = (
            self.fp32_accumulate
            and pat.out_dtype == "float16"
            and _accumulate_in_fp32(sch, block, pat)
        )
        acc_bytes = 4 if acc_fp32 else DataType(pat.out_dtype).itemsize
        w_bytes = DataType(_dtype(pat.rhs)).itemsize
        lanes = max(1, vector_bytes(target) // acc_bytes)

        if m_loops:
            m_loop = sch.fuse(*m_loops) if len(m_loops) > 1 else m_loops[0]
        else:
            m_loop = sch.add_unit_loop(n_loop)
        m_extent = get_extent(sch, m_loop)
        n_extent = get_extent(sch, n_loop)
        k_extent = get_extent(sch, k_loop)

        # n: [chunks (parallel), register tiles per chunk, register tile (vector)].
        n_v, exact = _pick_tile(n_extent, lanes, lanes * self.reg_vectors)
        want = max(1, self.chunk_bytes // (w_bytes * n_v))
        if exact and isinstance(n_extent, int):
            tiles = n_extent // n_v
            n_m = _largest_divisor(tiles, want)
            while n_m > 1 and tiles // n_m < self.min_tasks:
                n_m = _largest_divisor(tiles, n_m - 1)
        else:
            n_m = want
        n_o, n_mi, n_vi = sch.split(n_loop, [None, n_m, n_v])

        # m: [m blocks, register-tile groups, rows of a register tile].
        if isinstance(m_extent, int) and m_extent <= self.m_block:
            m_block = m_extent
        else:
            m_block = self.m_block
        m_tile = min(self.m_tile, m_block)
        if m_block % m_tile:
            m_tile = _largest_divisor(m_block, m_tile)
        m_oo, m_o, m_i = sch.split(m_loop, [None, m_block // m_tile, m_tile])

        # k: [k steps, rows streamed together].
        if isinstance(k_extent, int):
            k_i = _largest_divisor(k_extent, self.k_tile)
        else:
            k_i = self.k_tile
        k_o, k_ii = sch.split(k_loop, [None, k_i])

        sch.reorder(n_o, m_oo, k_o, m_o, n_mi, k_ii, m_i, n_vi)
        sch.parallel(n_o)
        sch.vectorize(n_vi)
        sch.unroll(m_i)

        # Zero the accumulator block right before the k loop.
        init = sch.decompose_reduction(block, k_o)
        sch.vectorize(sch.get_loops(init)[-1])

        # Fold the epilogue chain into the write-back (bias/residual/cast become one store).
        remaining: list[s_tir.schedule.SBlockRV] = []
        for epi in epilogues:
            try:
                sch.reverse_compute_inline(epi)
            except Exception:  # noqa: BLE001 - not inlinable: computed per tile below
                remaining.append(epi)
        sch.reverse_compute_at(writeback, m_oo, preserve_unit_loops=True)
        _vectorize_inner(sch, writeback, n_v)
        for epi in remaining:
            try:
                sch.reverse_compute_at(epi, m_oo, preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 - leave it at the root (serial, still correct)
                continue
        return sch
