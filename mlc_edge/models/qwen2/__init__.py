"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama's math with biases on q/k/v."""

from ..base import ModelFamily
from .config import Qwen2Config
from .model import Qwen2ForCausalLM
from .weights import hf_weight_map

FAMILY = ModelFamily(
    "qwen2",
    ("Qwen2ForCausalLM",),
    Qwen2Config,
    Qwen2ForCausalLM,
    hf_weight_map,
    conv_template="qwen2",  # Qwen2.5 is told by its chat template
)
