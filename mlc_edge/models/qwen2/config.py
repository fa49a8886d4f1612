"""Qwen2's config.json: Llama's fields, plus the sliding-window fields we must refuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ..llama.config import LlamaConfig


def refuse_unsupported_act(hf: dict[str, Any], family: str, supported: tuple[str, ...]) -> str:
    """The ``hidden_act`` of ``hf``, or a UserError naming the field."""
    act = hf.get("hidden_act", supported[0])
    if act not in supported:
        raise UserError(
            f"hidden_act '{act}' is not supported for {family} (supported: {', '.join(supported)})"
        )
    return act


def refuse_sliding_window(hf: dict[str, Any], family: str) -> None:
    """We compile full attention only: a config that asks for a window is refused, not ignored.

    ``sliding_window`` itself is always present in Qwen configs and means nothing unless
    ``use_sliding_window`` is true; transformers 5 also writes ``layer_types``.
    """
    if hf.get("use_sliding_window"):
        raise UserError(
            f"use_sliding_window: true is not supported for {family}: mlc-edge compiles full "
            "attention only (set it to false only if the model was trained without it)"
        )
    other = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise UserError(
            f"layer_types {other} are not supported for {family}: mlc-edge compiles "
            "'full_attention' layers only"
        )


def refuse_qwen_unsupported(hf: dict[str, Any], family: str) -> None:
    """What Qwen2 and Qwen3 configs may ask for that their Llama-based definitions lack."""
    refuse_unsupported_act(hf, family, ("silu",))
    refuse_sliding_window(hf, family)


@dataclass
class Qwen2Config(LlamaConfig):
    """Llama's sizes; Qwen2 always has q/k/v biases and never an o_proj or MLP bias."""

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Qwen2Config:
        refuse_qwen_unsupported(hf, "Qwen2")
        # transformers' Qwen2 ignores attention_bias / mlp_bias, so we must too.
        return super().from_hf({**hf, "attention_bias": False, "mlp_bias": False})
