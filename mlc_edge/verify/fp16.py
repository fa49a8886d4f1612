"""How much error a correct fp16 kernel may have, when it runs in real fp16.

On a device with ``cl_khr_fp16`` (Intel's CPU runtime: bit-exact IEEE half arithmetic)
the kernels run as the phone runs them, and each is compared with its unscheduled
function computed in fp32 on the CPU from the same fp16 inputs (``fp32_inputs``: fp16 ->
fp32 is exact). What a correct kernel may then differ by, relative to the largest
|reference| of each output buffer (``check.compare``):

- the output's rounding to fp16: at most half an ulp, ``u = 2^-11`` of the value;
- fp16 roundings inside a fused kernel (the matmul's result before the residual add,
  SiLU's ``exp`` and product in half, a norm's scaled value): each at most ``u`` of an
  intermediate of the output's size; we allow up to three;
- fp32 accumulation (our GEMVs and matmuls, TVM's norms and attention): a K-term fp32
  sum errs by at most ``K * 2^-24`` of the sum of |terms| (worst case; ``2^-11`` at
  K = 8192), and typically ``sqrt(K) * 2^-24`` of it (about ``2^-17`` at K = 8192):
  below the budget of the roundings above for the K of LLMs.

Hence ``FP16_TOLERANCE = 4u`` (1.95e-3). A reduction that accumulates in fp16 instead
loses about ``u`` per addition once the partial sum is large: ``sqrt(K) * u`` and more
(1-2 % of max|y| at K = 2048-8192 for TVM's stock matmuls), several times the budget.
Not every fp16 accumulation does: TVM's stock decode GEMV measured 2.6-4.7 u at
K = 2048-8192 (N = 64; ``tests/test_verify_fp16.py`` asserts only that it is worse than
ours), near the budget. The rewrite of ``half`` to ``float`` on devices without
fp16 cannot see any of this.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FP16_UNIT_ROUNDOFF = 2.0**-11  # u: half an ulp of 1.0 in fp16 (11-bit significand)
FP16_ROUNDINGS = 4  # the output's rounding and up to three inside a fused kernel
FP16_TOLERANCE = FP16_ROUNDINGS * FP16_UNIT_ROUNDOFF

NATIVE_FP16_NOTE = (
    "fp16 kernels ran in fp16 (cl_khr_fp16), against an fp32 reference computed from the "
    f"same fp16 inputs; tolerance {FP16_ROUNDINGS} x 2^-11 of the largest |reference| "
    "(the output's fp16 rounding and up to three inside a fused kernel; fp32 "
    "accumulation stays below it): long fp16 accumulations exceed it"
)


def fp32_inputs(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every fp16 array as fp32 (exact), for the fp32 reference."""
    return {
        name: a.astype(np.float32) if a.dtype == np.float16 else a for name, a in arrays.items()
    }
