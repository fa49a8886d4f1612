"""Schedule rules and device limits for Qualcomm Adreno GPUs (OpenCL).

``adreno_rules()`` is what ``tvm.s_tir.dlight.ApplyDefaultSchedule(*adreno_rules())`` takes;
for now TVM's stock GPU rules. dlight takes its Adreno branches (vectorized loads, no
shared memory, "outer reduction" for ``[in, out]`` weights) because the target has device
``adreno``.

The JSON files beside this module hold each GPU's limits (``default.json`` for any Adreno
7xx/8xx); ``mlc_edge.compiler.targets`` reads them into ``DeviceLimits``.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

__all__ = ["adreno_rules"]


def adreno_rules() -> list[ScheduleRule]:
    """The rules in priority order: the first that accepts a PrimFunc schedules it.

    Matmul before GEMV: prefill's ``[1, chunk, in] x [in, out]`` is a matmul, decode's
    ``[1, 1, in] x [in, out]`` a GEMV; LowBatchGEMV takes small symbolic batches
    (``batch_decode``). Reduction/GeneralReduction take softmax and RMS norm (one
    work-group per row). Fallback last: anything left (element-wise, ``take``, RoPE, the
    KV cache's append) gets a flat blockIdx/threadIdx mapping, so no function stays host code.
    """
    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]
