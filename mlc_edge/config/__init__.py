"""From a Hugging Face config.json and a preset to everything that shapes the build."""

from .model_spec import ModelSpec, read_hf_config
from .presets import load_preset, preset_names

__all__ = ["ModelSpec", "load_preset", "preset_names", "read_hf_config"]
