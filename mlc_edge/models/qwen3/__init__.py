"""Qwen3 (``Qwen3ForCausalLM``): Llama's math with per-head RMSNorm on q and k."""

from ..base import ModelFamily
from .config import Qwen3Config
from .model import Qwen3ForCausalLM
from .weights import hf_weight_map

FAMILY = ModelFamily(
    "qwen3",
    ("Qwen3ForCausalLM",),
    Qwen3Config,
    Qwen3ForCausalLM,
    hf_weight_map,
    conv_template="qwen3",
)
