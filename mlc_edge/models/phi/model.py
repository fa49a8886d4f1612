"""Phi-2 in ``tvm.relax.frontend.nn``.

One LayerNorm feeds attention and the MLP in parallel: ``x + attn(ln(x)) + mlp(ln(x))``.
The attention is the shared fused one (q/k/v with biases, output projection ``dense``
with bias); the paged KV cache applies rotate-half RoPE to the first ``rotary_dim``
dimensions of each head only, as transformers' Phi does.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from ...quantization import WeightScheme
from ..decoder import DecoderLM
from ..layers import DecoderStack, FusedQKVAttention
from ..vocab import VocabHead
from .config import GELU_APPROXIMATION, PhiConfig


class PhiMLP(nn.Module):
    def __init__(self, cfg: PhiConfig, scheme: WeightScheme):
        self.approximate = GELU_APPROXIMATION[cfg.hidden_act]
        self.fc1 = scheme.linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = scheme.linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(op.gelu(self.fc1(x), approximate=self.approximate))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: PhiConfig, scheme: WeightScheme):
        self.input_layernorm = nn.LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=scheme.dtype
        )
        self.self_attn = FusedQKVAttention(cfg, scheme)
        self.mlp = PhiMLP(cfg, scheme)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        h = self.input_layernorm(x)
        return self.self_attn(h, kv, layer_id) + self.mlp(h) + x


class PhiModel(DecoderStack):
    def __init__(self, cfg: PhiConfig, scheme: WeightScheme):
        super().__init__(cfg, scheme, lambda: PhiDecoderLayer(cfg, scheme))
        self.final_layernorm = nn.LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=scheme.dtype
        )

    def final_norm(self, x: Tensor) -> Tensor:
        return self.final_layernorm(x)


class PhiForCausalLM(DecoderLM):
    def __init__(self, cfg: PhiConfig, scheme: WeightScheme, target: Target):
        super().__init__(cfg, scheme, target)
        self.model = PhiModel(cfg, scheme)
        if cfg.tie_word_embeddings:
            # transformers ties only the weight: the output bias stays its own tensor.
            self.lm_head_bias = nn.Parameter((cfg.vocab_size,), scheme.dtype)
        if self.has_lm_head:
            self.lm_head = VocabHead(
                cfg.hidden_size, cfg.vocab_size, scheme, bias=not cfg.tie_word_embeddings
            )

    def get_logits(self, hidden: Tensor) -> Tensor:
        logits = super().get_logits(hidden)
        return logits + self.lm_head_bias if self.tie_word_embeddings else logits
