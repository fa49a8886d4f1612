"""Which targets build the 4-bit schemes (``mlc_edge.quantization.int4``).

A 4-bit matmul is one PrimFunc holding the dequantization and the matmul
(``passes/fuse_int4_matmul.py``). The CPU rule (``schedules/cpu/int4.py``) inlines the
dequantization into the matmul's loads; on ``android-opencl`` and ``cuda`` our GPU rules
(``schedules/gpu/gemv_int4.py``, ``prefill_int4.py``) unpack the words in registers, with
fp32 accumulation. A target says whether it builds them (``TargetSpec.builds_int4``,
``compiler/targets.py``); one that does not gets this one line instead of a build nobody
has checked.
"""

from __future__ import annotations

from ..errors import UserError
from ..quantization import WeightScheme
from .targets import TARGETS, TargetSpec


def int4_target_names() -> list[str]:
    """The targets that build 4-bit schemes, by family (``cuda`` for ``cuda:sm_90``...)."""
    names: list[str] = []
    for target in TARGETS.values():
        family = target.name.split(":")[0]
        if target.builds_int4 and family not in names:
            names.append(family)
    return names


def require_int4_support(scheme: WeightScheme, target_spec: TargetSpec) -> None:
    if scheme.int4_layout is None or target_spec.builds_int4:
        return
    raise UserError(
        f"{scheme.name} is not supported on {target_spec.name} yet: its 4-bit matmul "
        f"kernels are built and checked for {', '.join(int4_target_names())} only; use one "
        "of those, or --quantization q0f16t for this target"
    )
