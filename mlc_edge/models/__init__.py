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
from .phi.config import PhiConfig
from .phi.model import PhiForCausalLM
from .phi.weights import hf_weight_map as phi_weight_map
from .qwen2.config import Qwen2Config
from .qwen2.model import Qwen2ForCausalLM
from .qwen2.weights import hf_weight_map as qwen2_weight_map
from .qwen3.config import Qwen3Config
from .qwen3.model import Qwen3ForCausalLM
from .qwen3.weights import hf_weight_map as qwen3_weight_map


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    architectures: tuple[str, ...]
    config_class: type
    model_class: type[DecoderLM]
    weight_map: Callable[[Any], dict[str, ParamSource]]


# (model_type, architectures, config_class, model_class, weight_map)
FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("llama", ("LlamaForCausalLM",), LlamaConfig, LlamaForCausalLM, llama_weight_map),
    ModelFamily("qwen2", ("Qwen2ForCausalLM",), Qwen2Config, Qwen2ForCausalLM, qwen2_weight_map),
    ModelFamily("qwen3", ("Qwen3ForCausalLM",), Qwen3Config, Qwen3ForCausalLM, qwen3_weight_map),
    ModelFamily("phi", ("PhiForCausalLM",), PhiConfig, PhiForCausalLM, phi_weight_map),
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
