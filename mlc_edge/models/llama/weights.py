"""Where each Llama bundle parameter comes from in a Hugging Face checkpoint."""

from __future__ import annotations

from ..base import ParamSource
from .config import LlamaConfig


def hf_weight_map(cfg: LlamaConfig) -> dict[str, ParamSource]:
    mapping: dict[str, ParamSource] = {
        "model.embed_tokens.weight": ParamSource(("model.embed_tokens.weight",)),
        "model.norm.weight": ParamSource(("model.norm.weight",)),
    }
    if not cfg.tie_word_embeddings:
        mapping["lm_head.weight"] = ParamSource(("lm_head.weight",), is_linear_weight=True)
    fused = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj": ("self_attn.o_proj",),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj": ("mlp.down_proj",),
    }
    biased = {
        "self_attn.qkv_proj": cfg.attention_bias,
        "self_attn.o_proj": cfg.attention_bias,
        "mlp.gate_up_proj": cfg.mlp_bias,
        "mlp.down_proj": cfg.mlp_bias,
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            mapping[f"{p}.{norm}.weight"] = ParamSource((f"{p}.{norm}.weight",))
        for ours, theirs in fused.items():
            mapping[f"{p}.{ours}.weight"] = ParamSource(
                tuple(f"{p}.{t}.weight" for t in theirs), is_linear_weight=True
            )
            if biased[ours]:
                mapping[f"{p}.{ours}.bias"] = ParamSource(tuple(f"{p}.{t}.bias" for t in theirs))
    return mapping
