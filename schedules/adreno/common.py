"""What the Adreno KN rules share: finding the matmul, the fp32 accumulator, tile sizes.

The pattern matching (``C[.., m, n] += A[.., m, k] * W[k, n]`` plus injective epilogues)
and the fp32 rewrite of an fp16 reduction are the CPU KN rule's (``schedules/cpu/
matmul_kn.py``): the same functions reach both targets.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ..cpu.matmul_kn import _accumulate_in_fp32, _dtype, _find_matmul

__all__ = [
    "SCHEDULE_ANNOTATION",
    "accumulate_in_fp32",
    "find_kn_matmul",
    "is_decode_shaped",
    "is_fp16_matmul",
    "largest_divisor",
    "mark",
    "max_threads",
    "pick_vector",
]

# Block annotation naming the rule that scheduled a matmul (tests read it back).
SCHEDULE_ANNOTATION = "mlc_edge.schedule"

find_kn_matmul = _find_matmul
accumulate_in_fp32 = _accumulate_in_fp32


def is_fp16_matmul(pat: object) -> bool:
    """fp16 operands and output: the case that must accumulate in fp32."""
    return (
        getattr(pat, "out_dtype", None) == "float16"
        and _dtype(pat.lhs) == _dtype(pat.rhs) == "float16"  # type: ignore[attr-defined]
    )


def largest_divisor(x: int, cap: int) -> int:
    """Largest divisor of x that is <= cap (>= 1)."""
    for d in range(min(cap, x), 0, -1):
        if x % d == 0:
            return d
    return 1


def pick_vector(n: int, want: int) -> int:
    """Largest power of two <= ``want`` dividing ``n``: every thread's vector is whole,
    so a guard for odd N falls on threads, never inside a vector."""
    v = 1
    while v * 2 <= want and n % (v * 2) == 0:
        v *= 2
    return v


def max_threads(target: Target, configured: int) -> int:
    """Threads a work-group may have: the tuning's cap and the target's ``max_num_threads``."""
    limit = target.attrs.get("max_num_threads", None)
    return min(configured, int(limit)) if limit is not None else configured


def mark(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, rule: str) -> None:
    """Name the rule on the block it scheduled (kept in the scheduled PrimFunc)."""
    sch.annotate(block, SCHEDULE_ANNOTATION, rule)


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
