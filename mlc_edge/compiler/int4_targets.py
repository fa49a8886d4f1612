"""Which targets build the 4-bit schemes (``mlc_edge.quantization.int4``).

A 4-bit matmul is one PrimFunc holding the dequantization and the matmul
(``passes/fuse_int4_matmul.py``). The CPU rule (``schedules/cpu/int4.py``) inlines the
dequantization into the matmul's loads; on ``android-opencl`` our GPU rules
(``schedules/gpu/gemv_int4.py``, ``prefill_int4.py``) unpack the words in registers, with
fp32 accumulation, and ``mlc-edge verify`` checks them on PoCL. CUDA is not checked yet
(no nvcc here to build it): a 4-bit scheme there gets this one line instead of a build
nobody has run.
"""

from __future__ import annotations

from ..errors import UserError
from ..quantization import WeightScheme
from .targets import TargetSpec

INT4_DEVICES = ("cpu", "opencl")  # TargetSpec.device


def require_int4_support(scheme: WeightScheme, target_spec: TargetSpec) -> None:
    if scheme.int4_layout is None or target_spec.device in INT4_DEVICES:
        return
    raise UserError(
        f"{scheme.name} is not supported on {target_spec.name} yet: its 4-bit matmul "
        "kernels are built and checked for cpu and android-opencl only; use one of "
        "those, or --quantization q0f16t for this target"
    )
