"""Qwen3's config.json: the Llama-style fields with an explicit ``head_dim``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hf_config import RuntimeSizes
from ..llama_style import LlamaStyleConfig, refuse_what_llama_style_lacks

# transformers' Qwen3Config default; it is not hidden_size // num_attention_heads.
_DEFAULT_HEAD_DIM = 128


@dataclass(kw_only=True)
class Qwen3Config(LlamaStyleConfig):
    @classmethod
    def from_hf(cls, hf: dict[str, Any], runtime: RuntimeSizes) -> Qwen3Config:
        refuse_what_llama_style_lacks(hf, "Qwen3")
        # attention_bias covers q/k/v/o as in Llama; transformers' Qwen3 MLP has no bias.
        return super().from_hf(
            {**hf, "head_dim": hf.get("head_dim") or _DEFAULT_HEAD_DIM, "mlp_bias": False},
            runtime,
        )
