"""The CPU rule for 4-bit matmuls: the dequantization inlined into the matmul's loads.

``FuseInt4Matmul`` makes each 4-bit layer one PrimFunc in which a ``dequantize_int4``
block fills a ``[K, N]`` intermediate that the matmul block reads. Left so, every call
would write the whole dequantized weight to memory (``RequireFusedDequantize`` refuses
that). This rule inlines the block, so the packed words are unpacked where the matmul
reads them, and then parallelizes the outer loops like ``ParallelSpatial`` (which alone
skips nests with little work, and would leave the intermediate of a small decode GEMV).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from mlc_edge.quantization.int4 import DEQUANTIZE_NAME

from . import ParallelSpatial


class Int4Matmul(ParallelSpatial):
    """Inline ``dequantize_int4`` blocks, then ``ParallelSpatial``; other functions: None."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        dequantize = [
            b
            for b in sch.get_child_blocks(sch.get_sblock("root"))
            if sch.get(b).name_hint.startswith(DEQUANTIZE_NAME)
        ]
        if not dequantize:
            return None
        for block in dequantize:
            sch.compute_inline(block)
        parallel = super().apply(sch.mod["main"], target, tunable)
        return parallel if parallel is not None else sch
