"""The CPU rule for 4-bit matmuls: the dequantization inlined into the matmul's loads.

``FuseInt4Matmul`` makes each 4-bit layer one PrimFunc in which a ``dequantize_int4``
block fills a ``[K, N]`` intermediate that the matmul block reads. Left so, every call
would write the whole dequantized weight to memory (``RequireFusedDequantize`` refuses
that). This rule inlines the block, so the packed words are unpacked where the matmul
reads them, and orders the loops for the ``[K, N/8]`` words: a chunk of ``n_tile``
columns per task (parallel), then rows, then k, then the chunk's columns innermost, so the
words are read along their rows and the chunk's accumulators stay in cache. (Without the
reorder, k innermost walks the words down a column: a cache miss per word, ~12x slower.)
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from mlc_edge.quantization.int4 import DEQUANTIZE_NAME

from . import ParallelSpatial


class Int4Matmul(ParallelSpatial):
    """Inline ``dequantize_int4`` blocks and tile the matmul over column chunks; other
    functions: None."""

    n_tile = 32

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        dequantize = [b for b in blocks if sch.get(b).name_hint.startswith(DEQUANTIZE_NAME)]
        if not dequantize:
            return None
        for block in dequantize:
            sch.compute_inline(block)
        fallback = sch.copy()
        try:
            self._tile(sch)
            return sch
        except (ScheduleError, ValueError):
            # An unexpected variant: still inlined, parallel where ParallelSpatial can.
            parallel = super().apply(fallback.mod["main"], target, tunable)
            return parallel if parallel is not None else fallback

    def _tile(self, sch: s_tir.Schedule) -> None:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        matmul = [b for b in blocks if sch.get(b).name_hint == "matmul"]
        if len(matmul) != 1:
            raise ValueError("no single matmul block")
        (block,) = matmul
        # The activations' fp16 -> fp32 copy, if any, is read in place.
        for producer in sch.get_producers(block):
            sch.compute_inline(producer)
        iters = sch.get(block).iter_vars
        kinds = [iv.iter_type for iv in iters]
        loops = sch.get_loops(block)
        if len(loops) != len(iters) or kinds[-1] != tirx.IterVar.CommReduce:
            raise ValueError("not a [rows.., n, k] nest")
        *rows, n_loop, k_loop = loops
        n_extent = get_extent(sch, n_loop)
        if not isinstance(n_extent, int) or n_extent % self.n_tile:
            raise ValueError("columns not a multiple of the tile")
        n_o, n_i = sch.split(n_loop, [None, self.n_tile])
        sch.reorder(n_o, *rows, k_loop, n_i)
        sch.parallel(n_o)
        sch.decompose_reduction(block, rows[0] if rows else k_loop)
