"""An Adreno's tunables: the KN rules' defaults (``schedules/gpu/tuning.json``), the
work-group cap and local memory of its device description (``configs/devices/``) and the
values tuned for it (``tuning.json`` here, by GPU: ``{"gpus": {"adreno-750": {"gemv":
{"threads_k": 4}}}}``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from mlc_edge.config.devices import DEFAULT_DEVICE, DeviceLimits

from ..gpu.tuning import KNTuning


def tuned_values() -> dict[str, dict[str, Any]]:
    """``tuning.json``'s values per GPU (those that differ from the defaults)."""
    text = resources.files(__package__).joinpath("tuning.json").read_text()
    return json.loads(text)["gpus"]


class AdrenoTuning(KNTuning):
    @classmethod
    def load(cls, gpu: str = DEFAULT_DEVICE) -> AdrenoTuning:
        """The tunables of ``gpu`` (e.g. ``adreno-750``); an unknown GPU gets the defaults."""
        limits = DeviceLimits.find(gpu) or DeviceLimits.load(DEFAULT_DEVICE)
        return cls.for_device(limits)

    @classmethod
    def for_device(
        cls, limits: DeviceLimits, tuned: dict[str, dict[str, Any]] | None = None
    ) -> AdrenoTuning:
        """The tunables of the GPU ``limits`` describes (``tuned``: instead of tuning.json)."""
        tuned = tuned_values() if tuned is None else tuned
        return cls.from_dict(
            limits.name, tuned.get(limits.name, {}), limits.max_threads, limits.local_mem_bytes
        )
