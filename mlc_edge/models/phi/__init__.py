"""Phi-1 / Phi-1.5 / Phi-2 (``PhiForCausalLM``): parallel attention and MLP, partial RoPE."""

from ..base import ModelFamily
from .config import PhiConfig
from .model import PhiForCausalLM
from .weights import hf_weight_map

FAMILY = ModelFamily(
    "phi",
    ("PhiForCausalLM",),
    PhiConfig,
    PhiForCausalLM,
    hf_weight_map,
    conv_template="phi-2",  # the QA format: its tokenizer has no chat template
)
