"""Lane-wise reductions for the hand-written CPU kernels, built as TIR expressions."""

from __future__ import annotations

from collections.abc import Callable

from tvm import tirx


def across_lanes(v: tirx.PrimExpr, combine: Callable[..., tirx.PrimExpr]) -> tirx.PrimExpr:
    """``combine`` over the lanes of ``v`` (a power of two), the result a scalar: a tree of
    shuffles, each step combining the low half of the lanes with the high half. A serial
    fold would take one operation a lane, and LLVM keeps a float sum in that order."""
    lanes = v.ty.dtype.lanes
    while lanes > 1:
        lanes //= 2
        v = combine(
            tirx.Shuffle([v], list(range(lanes))), tirx.Shuffle([v], list(range(lanes, 2 * lanes)))
        )
    return v
