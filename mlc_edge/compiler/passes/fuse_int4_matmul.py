"""Put each 4-bit weight's dequantization into the matmul that reads it.

``Int4KNLinear`` writes ``matmul(x, dequantize_int4(qweight, qzeros, scales))``. TVM's
``FuseOps`` never fuses an injective producer into a matmul's weight input (it only fuses
element-wise consumers after one), so on its own the dequantization would be a kernel of
its own writing an fp16 copy of the weight on every call: the bytes 4-bit saves, spent
twice. This pass groups the pair by pattern before ``LegalizeOps``; ``FuseTIR`` then makes
one PrimFunc of it, in which the dequantized weight is a local intermediate that the
schedule rules inline into the matmul's loads. ``RequireFusedDequantize`` checks the result.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from ...quantization.int4 import DEQUANTIZE_NAME


def _is_int4_dequantize(ctx: relax.transform.PatternCheckContext) -> bool:
    callee = ctx.annotated_expr["dequantize"].args[0]
    return isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint.startswith(DEQUANTIZE_NAME)


def FuseInt4Matmul() -> tvm.transform.Pass:  # noqa: N802 (named like TVM's passes)
    """Group ``matmul(x, call_tir(dequantize_int4*, ...))`` into one primitive function,
    with the widening of fp16 activations to fp32 before it and the rounding of its
    result back to fp16 after it when they are there (``Int4KNLinear``)."""
    dequantize = is_op("relax.call_tir")(wildcard(), wildcard())
    widened = is_op("relax.matmul")(is_op("relax.astype")(wildcard()), dequantize)
    plain = is_op("relax.matmul")(wildcard(), dequantize)
    annotations = {"dequantize": dequantize}
    patterns = [
        ("mlc_edge.int4_matmul_fp16", is_op("relax.astype")(widened), widened),
        ("mlc_edge.int4_matmul", plain, plain),
    ]
    return relax.transform.FuseOpsByPattern(
        [(name, pattern, annotations, _is_int4_dequantize) for name, pattern, _ in patterns],
        bind_constants=False,
        annotate_codegen=False,
    )
