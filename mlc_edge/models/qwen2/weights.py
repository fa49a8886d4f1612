"""Where each Qwen2 bundle parameter comes from: the Llama-style map plus q/k/v biases."""

from __future__ import annotations

from ..base import ParamSource
from ..llama_style import llama_style_weight_map
from .config import Qwen2Config


def hf_weight_map(cfg: Qwen2Config) -> dict[str, ParamSource]:
    mapping = llama_style_weight_map(cfg)  # no biases: Qwen2Config has attention_bias False
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn"
        mapping[f"{p}.qkv_proj.bias"] = ParamSource(tuple(f"{p}.{t}_proj.bias" for t in "qkv"))
    return mapping
