"""The CUDA rule set: the GPU rules (``schedules/gpu/``) less our fp16 KN rules (TVM's
stock rules schedule the fp16 linear layers), with our NK GEMV for the tied lm_head
(weight ``[vocab, hidden]``; the stock rules give it fp16 accumulators), our 4-bit KN
rules (``int4.py``: without them the stock rules unpack the words from global memory)
and dlight's Matmul without its tensor-core branch. In MLC-LLM's order."""

from __future__ import annotations

import tvm
from tvm.s_tir.dlight import gpu
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from ..gpu import GemvNK, KNTuning, stock_rules
from .int4 import CudaGemvInt4KN, CudaPrefillInt4KN

# Vectors of 4: TVM 0.27's CUDA code generator writes a float32x8 zero as make_ulonglong4
# with 8 arguments, which nvcc refuses.
CUDA_TUNING = {"gemv_nk": {"vector": 4}}


class MatmulWithoutTensorCores(gpu.Matmul):
    """dlight's GPU Matmul, minus its tensor-core branch (taken for sm_70+ when no fixed
    extent is <= 64, e.g. every prefill matmul): TVM 0.27's ``Tensorize`` segfaults on it
    (seen compiling a Llama-3.2-1B-shaped model). The rule sees the target without
    ``arch``, which only that branch reads."""

    def apply(self, func: tvm.tirx.PrimFunc, target: Target, tunable: bool) -> object:
        plain = Target(
            {
                "kind": target.kind.name,
                "max_num_threads": int(target.attrs["max_num_threads"]),
                "thread_warp_size": int(target.attrs["thread_warp_size"]),
            }
        )
        return super().apply(func, plain, tunable)


def cuda_rules() -> list[ScheduleRule]:
    tuning = KNTuning.from_dict("cuda", CUDA_TUNING)
    return [
        CudaGemvInt4KN(tuning),
        CudaPrefillInt4KN(tuning),
        GemvNK(tuning),
        *stock_rules(matmul=MatmulWithoutTensorCores()),
    ]
