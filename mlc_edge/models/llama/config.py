"""Llama's config.json, read into the few numbers the model definition needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError

# Rope types whose math the paged KV cache's kernels compute exactly as transformers does.
_SUPPORTED_ROPE_TYPES = ("default", "llama3")


def _require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise UserError(f"config.json has no '{key}': is this a complete Hugging Face config?")
    return hf[key]


def read_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, rope_scaling)`` from either transformers 4 or 5 style configs.

    transformers 4 writes ``rope_theta`` + ``rope_scaling``; 5 writes ``rope_parameters``
    holding both. ``rope_scaling`` is returned in the form TVM's KV cache takes: ``{}`` for
    plain RoPE, else a dict with ``rope_type``.
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling.update(params)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"rope scaling '{rope_type}' is not supported (supported: "
            f"{', '.join(_SUPPORTED_ROPE_TYPES)}); remove it from config.json only if the "
            "model was trained without it"
        )
    if rope_type == "default":
        return theta, {}
    return theta, {"rope_type": rope_type, **scaling}


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # Runtime sizes, filled in from the preset: they shape the KV cache and metadata.
    context_window_size: int = 512
    prefill_chunk_size: int = 16
    max_batch_size: int = 1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"hidden_act '{act}' is not supported for Llama (only 'silu')")
        heads = int(_require(hf, "num_attention_heads"))
        hidden = int(_require(hf, "hidden_size"))
        head_dim = hf.get("head_dim") or hidden // heads
        theta, scaling = read_rope(hf)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_require(hf, "intermediate_size")),
            num_hidden_layers=int(_require(hf, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(_require(hf, "vocab_size")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        )
