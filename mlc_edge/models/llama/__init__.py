"""Llama 2 / 3 / 3.1 / 3.2 and pruned variants (``LlamaForCausalLM``)."""

from ..base import ModelFamily
from ..llama_style import llama_style_weight_map
from .config import LlamaConfig
from .model import LlamaForCausalLM

FAMILY = ModelFamily(
    "llama",
    ("LlamaForCausalLM",),
    LlamaConfig,
    LlamaForCausalLM,
    llama_style_weight_map,
    conv_template="llama-2",  # Llama 3 tokenizers are told by their tokens
)
