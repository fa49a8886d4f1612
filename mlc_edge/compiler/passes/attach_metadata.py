"""Add ``_metadata``: the JSON the runtime reads first, with the planned memory usage.

Runs right after ``StaticPlanBlockMemory``: by then every temporary lives in a storage
allocation of constant size, and their sum per function is what the runtime must
reserve beside the weights and the KV cache (``memory_usage`` in docs/runtime-contract.md).
"""

import json
from typing import Any

import tvm
from tvm import IRModule, relax


def memory_usage(mod: IRModule) -> dict[str, int]:
    """Bytes of the static storage allocations of each Relax function."""
    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    usage: dict[str, int] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or gv.name_hint == "_metadata":
            continue
        total = 0

        def visit(expr: relax.Expr) -> None:
            nonlocal total
            if isinstance(expr, relax.Call) and expr.op == alloc_storage:
                size = expr.args[0]
                if isinstance(size, relax.ShapeExpr):
                    for dim in size.values:
                        if isinstance(dim, tvm.tirx.IntImm):
                            total += int(dim)

        relax.analysis.post_order_visit(func, visit)
        usage[gv.name_hint] = total
    return usage


@tvm.transform.module_pass(opt_level=0, name="AttachMetadata")
class AttachMetadata:
    """Adds ``_metadata``; ``sink``, if given, receives the same JSON as a dict: a phone's
    library cannot be run here to ask for it, yet the bundle needs its numbers
    (``memory_usage`` for the app's ``estimated_vram_bytes``)."""

    def __init__(self, metadata: dict[str, Any], sink: dict[str, Any] | None = None):
        self.metadata = metadata
        self.sink = sink

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        text = json.dumps({**self.metadata, "memory_usage": memory_usage(mod)}, sort_keys=True)
        if self.sink is not None:
            self.sink.update(json.loads(text))
        bb = relax.BlockBuilder(mod)
        with bb.function("_metadata", []):
            bb.emit_func_output(tvm.ir.StringImm(text))
        return bb.get()
