"""What the GPU KN rules share: finding the matmul, the fp32 accumulator, tile sizes.

The pattern matching (``C[.., m, n] += A[.., m, k] * W[k, n]`` plus injective epilogues)
and the fp32 rewrite of an fp16 reduction are ``schedules/kn_pattern.py``'s, shared with
the CPU rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import s_tir, tirx
from tvm.ir import TensorLoad
from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from ..kn_pattern import KNPattern, find_kn_matmul, fold_epilogues
from .tuning import DEFAULT_GPU, KNTuning

__all__ = [
    "SCHEDULE_ANNOTATION",
    "KNMatch",
    "KNMatmulRule",
    "bind_partials",
    "is_decode_shaped",
    "pick_vector",
    "read_index",
    "sum_column_partials",
    "sum_loops",
]

# Block annotation naming the rule that scheduled a matmul (tests read it back). The
# rules' names keep the prefix of their first GPU ("adreno.gemv_kn"), on every GPU.
SCHEDULE_ANNOTATION = "mlc_edge.schedule"


def pick_vector(n: int, want: int) -> int:
    """Largest power of two <= ``want`` dividing ``n``: every thread's vector is whole,
    so a guard for odd N falls on threads, never inside a vector."""
    v = 1
    while v * 2 <= want and n % (v * 2) == 0:
        v *= 2
    return v


def is_decode_shaped(block: s_tir.SBlock) -> bool:
    """One token per row: the output's token axis (second to last) is a unit axis.

    After ``normalize_prim_func`` a unit axis is indexed by a constant 0, so decode's
    ``[1, 1, N]`` and batch decode's ``[batch_size, 1, N]`` qualify; a prefill chunk's
    ``[1, seq_len, N]`` does not.
    """
    idx = list(block.body.indices)
    if len(idx) < 2:
        return True
    tok = idx[-2]
    return isinstance(tok, tirx.IntImm) and tok.value == 0


def static_int(expr: tirx.Expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


@dataclass
class KNMatch:
    """A KN matmul found in a PrimFunc, with static N and K."""

    sch: s_tir.Schedule
    block: s_tir.schedule.SBlockRV  # the matmul
    pat: KNPattern  # which iterators are rows (m_iters), columns (n_iter), reduction (k_iter)
    epilogues: list[Any]  # injective blocks after it (residual add, SiLU * mul, cast)
    iters: list[tirx.IterVar]
    loops: list[s_tir.schedule.LoopRV]
    n: int
    k: int


class KNMatmulRule(GPUScheduleRule):
    """A GPU rule for ``[.., K] x [K, N]`` (or ``[N, K]``) matmuls: finds the pattern
    (decode-shaped or not, as the subclass wants) and hands it to ``schedule``; a
    primitive refusing an unexpected variant of the pattern passes the function on to the
    next rule."""

    decode_shaped: bool | None  # GemvKN: one token per row; PrefillMatmulKN: a chunk;
    # None: either (the rule decides)
    weight_kn: bool = True  # W[k, n]; False: W[n, k] (GemvNK)
    rule_name: str  # what ``mark`` writes on the blocks it scheduled

    def __init__(self, tuning: KNTuning | None = None):
        self.tuning = tuning or KNTuning.from_dict(DEFAULT_GPU, {})

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            found = self.match(s_tir.Schedule(func))
            return None if found is None else self.schedule(found, target)
        except (ScheduleError, ValueError):
            return None

    def match(self, sch: s_tir.Schedule) -> KNMatch | None:
        found = find_kn_matmul(sch, weight_kn=self.weight_kn)
        if found is None:
            return None
        main, pat, epilogues = found
        block = main.block_rv
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        if len(loops) != len(iters) or (
            self.decode_shaped is not None
            and is_decode_shaped(sch.get(block)) != self.decode_shaped
        ):
            return None
        n = static_int(iters[pat.n_iter].dom.extent)
        k = static_int(iters[pat.k_iter].dom.extent)
        if n is None or k is None:
            return None
        return KNMatch(sch, block, pat, epilogues, iters, loops, n, k)

    def schedule(self, m: KNMatch, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError

    def threads(self, target: Target) -> int:
        """Threads a work-group may have: the tuning's cap and the target's
        ``max_num_threads``."""
        limit = target.attrs.get("max_num_threads", None)
        configured = self.tuning.max_threads
        return min(configured, int(limit)) if limit is not None else configured

    def mark(self, sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
        """Name the rule on the block it scheduled (kept in the scheduled PrimFunc)."""
        sch.annotate(block, SCHEDULE_ANNOTATION, self.rule_name)


def bind_partials(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    rows: s_tir.schedule.LoopRV,
    tiles: s_tir.schedule.LoopRV,
    threads: tuple[s_tir.schedule.LoopRV, ...],
    outer: s_tir.schedule.LoopRV,
    unrolled: s_tir.schedule.LoopRV,
    vector: s_tir.schedule.LoopRV,
) -> s_tir.schedule.LoopRV:
    """Bind a GEMV's partial sums: ``rows`` to blockIdx.y, ``tiles`` to blockIdx.x, the
    (adjacent) ``threads`` loops fused into threadIdx.x, ``unrolled`` unrolled and
    ``vector`` vectorized, the zeroing before ``outer`` (the outer reduction loop)
    vectorized too. Returns the thread loop."""
    sch.bind(rows, "blockIdx.y")
    sch.bind(tiles, "blockIdx.x")
    thread = sch.fuse(*threads)
    sch.bind(thread, "threadIdx.x")
    sch.unroll(unrolled)
    sch.vectorize(vector)
    init = sch.decompose_reduction(block, outer)
    sch.vectorize(sch.get_loops(init)[-1])
    return thread


def sum_column_partials(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    n_or: s_tir.schedule.LoopRV,
    columns: int,
    threads: int,
    writeback: s_tir.schedule.SBlockRV,
    epilogues: list[s_tir.schedule.SBlockRV],
) -> None:
    """The KN GEMVs' last step: the work-group's partials of each of its ``columns``
    columns (a multiple of ``threads``) summed, one column per thread, and the rounding
    write-back with the epilogues folded into it under the same thread, which stores the
    column it summed."""
    sch.reverse_compute_at(block, n_or, preserve_unit_loops=False)
    b_k, b_n = sum_loops(sch, block, n_or)
    _, b_x = sch.split(b_n, [columns // threads, threads])
    sch.bind(b_x, "threadIdx.x")
    sch.decompose_reduction(block, b_k)
    remaining = fold_epilogues(sch, epilogues)
    for blk in [writeback, *remaining]:
        sch.reverse_compute_at(blk, b_x, preserve_unit_loops=True)


def sum_loops(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, above: s_tir.schedule.LoopRV
) -> tuple[s_tir.schedule.LoopRV, ...]:
    """The final sum's (reduction, column) loops below ``above``, in that order; a unit
    reduction loop (one partial) is added back."""
    loops = sch.get_loops(block)
    above_var = sch.get(above).loop_var
    start = next(i for i, lp in enumerate(loops) if sch.get(lp).loop_var.same_as(above_var))
    below = loops[start + 1 :]
    realize = get_sblockrealize(sch, block)
    red_values = [
        value
        for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True)
        if iv.iter_type == tirx.IterVar.CommReduce
    ]
    red = [lp for lp in below if any(_uses(value, sch.get(lp).loop_var) for value in red_values)]
    spatial = [lp for lp in below if lp not in red]
    if len(spatial) != 1 or len(red) > 1:
        raise ValueError("unexpected loops of the final sum")
    if not red:
        red = [sch.add_unit_loop(block)]
    sch.reorder(spatial[0], red[0])
    return red[0], spatial[0]


def _uses(expr: tirx.Expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def read_index(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, operand: tirx.Expr
) -> int | None:
    """Position in the block's reads of the buffer ``operand`` (a load, maybe cast) reads."""
    while isinstance(operand, tirx.Cast):
        operand = operand.value
    if not isinstance(operand, TensorLoad):
        return None
    for i, region in enumerate(sch.get(block).reads):
        if region.source.same_as(operand.source):
            return i
    return None
