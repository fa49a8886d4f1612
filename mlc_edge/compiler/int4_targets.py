"""Which targets build the 4-bit schemes (``mlc_edge.quantization.int4``).

A 4-bit matmul is one PrimFunc holding the dequantization and the matmul
(``passes/fuse_int4_matmul.py``). The CPU build runs it (``schedules/cpu`` inlines the
dequantization into the matmul's loads); the GPU targets have no rule for it yet, and
``RequireKernels`` would refuse the unscheduled function with a message about kernels.
A user asking for a 4-bit scheme on such a target gets this one line instead, first.
"""

from __future__ import annotations

from ..errors import UserError
from ..quantization import WeightScheme
from .targets import TargetSpec

INT4_DEVICES = ("cpu",)


def require_int4_support(scheme: WeightScheme, target_spec: TargetSpec) -> None:
    if scheme.int4_layout is None or target_spec.device in INT4_DEVICES:
        return
    raise UserError(
        f"{scheme.name} is not supported on {target_spec.name} yet: its 4-bit matmul "
        f"kernels exist for {', '.join(INT4_DEVICES)} only; use --target cpu, or "
        "--quantization q0f16t for this target"
    )
