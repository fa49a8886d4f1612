"""Building blocks more than one family is made of: the fused-q/k/v attention over the
paged KV cache, and the trunk (embedding, layers, final norm) ``DecoderLM`` drives.

Attribute names are parameter names (``model.layers.0.self_attn.qkv_proj.weight``) and
their order is the bundle's parameter order: renaming or reordering one changes bundles.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from ..quantization import WeightScheme
from .hf_config import DecoderConfig
from .vocab import VocabEmbedding


class FusedQKVAttention(nn.Module):
    """One matmul for q/k/v, attention and RoPE inside the paged KV cache (rotate-half, on
    ``cfg.rotary_dim`` dimensions), then the output projection; ``cfg.attention_bias``
    puts a bias on both projections."""

    def __init__(self, cfg: DecoderConfig, scheme: WeightScheme):
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        qkv_out = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = scheme.linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = scheme.linear(
            self.num_q_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias
        )

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(
            self.qkv_proj(x), (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim)
        )
        out = kv.attention_with_fused_qkv(
            layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim**-0.5
        )
        return self.o_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))


class DecoderStack(nn.Module):
    """``embed_tokens``, then ``num_hidden_layers`` layers ``layer(x, kv, layer_id)``, then
    the family's final norm: a subclass adds the norm (under the checkpoint's name) after
    ``super().__init__`` and returns it from ``final_norm``."""

    def __init__(
        self, cfg: DecoderConfig, scheme: WeightScheme, make_layer: Callable[[], nn.Module]
    ):
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, scheme)
        self.layers = nn.ModuleList([make_layer() for _ in range(cfg.num_hidden_layers)])

    def final_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv, layer_id)
        return self.final_norm(x)
