"""Qwen2 / Qwen2.5 in ``tvm.relax.frontend.nn``: the Llama definition with q/k/v biases.

Everything but the attention's bias pattern is Llama's (RMSNorm, SwiGLU, rotate-half RoPE
in the paged KV cache, tied or untied embeddings), so the Llama modules are reused and
only each layer's attention is swapped.
"""

from __future__ import annotations

from tvm.target import Target

from ...quantization import WeightScheme
from ..llama.config import LlamaConfig
from ..llama.model import LlamaAttention, LlamaForCausalLM
from .config import Qwen2Config


class LlamaWithAttention(LlamaForCausalLM):
    """Llama's model with every layer's attention an ``attention_class``."""

    attention_class: type[LlamaAttention]

    def __init__(self, cfg: LlamaConfig, scheme: WeightScheme, target: Target):
        super().__init__(cfg, scheme, target)
        # Reassigning keeps the attribute's place: the parameter (load) order stays Llama's.
        for layer in self.model.layers:
            layer.self_attn = self.attention_class(cfg, scheme)


class Qwen2Attention(LlamaAttention):
    """Llama's attention with a bias on the fused q/k/v projection, none on o_proj."""

    def __init__(self, cfg: Qwen2Config, scheme: WeightScheme):
        super().__init__(cfg, scheme)  # cfg.attention_bias is False: no biases yet
        self.qkv_proj = scheme.linear(cfg.hidden_size, self.qkv_proj.out_features, bias=True)


class Qwen2ForCausalLM(LlamaWithAttention):
    attention_class = Qwen2Attention
