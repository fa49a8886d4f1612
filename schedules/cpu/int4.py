"""The CPU rule for 4-bit matmuls of several rows (prefill, batch decode; one-row decode
GEMVs are ``int4_gemv.py``'s): ``MatmulKN``'s loop nest with the weights unpacked in
registers.

``FuseInt4Matmul`` makes each 4-bit layer one PrimFunc in which a ``dequantize_int4``
block fills a ``[K, N]`` fp32 intermediate that the matmul block reads as its KN weight.
Left so, every call would write the whole dequantized weight to memory
(``RequireFusedDequantize`` refuses that). This rule schedules the matmul exactly as
``MatmulKN`` does for fp16 weights (parallel column chunks, fp32 accumulator tiles, rows of
a prefill chunk sharing each weight load) and only then inlines the dequantization, so the
vector loop over ``n_v`` columns reads ``n_v / 8`` int32 words of a row, shifts each lane's
nibble out, subtracts the zero point and multiplies by the scale in registers::

    parallel n_o                            # column chunks
      for k_o                               # k in steps of k_tile (within one group)
        for n_m                             # register tiles of the chunk
          for k_i (k_tile)
            for m_i unroll                  # rows (decode: 1)
              for n_v vectorized (16 fp32)  # 2 words: load, permute, shift, and, sub,
                                            # convert, x scale, fma

Every packed word is read once per call (for all the rows of a prefill chunk). The zero
point and scale of a column do not change inside a group, so with ``k_tile`` dividing the
group size LLVM hoists their unpacking out of the ``k_i`` loop. The register tile is one
SIMD register of fp32 (``reg_vectors=1``): with 16 lanes LLVM turns the two words into a
64-bit load and a lane permute; 2 or 4 registers per tile ran ~3x slower on 2048 x 8192.
(``tests/test_cpu_schedules.py`` checks the structure, the LLVM vector instructions and
the results; ``benchmarks/int4_cpu.py`` times it in the model.)

A function this rule cannot tile still gets its dequantization inlined (the loads unpack
the words, scalar code) and its spatial loops parallelized by ``ParallelSpatial``.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from mlc_edge.quantization.int4 import DEQUANTIZE_NAME

from ..kn_pattern import match_kn_matmul, the_reduction
from . import ParallelSpatial
from .matmul_kn import MatmulKN


def dequantize_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    """The ``dequantize_int4`` blocks directly under the root block of ``sch``."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return [b for b in blocks if sch.get(b).name_hint.startswith(DEQUANTIZE_NAME)]


class Int4Matmul(MatmulKN):
    """``MatmulKN`` for the fused ``dequantize_int4`` + matmul functions, the dequantization
    inlined into the vector loop; other functions: None.

    Parameters are ``MatmulKN``'s; the defaults differ: one fp32 register per tile (see the
    module docstring), chunks of 1024 columns (``chunk_bytes`` counts the fp32
    dequantized weight: 4096 bytes = 1024 columns = 512 bytes of packed words a row), and
    8 prefill rows per register tile, each unpacked weight vector used by all 8 (~17%
    faster 16-row prefill than 4 rows on 2048 x 8192 here; 16 rows were no faster).
    """

    def __init__(
        self,
        reg_vectors: int = 1,
        chunk_bytes: int = 4096,
        k_tile: int = 16,
        m_tile: int = 8,
        **kwargs: int | bool | None,
    ):
        super().__init__(
            reg_vectors=reg_vectors,
            chunk_bytes=chunk_bytes,
            k_tile=k_tile,
            m_tile=m_tile,
            **kwargs,
        )

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        if not dequantize_blocks(sch):
            return None
        try:
            tiled = self._tile(sch.copy(), target)
        except (ScheduleError, ValueError):
            tiled = None
        if tiled is not None:
            return tiled
        # An unexpected variant: the dequantization still inlined, parallel where
        # ParallelSpatial can.
        for block in dequantize_blocks(sch):
            sch.compute_inline(block)
        parallel = ParallelSpatial().apply(sch.mod["main"], target, tunable)
        return parallel if parallel is not None else sch

    def _tile(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        r = the_reduction(infos)
        if r is None:
            return None
        # The activations' fp16 -> fp32 widening is read in place; the dequantization stays
        # a block until the matmul is scheduled, so the matmul reads a plain [K, N] weight.
        for info in infos[:r]:
            if not sch.get(info.block_rv).name_hint.startswith(DEQUANTIZE_NAME):
                sch.compute_inline(info.block_rv)
        main = infos[r]
        pat = match_kn_matmul(sch.get(main.block_rv))
        if pat is None or len(main.get_loops()) != len(sch.get(main.block_rv).iter_vars):
            return None
        epilogues = [info.block_rv for info in infos[r + 1 :]]
        scheduled = self.schedule(sch, target, main, pat, epilogues)
        if scheduled is None:
            return None
        for block in dequantize_blocks(scheduled):
            scheduled.compute_inline(block)
        return scheduled
