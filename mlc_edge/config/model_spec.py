"""Everything that decides what gets compiled: family, config with runtime sizes, scheme.

The same ``model_config`` dict (the Hugging Face config plus the runtime sizes) is
written into ``mlc-chat-config.json``, so a bundle can be recompiled from itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models import ModelFamily, find_family
from ..quantization import WeightScheme, get_scheme
from .presets import PRESET_KEYS


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a directory: give a Hugging Face model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {model_dir}: give a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


@dataclass
class ModelSpec:
    family: ModelFamily
    model_config: dict[str, Any]  # the HF config + runtime sizes
    config: Any  # the family's parsed config
    scheme: WeightScheme

    @classmethod
    def create(
        cls, hf_config: dict[str, Any], quantization: str, runtime_sizes: dict[str, int]
    ) -> ModelSpec:
        family = find_family(hf_config)
        scheme = get_scheme(quantization)
        for key, value in runtime_sizes.items():
            if value < 1:
                raise UserError(f"{key} must be a positive integer, got {value}")
        model_config = {**hf_config, **runtime_sizes, "tensor_parallel_shards": 1}
        config = family.config_class.from_hf(hf_config)
        for key in PRESET_KEYS:
            setattr(config, key, runtime_sizes[key])
        if runtime_sizes["prefill_chunk_size"] > runtime_sizes["context_window_size"]:
            raise UserError("prefill_chunk_size must not exceed context_window_size")
        return cls(family, model_config, config, scheme)

    @classmethod
    def from_chat_config(cls, chat_config: dict[str, Any]) -> ModelSpec:
        model_config = chat_config["model_config"]
        sizes = {k: int(model_config[k]) for k in PRESET_KEYS}
        return cls.create(model_config, chat_config["quantization"], sizes)

    @property
    def runtime_sizes(self) -> dict[str, int]:
        return {k: int(self.model_config[k]) for k in PRESET_KEYS}
