"""Where each Qwen3 bundle parameter comes from: the Llama-style map plus q/k norms."""

from __future__ import annotations

from ..base import ParamSource
from ..llama_style import llama_style_weight_map
from .config import Qwen3Config


def hf_weight_map(cfg: Qwen3Config) -> dict[str, ParamSource]:
    mapping = llama_style_weight_map(cfg)
    for i in range(cfg.num_hidden_layers):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{i}.self_attn.{norm}.weight"
            mapping[name] = ParamSource((name,))
    return mapping
