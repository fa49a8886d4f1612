"""The reference a kernel is checked against: the same PrimFunc, unscheduled, on the CPU.

The unscheduled PrimFunc (as FuseTIR left it: plain loops, no threads) compiled with LLVM
computes what the scheduled kernels must compute. When the kernels run with ``half``
rewritten to ``float``, the reference is made fp32 the same way (its TVMScript text with
``float16`` replaced), so both sides do the same arithmetic in the same precision and
differ only in summation order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tvm
from tvm import IRModule, tirx
from tvm.target import Target


def _without_region_annotations(text: str) -> str:
    """The script without ``T.reads``/``T.writes`` (the parser infers them again) and
    without the forward declarations of block buffers they needed: TVMScript prints a
    block whose reads use a buffer it allocates later in a form it cannot parse back
    ("Variable ... already defined", TVM's CPU decode attention)."""
    allocated = set(re.findall(r"^\s*(\w+) = T\.sblock_alloc_buffer\(", text, re.M))
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("T.reads(", "T.writes(")):
            continue
        m = re.match(r"(\w+) = T\.Buffer\(", stripped)
        if m and m.group(1) in allocated:
            continue
        lines.append(line)
    return "\n".join(lines)


def as_float32(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float16 buffer, cast and constant made float32."""
    text = func.script()
    if "float16" not in text:
        return func
    text = text.replace('"float16"', '"float32"').replace("T.float16(", "T.float32(")
    try:
        parsed = tvm.script.from_source(text)
    except Exception:  # noqa: BLE001 - TVMScript does not always round-trip
        parsed = tvm.script.from_source(_without_region_annotations(text))
    return parsed["main"] if isinstance(parsed, IRModule) else parsed


def reference_funcs(
    funcs: Mapping[str, tirx.PrimFunc], as_float: bool
) -> tuple[dict[str, tirx.PrimFunc], dict[str, str]]:
    """(the functions as the reference runs them, why the others cannot be made fp32)."""
    ready: dict[str, tirx.PrimFunc] = {}
    problems: dict[str, str] = {}
    for name, f in funcs.items():
        try:
            ready[name] = (as_float32(f) if as_float else f).with_attr("global_symbol", name)
        except Exception as e:  # noqa: BLE001 - a TVMScript round trip that fails
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            problems[name] = f"its reference could not be made fp32 ({first[:120]})"
    return ready, problems


def build_reference(funcs: Mapping[str, tirx.PrimFunc]) -> Any:
    """One LLVM module holding every function, by name (one LLVM run for all)."""
    return tvm.tirx.build(IRModule(dict(funcs)), target=Target({"kind": "llvm"}))


def _tensor(array: np.ndarray, copy: bool) -> Any:
    """A CPU tensor of ``array``: its own memory when aligned for DLPack and not
    copied (read-only inputs: the output layer's weight is not copied again)."""
    device = tvm.cpu()
    if not copy and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        try:
            return tvm.runtime.from_dlpack(array)
        except Exception:  # noqa: BLE001 - e.g. a read-only numpy array
            pass
    return tvm.runtime.tensor(np.ascontiguousarray(array), device)


def run_reference(
    lib: Any,
    name: str,
    params: list[tuple[str, bool]],
    arrays: Mapping[str, np.ndarray],
    scalars: Mapping[str, Any],
    written: Iterable[str],
) -> dict[str, np.ndarray]:
    """Call ``name``; returns the ``written`` buffers after the call (copies of the
    inputs: ``arrays`` are not changed).

    ``params``: (name, is_buffer) in the function's order; scalars are passed by value.
    """
    written = set(written)
    tensors = {n: _tensor(a, n in written) for n, a in arrays.items()}
    args = [tensors[n] if is_buffer else scalars[n] for n, is_buffer in params]
    lib[name](*args)
    return {n: tensors[n].numpy() for n in arrays if n in written}
