"""Qwen2 / Qwen2.5 in ``tvm.relax.frontend.nn``: the Llama-style decoder with q/k/v biases.

Everything but the attention's bias pattern is Llama-style (RMSNorm, SwiGLU, rotate-half
RoPE in the paged KV cache, tied or untied embeddings), so only each layer's attention
is Qwen2's.
"""

from __future__ import annotations

from ...quantization import WeightScheme
from ..layers import FusedQKVAttention
from ..llama_style import LlamaStyleLM
from .config import Qwen2Config


class Qwen2Attention(FusedQKVAttention):
    """The fused attention with a bias on the q/k/v projection, none on o_proj."""

    def __init__(self, cfg: Qwen2Config, scheme: WeightScheme):
        super().__init__(cfg, scheme)  # cfg.attention_bias is False: no biases yet
        self.qkv_proj = scheme.linear(cfg.hidden_size, self.qkv_proj.out_features, bias=True)


class Qwen2ForCausalLM(LlamaStyleLM):
    attention_class = Qwen2Attention
