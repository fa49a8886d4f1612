"""The GPU rule set: our KN matmul rules first, TVM's stock dlight GPU rules after them.

``gpu_rules(tuning)`` is what ``tvm.s_tir.dlight.ApplyDefaultSchedule(*gpu_rules())``
takes: our rules for the linear layers (fp16 weights stored ``[in, out]``, "KN", and the
tied lm_head ``[vocab, hidden]``), TVM's stock rules for everything else. A GPU family
specialises it by its tunables (``schedules/adreno/``: each Adreno's work-group cap and
tuned values; ``schedules/cuda/``). ``stock_rules()`` is the stock set alone (the
baseline of ``benchmarks/opencl_kernels.py``).

    GemvKN            decode ``[b, 1, K] x [K, N]``: vector loads along N, K split across
                      the work-group, fp32 accumulation             (gemv_kn.py)
    PrefillMatmulKN   prefill chunks ``[1, seq_len, K] x [K, N]``: all rows of a chunk per
                      thread in registers, weights read once a chunk, fp32   (prefill_matmul.py)
    GemvInt4KN        decode with 4-bit weights (the dequantization fused): one 32-bit word
                      of 8 columns per lane unpacked in registers, fp32    (gemv_int4.py)
    PrefillInt4KN     prefill chunks with 4-bit weights: a word unpacked into registers once
                      for all rows of the chunk, fp32            (prefill_int4.py)
    GemvNK            the tied lm_head ``[b, 1, K] x [N, K]^T`` (weight ``[vocab, hidden]``)
                      of decode/prefill/batch_decode/batch_prefill: rows read contiguously,
                      K split across the work-group, fp32 accumulation      (gemv_nk.py)

Their tunables (tiles, vector widths, work-groups, unrolling) have one source of
defaults, ``tuning.json`` (``tuning.py``).
"""

from __future__ import annotations

from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from .common import SCHEDULE_ANNOTATION
from .gemv_int4 import GemvInt4KN
from .gemv_kn import GemvKN
from .gemv_nk import GemvNK
from .prefill_int4 import PrefillInt4KN
from .prefill_matmul import PrefillMatmulKN
from .tuning import DEFAULT_GPU, KNTuning

__all__ = [
    "SCHEDULE_ANNOTATION",
    "GemvInt4KN",
    "GemvKN",
    "GemvNK",
    "KNTuning",
    "PrefillInt4KN",
    "PrefillMatmulKN",
    "gpu_rules",
    "stock_rules",
]


def stock_rules(matmul: ScheduleRule | None = None) -> list[ScheduleRule]:
    """TVM's dlight GPU rules in priority order: the first that accepts a PrimFunc wins
    (``matmul`` replaces dlight's Matmul: CUDA's leaves out tensor cores).

    Matmul before GEMV: prefill's ``[1, chunk, in] x [in, out]`` is a matmul, decode's
    ``[1, 1, in] x [in, out]`` a GEMV; LowBatchGEMV takes small symbolic batches
    (``batch_decode``). Reduction/GeneralReduction take softmax and RMS norm (one
    work-group per row). Fallback last: anything left (element-wise, ``take``, RoPE, the
    KV cache's append) gets a flat blockIdx/threadIdx mapping, so no function stays host
    code. dlight takes its Adreno branches (vectorized loads, no shared memory, "outer
    reduction" for ``[in, out]`` weights) where the target has device ``adreno``.
    """
    return [
        matmul or dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


def gpu_rules(tuning: KNTuning | None = None) -> list[ScheduleRule]:
    """Our KN matmul rules (the 4-bit GEMV takes only fused 4-bit functions, which the
    fp16 rules do not match) and the NK GEMV with ``tuning`` (the defaults when None),
    then the stock rules for every other function."""
    tuning = tuning or KNTuning.from_dict(DEFAULT_GPU, {})
    return [
        GemvKN(tuning),
        GemvInt4KN(tuning),
        PrefillMatmulKN(tuning),
        PrefillInt4KN(tuning),
        GemvNK(tuning),
        *stock_rules(),
    ]
