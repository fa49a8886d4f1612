"""Evaluate the host code's integer expressions (launch extents, kernel scalars) in Python.

Only what host code computes sizes with: arithmetic, comparisons, casts, selects. A name
that is not given raises ``KeyError``; reading a buffer's byte offset gives 0 (the runner
passes whole buffers).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from tvm import ir, tirx


# TVM's integer division rounds toward zero (Div, Mod); FloorDiv/FloorMod toward -inf.
def _trunc_div(a: Any, b: Any) -> Any:
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _trunc_mod(a: Any, b: Any) -> Any:
    if isinstance(a, float) or isinstance(b, float):
        return math.fmod(a, b)
    return a - _trunc_div(a, b) * b


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    tirx.Add: operator.add,
    tirx.Sub: operator.sub,
    tirx.Mul: operator.mul,
    tirx.Div: _trunc_div,
    tirx.Mod: _trunc_mod,
    tirx.FloorDiv: operator.floordiv,
    tirx.FloorMod: operator.mod,
    tirx.Min: min,
    tirx.Max: max,
    tirx.EQ: operator.eq,
    tirx.NE: operator.ne,
    tirx.LT: operator.lt,
    tirx.LE: operator.le,
    tirx.GT: operator.gt,
    tirx.GE: operator.ge,
    tirx.And: lambda a, b: bool(a) and bool(b),
    tirx.Or: lambda a, b: bool(a) or bool(b),
    tirx.BitwiseAnd: operator.and_,
    tirx.BitwiseOr: operator.or_,
    tirx.BitwiseXor: operator.xor,
    tirx.LShift: operator.lshift,
    tirx.RShift: operator.rshift,
}

_BYTE_OFFSET_FIELD = 8  # tvm_struct_get(handle, 0, 8): the tensor's byte_offset


def evaluate(expr: Any, env: Mapping[str, Any]) -> Any:
    """The value of ``expr`` with the variables of ``env`` (by name)."""
    if isinstance(expr, int | float):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.FloatImm):
        return float(expr.value)
    if isinstance(expr, tirx.Var):
        return env[str(expr.name)]
    op = _BINARY.get(type(expr))
    if op is not None:
        return op(evaluate(expr.a, env), evaluate(expr.b, env))
    if isinstance(expr, tirx.Not):
        return not evaluate(expr.a, env)
    if isinstance(expr, tirx.Cast):
        value = evaluate(expr.value, env)
        return float(value) if "float" in str(expr.ty) else int(value)
    if isinstance(expr, tirx.Select):
        chosen = expr.true_value if evaluate(expr.condition, env) else expr.false_value
        return evaluate(chosen, env)
    if isinstance(expr, ir.Call):
        name = expr.op.name if isinstance(expr.op, ir.Op) else str(expr.op)
        if name == "tirx.if_then_else":
            cond, a, b = expr.args
            return evaluate(a if evaluate(cond, env) else b, env)
        if name == "tirx.tvm_struct_get" and int(expr.args[2]) == _BYTE_OFFSET_FIELD:
            return 0
        raise KeyError(f"call to {name}")
    raise KeyError(f"cannot evaluate {type(expr).__name__}: {expr}")
