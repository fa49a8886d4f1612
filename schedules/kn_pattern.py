"""The matmul pattern our KN rules schedule, found in a PrimFunc, and what they share.

    C[b.., m, n] += A[b.., m, k] * W[k, n]     (+ injective epilogues: bias, residual, cast)

``find_kn_matmul`` finds it (``W[n, k]`` too, for the NK rules) and says which iterators
are rows, columns and the reduction; ``accumulate_in_fp32`` turns an fp16 reduction into
an fp32 one; ``fold_epilogues`` inlines the epilogues into the write-back. Used by the CPU
rules (``schedules/cpu/``) and the GPU rules (``schedules/gpu/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.ir import TensorLoad
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.schedule import ScheduleError


@dataclass
class KNPattern:
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


def operand_dtype(expr: tirx.Expr) -> str:
    return str(expr.ty.dtype)


def _same_index(a: tirx.Expr, b: tirx.Expr) -> bool:
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return a.value == b.value
    return a.same_as(b)


def _is_zero_index(expr: tirx.Expr) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == 0


def split_accumulation(store: tirx.BufferStore) -> tuple[TensorLoad, tirx.Expr] | None:
    """``(acc, term)`` of a store ``acc = acc + term`` (either order), or None."""
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    acc, term = value.a, value.b
    if isinstance(term, TensorLoad) and term.source.same_as(store.buffer):
        acc, term = term, acc
    if not (isinstance(acc, TensorLoad) and acc.source.same_as(store.buffer)):
        return None
    return acc, term


def match_kn_matmul(block: s_tir.SBlock) -> KNPattern | None:
    """Return the KN matmul roles of ``block``, or None when it is not that pattern."""
    return match_matmul(block, weight_kn=True)


def match_matmul(block: s_tir.SBlock, weight_kn: bool) -> KNPattern | None:
    """Roles of ``C[.., m, n] += A[.., m, k] * W`` with W ``[k, n]`` (KN) or ``[n, k]`` (NK)."""
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
        _is_var(i, iter_vars[pos]) for i, pos in zip(out_vars, spatial, strict=True)
    ):
        return None
    if not _is_var(out_idx[-1], iter_vars[spatial[-1]]):
        return None
    found = split_accumulation(store)
    if found is None:
        return None
    acc, prod = found
    if len(acc.indices) != len(out_idx) or not all(
        _same_index(a, b) for a, b in zip(acc.indices, out_idx, strict=True)
    ):
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
        first, second = (k_var, n_var) if weight_kn else (n_var, k_var)
        return (
            len(idx) >= 2
            and _is_var(idx[-2], first)
            and _is_var(idx[-1], second)
            and all(_is_zero_index(i) for i in idx[:-2])
        )

    def is_lhs(ld: TensorLoad) -> bool:
        idx = list(ld.indices)
        if not idx or not _is_var(idx[-1], k_var):
            return False
        # Remaining indices must be row/batch iterators (never n or k), so that A is read per row.
        allowed = [iter_vars[p] for p in spatial[:-1]]
        return all(_is_zero_index(i) or any(_is_var(i, v) for v in allowed) for i in idx[:-1])

    if is_weight(loads[1]) and is_lhs(loads[0]):
        lhs, rhs = ops[0], ops[1]
    elif is_weight(loads[0]) and is_lhs(loads[1]):
        lhs, rhs = ops[1], ops[0]
    else:
        return None
    return KNPattern(
        m_iters=spatial[:-1],
        n_iter=n_pos,
        k_iter=k_iter,
        lhs=lhs,
        rhs=rhs,
        out_dtype=str(store.buffer.dtype),
    )


def the_reduction(infos: list[SBlockInfo]) -> int | None:
    """The index of a function's one reduction block when every other block is
    injective (a matmul with its prologues and epilogues); None otherwise."""
    reductions = [i for i, info in enumerate(infos) if info.is_reduction()]
    if len(reductions) != 1 or not all(
        info.is_injective() for i, info in enumerate(infos) if i != reductions[0]
    ):
        return None
    return reductions[0]


def find_kn_matmul(
    sch: s_tir.Schedule, weight_kn: bool
) -> tuple[SBlockInfo, KNPattern, list[s_tir.schedule.SBlockRV]] | None:
    """The function's one matmul block (after inlining what can be), its roles, and the
    injective blocks after it (epilogues). None for any other kind of function."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline_contiguous_spatial(sch, infos)
    if infos is None:
        return None
    r = the_reduction(infos)
    if r is None:
        return None
    main: SBlockInfo = infos[r]
    pat = match_matmul(sch.get(main.block_rv), weight_kn)
    if pat is None:
        return None
    return main, pat, [info.block_rv for info in infos[r + 1 :]]


def fold_epilogues(
    sch: s_tir.Schedule, epilogues: list[s_tir.schedule.SBlockRV]
) -> list[s_tir.schedule.SBlockRV]:
    """Inline the epilogues (residual add, cast, ...) into the matmul's write-back where
    TVM can; returns those it cannot, which the caller computes at the write-back's loop."""
    remaining = []
    for epi in epilogues:
        try:
            sch.reverse_compute_inline(epi)
        except ScheduleError:
            remaining.append(epi)
    return remaining


def _to_fp32(expr: tirx.Expr) -> tirx.Expr:
    """``expr`` as float32, dropping a cast that only rounded an fp32 value to fp16."""
    if operand_dtype(expr) == "float32":
        return expr
    if isinstance(expr, tirx.Cast) and operand_dtype(expr.value) == "float32":
        return expr.value
    return tirx.Cast("float32", expr)


def is_fp16_matmul(pat: KNPattern) -> bool:
    """fp16 operands and output: the case that must accumulate in fp32."""
    return (
        pat.out_dtype == "float16" and operand_dtype(pat.lhs) == operand_dtype(pat.rhs) == "float16"
    )


def accumulate_in_fp32(sch: s_tir.Schedule, block_rv: s_tir.schedule.SBlockRV) -> bool:
    """Make an fp16 ``acc = acc + term`` reduction block accumulate in fp32.

    The block must write an intermediate (cache / rfactor) buffer whose consumer rounds it
    back. ``unsafe_set_dtype`` alone keeps the arithmetic in fp16 (``acc = f32(f16(acc) +
    a * b)``), so the body is rebuilt as ``acc = acc + f32(a) * f32(b)`` (or ``acc +
    f32(term)``) and swapped in with ``ScheduleState.replace``.
    """
    block = sch.get(block_rv)
    store = block.body
    if not isinstance(store, tirx.BufferStore) or str(store.buffer.dtype) != "float16":
        return False
    found = split_accumulation(store)
    if found is None:
        return False
    _, term = found
    if isinstance(term, tirx.Mul):
        term = tirx.Mul(_to_fp32(term.a), _to_fp32(term.b))
    sch.unsafe_set_dtype(block_rv, 0, "float32")
    block = sch.get(block_rv)
    acc_buf = block.body.buffer
    idx = list(block.body.indices)
    init = tirx.BufferStore(acc_buf, tirx.FloatImm("float32", 0.0), idx)
    # The consumer reads of the old fp16 buffer were cast by unsafe_set_dtype; the terms
    # read other buffers, except the rfactor partials, which are fp32 already (_to_fp32).
    body = tirx.BufferStore(acc_buf, tirx.Add(tirx.BufferLoad(acc_buf, idx), _to_fp32(term)), idx)
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


def largest_divisor(x: int, cap: int) -> int:
    """Largest divisor of x that is <= cap (>= 1)."""
    for d in range(min(cap, x), 0, -1):
        if x % d == 0:
            return d
    return 1
