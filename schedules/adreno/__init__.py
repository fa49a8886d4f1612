"""Schedule rules and device limits for Qualcomm Adreno GPUs (OpenCL).

``adreno_rules(gpu)`` is what ``tvm.s_tir.dlight.ApplyDefaultSchedule(*adreno_rules(gpu))``
takes: our rules for the linear layers (weights stored ``[in, out]``, "KN") first, TVM's
stock dlight GPU rules after them for everything else. ``stock_rules()`` is the stock set
alone (the baseline of ``benchmarks/opencl_kernels.py``).

    GemvKN            decode ``[b, 1, K] x [K, N]``: vector loads along N, K split across
                      the work-group, fp32 accumulation             (gemv_kn.py)
    PrefillMatmulKN   prefill chunks ``[1, seq_len, K] x [K, N]``: all rows of a chunk per
                      thread in registers, weights read once a chunk, fp32   (prefill_matmul.py)
    GemvNK            the tied lm_head ``[b, 1, K] x [N, K]^T`` (weight ``[vocab, hidden]``)
                      of decode/prefill/batch_decode/batch_prefill: rows read contiguously,
                      K split across the work-group, fp32 accumulation      (gemv_nk.py)

Their tunables (tiles, vector widths, work-groups, unrolling) are the ``"schedule"``
section of ``<gpu>.json`` beside this module (``tuning.py``); a GPU without a file gets
``default.json``'s. The same JSON files hold each GPU's limits, which
``mlc_edge.compiler.targets`` reads into ``DeviceLimits``.
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from .common import SCHEDULE_ANNOTATION
from .gemv_kn import GemvKN
from .gemv_nk import GemvNK
from .prefill_matmul import PrefillMatmulKN
from .tuning import AdrenoTuning

__all__ = [
    "SCHEDULE_ANNOTATION",
    "AdrenoTuning",
    "GemvKN",
    "GemvNK",
    "PrefillMatmulKN",
    "adreno_rules",
    "stock_rules",
]


def stock_rules() -> list[ScheduleRule]:
    """TVM's dlight GPU rules in priority order: the first that accepts a PrimFunc wins.

    Matmul before GEMV: prefill's ``[1, chunk, in] x [in, out]`` is a matmul, decode's
    ``[1, 1, in] x [in, out]`` a GEMV; LowBatchGEMV takes small symbolic batches
    (``batch_decode``). Reduction/GeneralReduction take softmax and RMS norm (one
    work-group per row). Fallback last: anything left (element-wise, ``take``, RoPE, the
    KV cache's append) gets a flat blockIdx/threadIdx mapping, so no function stays host
    code. dlight takes its Adreno branches (vectorized loads, no shared memory, "outer
    reduction" for ``[in, out]`` weights) because the target has device ``adreno``.
    """
    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


def adreno_rules(gpu: str = "default") -> list[ScheduleRule]:
    """Our KN matmul rules and the NK GEMV tuned for ``gpu`` (``adreno-750``, ...;
    unknown: the defaults), then the stock rules for every other function."""
    tuning = AdrenoTuning.load(gpu)
    return [GemvKN(tuning), PrefillMatmulKN(tuning), GemvNK(tuning), *stock_rules()]
