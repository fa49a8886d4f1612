"""The Adreno rule set: the GPU KN rules (``schedules/gpu/``) with an Adreno's tunables.

``adreno_rules(gpu)`` gives ``gpu`` (a device description, ``configs/devices/<gpu>.json``)
the default tunables with its work-group cap (``min(schedule_threads,
max_work_group_size)``) and the values tuned for it in ``tuning.json`` here, if any; an
Adreno without a description gets ``default.json``'s. The Adreno target (``device
adreno``) also sends TVM's stock rules down their Adreno branches.
"""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

from ..gpu import SCHEDULE_ANNOTATION, GemvKN, GemvNK, PrefillMatmulKN, gpu_rules, stock_rules
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


def adreno_rules(gpu: str = "default") -> list[ScheduleRule]:
    """The GPU rules tuned for ``gpu`` (``adreno-750``, ...; unknown: the defaults)."""
    return gpu_rules(AdrenoTuning.load(gpu))
