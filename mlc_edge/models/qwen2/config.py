"""Qwen2's config.json: the Llama-style fields, less the sliding window we must refuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hf_config import RuntimeSizes
from ..llama_style import LlamaStyleConfig, refuse_what_llama_style_lacks


@dataclass(kw_only=True)
class Qwen2Config(LlamaStyleConfig):
    """Llama's sizes; Qwen2 always has q/k/v biases and never an o_proj or MLP bias."""

    @classmethod
    def from_hf(cls, hf: dict[str, Any], runtime: RuntimeSizes) -> Qwen2Config:
        refuse_what_llama_style_lacks(hf, "Qwen2")
        # transformers' Qwen2 ignores attention_bias / mlp_bias, so we must too.
        return super().from_hf({**hf, "attention_bias": False, "mlp_bias": False}, runtime)
