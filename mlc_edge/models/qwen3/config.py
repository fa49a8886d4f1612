"""Qwen3's config.json: Llama's fields with an explicit ``head_dim``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..llama.config import LlamaConfig
from ..qwen2.config import refuse_qwen_unsupported

# transformers' Qwen3Config default; it is not hidden_size // num_attention_heads.
_DEFAULT_HEAD_DIM = 128


@dataclass
class Qwen3Config(LlamaConfig):
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Qwen3Config:
        refuse_qwen_unsupported(hf, "Qwen3")
        # attention_bias covers q/k/v/o as in Llama; transformers' Qwen3 MLP has no bias.
        return super().from_hf(
            {**hf, "head_dim": hf.get("head_dim") or _DEFAULT_HEAD_DIM, "mlp_bias": False}
        )
