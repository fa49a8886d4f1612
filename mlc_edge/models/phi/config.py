"""Phi's config.json (``PhiForCausalLM``: Phi-1, Phi-1.5, Phi-2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ..llama.config import _require, read_rope
from ..qwen2.config import refuse_unsupported_act

# hidden_act → the GELU TVM computes: "gelu_new" and "gelu_pytorch_tanh" are both the
# tanh approximation in transformers; "gelu" is the exact (erf) one.
GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": None}


def _rotary_dim(hf: dict[str, Any], head_dim: int) -> int:
    """``int(head_dim * partial_rotary_factor)``, as transformers computes it.

    transformers 4 writes the factor at the top level, 5 inside ``rope_parameters``;
    transformers' PhiConfig defaults it to 0.5.
    """
    params = hf.get("rope_parameters") or {}
    factor = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    rotary_dim = int(head_dim * factor)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise UserError(
            f"partial_rotary_factor {factor} gives rotary_dim {rotary_dim} for head_dim "
            f"{head_dim}: it must be a positive even number of dimensions at most head_dim"
        )
    return rotary_dim


@dataclass
class PhiConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    vocab_size: int
    layer_norm_eps: float
    rope_theta: float
    hidden_act: str = "gelu_new"
    tie_word_embeddings: bool = False
    # q/k/v and dense all have biases: lets Phi reuse Llama's attention module.
    attention_bias: bool = True
    # Runtime sizes, filled in from the preset: they shape the KV cache and metadata.
    context_window_size: int = 512
    prefill_chunk_size: int = 16
    max_batch_size: int = 1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> PhiConfig:
        act = refuse_unsupported_act(hf, "Phi", tuple(GELU_APPROXIMATION))
        if hf.get("qk_layernorm"):
            raise UserError(
                "qk_layernorm: true is not supported for Phi: mlc-edge does not compile the "
                "q/k LayerNorms it adds"
            )
        theta, scaling = read_rope(hf)
        if scaling:
            raise UserError(
                f"rope scaling '{scaling['rope_type']}' is not supported for Phi (only plain "
                "RoPE)"
            )
        heads = int(_require(hf, "num_attention_heads"))
        hidden = int(_require(hf, "hidden_size"))
        head_dim = int(hf.get("head_dim") or hidden // heads)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_require(hf, "intermediate_size")),
            num_hidden_layers=int(_require(hf, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rotary_dim=_rotary_dim(hf, head_dim),
            vocab_size=int(_require(hf, "vocab_size")),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            rope_theta=theta,
            hidden_act=act,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
