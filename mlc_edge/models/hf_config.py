"""What every family's config shares: reading config.json's common fields and refusing
what we do not compile, plus the runtime sizes a preset adds.

A family's ``config.py`` subclasses ``DecoderConfig`` (or ``LlamaStyleConfig``) and
reads its own fields with these helpers; no family reads another family's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

# Rope types whose math the paged KV cache's kernels compute exactly as transformers does.
_SUPPORTED_ROPE_TYPES = ("default", "llama3")


def require(hf: dict[str, Any], key: str) -> Any:
    """``hf[key]``, or a UserError naming the missing field."""
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


def refuse_unsupported_act(hf: dict[str, Any], family: str, supported: tuple[str, ...]) -> str:
    """The ``hidden_act`` of ``hf`` (``supported[0]`` when absent), or a UserError naming
    the field."""
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


@dataclass(frozen=True)
class RuntimeSizes:
    """The sizes a preset sets (``config/presets.py``'s ``PRESET_KEYS``): they shape the
    KV cache, the embedding buffer and ``_metadata``, not the weights."""

    max_batch_size: int
    prefill_chunk_size: int
    context_window_size: int


@dataclass(kw_only=True)
class DecoderConfig:
    """The numbers every decoder-only family's model definition reads, and the runtime
    sizes it is compiled for. ``DecoderLM``'s default hooks read these fields."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Leading dimensions of each head RoPE rotates (Phi: a fraction; else head_dim).
    rotary_dim: int
    vocab_size: int
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    # Biases on the fused q/k/v and the output projection (``layers.FusedQKVAttention``).
    attention_bias: bool = False
    runtime: RuntimeSizes


def read_decoder_sizes(hf: dict[str, Any]) -> dict[str, Any]:
    """``DecoderConfig``'s size fields as a family's ``from_hf`` passes them on: head_dim
    defaults to hidden / heads, KV heads to heads, RoPE to every head dimension."""
    heads = int(require(hf, "num_attention_heads"))
    hidden = int(require(hf, "hidden_size"))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    return {
        "hidden_size": hidden,
        "intermediate_size": int(require(hf, "intermediate_size")),
        "num_hidden_layers": int(require(hf, "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": head_dim,
        "rotary_dim": head_dim,
        "vocab_size": int(require(hf, "vocab_size")),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
