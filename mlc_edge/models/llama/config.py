"""Llama's config.json: the Llama-style fields, SiLU only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ..hf_config import RuntimeSizes
from ..llama_style import LlamaStyleConfig


@dataclass(kw_only=True)
class LlamaConfig(LlamaStyleConfig):
    @classmethod
    def from_hf(cls, hf: dict[str, Any], runtime: RuntimeSizes) -> LlamaConfig:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"hidden_act '{act}' is not supported for Llama (only 'silu')")
        return super().from_hf(hf, runtime)
