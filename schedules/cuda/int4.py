"""The GPU 4-bit rules (``schedules/gpu/gemv_int4.py``, ``prefill_int4.py``) for CUDA.

The same loop nests: a lane loads one 32-bit word of 8 weights, unpacks it in registers,
accumulates in fp32. One change: a loop the GPU rules vectorize over a word's 8 columns
of fp32 (the accumulators, their zeroing, the unpacked weights) is unrolled. CUDA's
widest vector types hold 128 bits; TVM 0.27's CUDA code generator stands a float32x8 in
for a ``ulonglong4`` read through pointer casts, and writes a float32x8 constant (the
accumulators' zero) as ``make_ulonglong4`` with 8 arguments, which nvcc refuses (the
defect ``CUDA_TUNING`` keeps the NK GEMV's vectors at 4 for). Unrolled, each fp32 value
is a scalar register of its own, which is what nvcc makes of a 256-bit vector anyway.
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.target import Target

from ..gpu import GemvInt4KN, PrefillInt4KN
from ..gpu.gemv_int4 import Int4Parts

# CUDA's widest vector types (uint4, float4) hold 128 bits.
CUDA_VECTOR_BITS = 128


def unroll_wide_vectors(sch: s_tir.Schedule) -> int:
    """Unroll every vectorized loop whose block stores more than 128 bits over it;
    returns how many loops it unrolled."""
    names: list[str] = []

    def visit(block: s_tir.SBlock) -> None:
        if isinstance(block.body, tirx.BufferStore):
            names.append(block.name_hint)

    tvm_ffi.structural_walk(sch.mod["main"].body, [(s_tir.SBlock, visit)])
    unrolled = 0
    for name in names:
        block = sch.get_sblock(name)
        bits = sch.get(block).body.buffer.dtype.bits
        for loop in sch.get_loops(block):
            stmt = sch.get(loop)
            if (
                stmt.kind == tirx.ForKind.VECTORIZED
                and isinstance(stmt.extent, tirx.IntImm)
                and stmt.extent.value * bits > CUDA_VECTOR_BITS
            ):
                sch.unroll(loop)
                unrolled += 1
    return unrolled


class _NoWideVectors:
    """Mixed in before a GPU 4-bit rule: its schedule, then ``unroll_wide_vectors``."""

    def schedule_int4(
        self, sch: s_tir.Schedule, deq: s_tir.schedule.SBlockRV, parts: Int4Parts, target: Target
    ) -> s_tir.Schedule | None:
        done = super().schedule_int4(sch, deq, parts, target)  # type: ignore[misc]
        if done is not None:
            unroll_wide_vectors(done)
        return done


class CudaGemvInt4KN(_NoWideVectors, GemvInt4KN):
    """``GemvInt4KN`` with no vector wider than CUDA's 128 bits."""


class CudaPrefillInt4KN(_NoWideVectors, PrefillInt4KN):
    """``PrefillInt4KN`` with no vector wider than CUDA's 128 bits."""
