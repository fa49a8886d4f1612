"""Where each Phi bundle parameter comes from in a Hugging Face checkpoint."""

from __future__ import annotations

from ..base import ParamSource
from .config import PhiConfig


def hf_weight_map(cfg: PhiConfig) -> dict[str, ParamSource]:
    mapping: dict[str, ParamSource] = {
        "model.embed_tokens.weight": ParamSource(("model.embed_tokens.weight",)),
    }
    if cfg.tie_word_embeddings:
        mapping["lm_head_bias"] = ParamSource(("lm_head.bias",))
    else:
        mapping["lm_head.weight"] = ParamSource(("lm_head.weight",), is_linear_weight=True)
        mapping["lm_head.bias"] = ParamSource(("lm_head.bias",))
    # ours → theirs; every Phi linear layer has a bias. q/k/v are fused in this order.
    linears = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj": ("self_attn.dense",),
        "mlp.fc1": ("mlp.fc1",),
        "mlp.fc2": ("mlp.fc2",),
    }
    norms = {"model.final_layernorm": "model.final_layernorm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        norms[f"{p}.input_layernorm"] = f"{p}.input_layernorm"
        for ours, theirs in linears.items():
            mapping[f"{p}.{ours}.weight"] = ParamSource(
                tuple(f"{p}.{t}.weight" for t in theirs), is_linear_weight=True
            )
            mapping[f"{p}.{ours}.bias"] = ParamSource(tuple(f"{p}.{t}.bias" for t in theirs))
    for ours, theirs in norms.items():
        for kind in ("weight", "bias"):
            mapping[f"{ours}.{kind}"] = ParamSource((f"{theirs}.{kind}",))
    return mapping
