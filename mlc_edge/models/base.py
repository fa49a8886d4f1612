"""What every model family provides to the rest of the pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .decoder import DecoderLM


@dataclass(frozen=True)
class ParamSource:
    """Where one bundle parameter comes from in a Hugging Face checkpoint.

    ``hf_names`` are concatenated along axis 0 (the output dimension of a PyTorch
    linear weight) in this order: that is how q/k/v and gate/up are fused.
    ``is_linear_weight`` tells the weight scheme to apply its linear layout.
    """

    hf_names: tuple[str, ...]
    is_linear_weight: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """One family, as its folder's ``__init__.py`` declares it (``FAMILY``)."""

    model_type: str  # the bundle's model_type
    architectures: tuple[str, ...]  # config.json ``architectures`` that select it
    config_class: type  # ``from_hf(hf_config, RuntimeSizes)`` → its config
    model_class: type[DecoderLM]
    weight_map: Callable[[Any], dict[str, ParamSource]]  # config → {ours: ParamSource}
    # The conversation template its checkpoints use when the tokenizer does not tell
    # (a name in bundle/conv_templates.py).
    conv_template: str
