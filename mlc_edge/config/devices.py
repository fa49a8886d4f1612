"""Device descriptions: what one GPU allows, as data (``configs/devices/<name>.json``).

A description holds hardware facts only (work-group and allocation limits, memory,
bandwidth); the schedule rules' tunables are the rule set's (``schedules/``). Each file
names its ``family`` (the TVM target's ``device``, e.g. ``adreno``) and the ``target``
that lists it: ``configs/devices/adreno-750.json`` with ``"target": "android-opencl"`` is
``--target android-opencl:adreno-750``. ``default.json`` is the plain target's (a GPU we
have no file for). Where the numbers come from: ``docs/devices.md``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

MiB = 1 << 20

# The description of a target's GPU when none is named (``android-opencl``).
DEFAULT_DEVICE = "default"


def _device_dir():
    return resources.files("mlc_edge.configs").joinpath("devices")


def _read(name: str) -> dict[str, Any] | None:
    path = _device_dir().joinpath(f"{name}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def device_names(target: str) -> list[str]:
    """The named devices ``target`` lists (``adreno-740``, ...), sorted; not the default."""
    names = []
    for path in _device_dir().iterdir():
        if path.name.endswith(".json") and path.name != f"{DEFAULT_DEVICE}.json":
            if json.loads(path.read_text()).get("target") == target:
                names.append(path.name.removesuffix(".json"))
    return sorted(names)


@dataclass(frozen=True)
class DeviceLimits:
    """What one GPU allows, as its OpenCL driver reports it (see the JSON files' notes).

    ``max_work_group_size`` (CL_DEVICE_MAX_WORK_GROUP_SIZE) bounds every kernel's
    threads; ``schedule_threads`` is what the schedules are given (``max_num_threads`` of
    the TVM target), lower because a kernel's own limit falls with its register use.
    ``max_mem_alloc_bytes`` (CL_DEVICE_MAX_MEM_ALLOC_SIZE) bounds every single buffer,
    weights included. ``local_mem_bytes`` (CL_DEVICE_LOCAL_MEM_SIZE) is what one
    work-group's local memory may hold (the rules keep to it). ``global_mem_bytes`` and
    ``memory_bandwidth_gb_s`` are for planning (what fits, the decode speed ceiling), not
    checked. ``family`` is the TVM target's ``device`` (``adreno`` sends TVM's stock rules
    down their Adreno branches).
    """

    name: str
    family: str
    gpu: str
    soc: str
    max_work_group_size: int
    schedule_threads: int
    max_mem_alloc_bytes: int
    local_mem_bytes: int
    global_mem_bytes: int
    preferred_vector_width_half: int
    vector_load_bytes: int
    memory_bandwidth_gb_s: float
    notes: str = ""

    @classmethod
    def load(cls, name: str) -> DeviceLimits:
        data = _read(name)
        if data is None:
            raise KeyError(f"no device description configs/devices/{name}.json")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def find(cls, name: str) -> DeviceLimits | None:
        """``name``'s description, or None when there is no file for it."""
        return cls.load(name) if _read(name) is not None else None

    def replace(self, **changes: Any) -> DeviceLimits:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def max_threads(self) -> int:
        """The most threads a scheduled work-group may have on this device."""
        return min(self.schedule_threads, self.max_work_group_size)

    def summary(self) -> str:
        return (
            f"work-group <= {self.max_work_group_size} (kernels use {self.schedule_threads}), "
            f"one buffer <= {self.max_mem_alloc_bytes / MiB:.0f} MiB, "
            f"global memory {self.global_mem_bytes / 2**30:.1f} GiB reported, "
            f"half vector width {self.preferred_vector_width_half} "
            f"(loads of {self.vector_load_bytes} bytes), "
            f"bandwidth {self.memory_bandwidth_gb_s:g} GB/s"
        )
