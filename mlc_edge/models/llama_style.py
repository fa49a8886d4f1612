"""The Llama-style decoder that Llama, Qwen2 and Qwen3 are: RMSNorm before attention and
before a SwiGLU MLP, fused q/k/v (and gate/up) matmuls, rotate-half RoPE in the paged KV
cache, tied or untied embeddings.

Its config, modules and checkpoint names live here so each of those families states
only how it differs (its config checks, its attention, its extra parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from ..quantization import WeightScheme
from .base import ParamSource
from .decoder import DecoderLM
from .hf_config import (
    DecoderConfig,
    RuntimeSizes,
    read_decoder_sizes,
    read_rope,
    refuse_sliding_window,
    refuse_unsupported_act,
)
from .layers import DecoderStack, FusedQKVAttention
from .vocab import VocabHead


@dataclass(kw_only=True)
class LlamaStyleConfig(DecoderConfig):
    rms_norm_eps: float
    mlp_bias: bool = False
    max_position_embeddings: int = 2048

    @classmethod
    def from_hf(cls, hf: dict[str, Any], runtime: RuntimeSizes) -> LlamaStyleConfig:
        """The fields as transformers' Llama reads them; a family refuses what its
        definition lacks before calling this."""
        theta, scaling = read_rope(hf)
        return cls(
            **read_decoder_sizes(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            runtime=runtime,
        )


def refuse_what_llama_style_lacks(hf: dict[str, Any], family: str) -> None:
    """What a Llama-style family's config (Qwen2's, Qwen3's) may ask for that this
    definition lacks: another activation than SiLU, a sliding window."""
    refuse_unsupported_act(hf, family, ("silu",))
    refuse_sliding_window(hf, family)


class SwiGLUMLP(nn.Module):
    def __init__(self, cfg: LlamaStyleConfig, scheme: WeightScheme):
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = scheme.linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias
        )
        self.down_proj = scheme.linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class LlamaStyleLayer(nn.Module):
    def __init__(
        self, cfg: LlamaStyleConfig, scheme: WeightScheme, attention: type[FusedQKVAttention]
    ):
        norm = dict(axes=-1, epsilon=cfg.rms_norm_eps, bias=False, dtype=scheme.dtype)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = attention(cfg, scheme)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, **norm)
        self.mlp = SwiGLUMLP(cfg, scheme)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStyleModel(DecoderStack):
    def __init__(
        self, cfg: LlamaStyleConfig, scheme: WeightScheme, attention: type[FusedQKVAttention]
    ):
        super().__init__(cfg, scheme, lambda: LlamaStyleLayer(cfg, scheme, attention))
        self.norm = nn.RMSNorm(
            cfg.hidden_size, axes=-1, epsilon=cfg.rms_norm_eps, bias=False, dtype=scheme.dtype
        )

    def final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)


class LlamaStyleLM(DecoderLM):
    """The whole model; a family sets ``attention_class`` to change every layer's attention."""

    attention_class: type[FusedQKVAttention] = FusedQKVAttention

    def __init__(self, cfg: LlamaStyleConfig, scheme: WeightScheme, target: Target):
        super().__init__(cfg, scheme, target)
        self.model = LlamaStyleModel(cfg, scheme, self.attention_class)
        if self.has_lm_head:
            self.lm_head = VocabHead(cfg.hidden_size, cfg.vocab_size, scheme, bias=False)


def llama_style_weight_map(cfg: LlamaStyleConfig) -> dict[str, ParamSource]:
    """Where each parameter of ``LlamaStyleLM`` comes from in a transformers checkpoint."""
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
