"""The runtime-size presets in ``configs/presets/`` (installed as ``mlc_edge.configs``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..errors import UserError

# The values a preset may set; each also has its own CLI flag to override it.
PRESET_KEYS = ("max_batch_size", "prefill_chunk_size", "context_window_size")


def _preset_dir():
    return resources.files("mlc_edge.configs").joinpath("presets")


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".json") for p in _preset_dir().iterdir() if p.name.endswith(".json")
    )


def load_preset(name: str) -> dict[str, Any]:
    path = _preset_dir().joinpath(f"{name}.json")
    if not path.is_file():
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(preset_names())}")
    data = json.loads(path.read_text())
    return {k: int(data[k]) for k in PRESET_KEYS}
