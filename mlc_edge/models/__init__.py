"""Model families mlc-edge compiles, found from a config.json's ``architectures``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .base import ParamSource
from .decoder import DecoderLM, KVCacheShape
from .llama.config import LlamaConfig
from .llama.model import LlamaForCausalLM
from .llama.weights import hf_weight_map as llama_weight_map


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    architectures: tuple[str, ...]
    config_class: type
    model_class: type[DecoderLM]
    weight_map: Callable[[Any], dict[str, ParamSource]]


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        model_type="llama",
        architectures=("LlamaForCausalLM",),
        config_class=LlamaConfig,
        model_class=LlamaForCausalLM,
        weight_map=llama_weight_map,
    ),
)


def find_family(hf_config: dict[str, Any]) -> ModelFamily:
    archs = hf_config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in archs):
            return family
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    named = ", ".join(archs) if archs else f"model_type '{hf_config.get('model_type')}'"
    raise UserError(f"architecture {named} is not supported; supported: {supported}")


__all__ = ["FAMILIES", "DecoderLM", "KVCacheShape", "ModelFamily", "ParamSource", "find_family"]
