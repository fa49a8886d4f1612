"""What every model family provides to the rest of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSource:
    """Where one bundle parameter comes from in a Hugging Face checkpoint.

    ``hf_names`` are concatenated along axis 0 (the output dimension of a PyTorch
    linear weight) in this order: that is how q/k/v and gate/up are fused.
    ``is_linear_weight`` tells the weight scheme to apply its linear layout.
    """

    hf_names: tuple[str, ...]
    is_linear_weight: bool = False
