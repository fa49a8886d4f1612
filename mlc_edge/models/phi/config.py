"""Phi's config.json (``PhiForCausalLM``: Phi-1, Phi-1.5, Phi-2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ..hf_config import (
    DecoderConfig,
    RuntimeSizes,
    read_decoder_sizes,
    read_rope,
    refuse_unsupported_act,
)

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


@dataclass(kw_only=True)
class PhiConfig(DecoderConfig):
    layer_norm_eps: float
    hidden_act: str = "gelu_new"
    # q/k/v and dense all have biases.
    attention_bias: bool = True

    @classmethod
    def from_hf(cls, hf: dict[str, Any], runtime: RuntimeSizes) -> PhiConfig:
        act = refuse_unsupported_act(hf, "Phi", tuple(GELU_APPROXIMATION))
        if hf.get("qk_layernorm"):
            raise UserError(
                "qk_layernorm: true is not supported for Phi: mlc-edge does not compile the "
                "q/k LayerNorms it adds"
            )
        theta, scaling = read_rope(hf)
        if scaling:
            raise UserError(
                f"rope scaling '{scaling['rope_type']}' is not supported for Phi (only plain RoPE)"
            )
        sizes = read_decoder_sizes(hf)
        return cls(
            **{**sizes, "rotary_dim": _rotary_dim(hf, sizes["head_dim"])},
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            rope_theta=theta,
            hidden_act=act,
            runtime=runtime,
        )
