"""Llama 2 / 3 / 3.1 / 3.2 (and pruned variants) in ``tvm.relax.frontend.nn``.

q/k/v and gate/up are fused into one matmul each; attention and RoPE run inside TVM's
paged KV cache (rotate-half RoPE, as transformers' Llama does).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from ...quantization import WeightScheme
from ..decoder import DecoderLM, KVCacheShape
from ..vocab import VocabEmbedding, VocabHead
from .config import LlamaConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: WeightScheme):
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


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: WeightScheme):
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = scheme.linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias
        )
        self.down_proj = scheme.linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: WeightScheme):
        norm = dict(axes=-1, epsilon=cfg.rms_norm_eps, bias=False, dtype=scheme.dtype)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = LlamaAttention(cfg, scheme)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, **norm)
        self.mlp = LlamaMLP(cfg, scheme)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: WeightScheme):
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, scheme)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, scheme) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(
            cfg.hidden_size, axes=-1, epsilon=cfg.rms_norm_eps, bias=False, dtype=scheme.dtype
        )

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv, layer_id)
        return self.norm(x)


class LlamaForCausalLM(DecoderLM):
    def __init__(self, cfg: LlamaConfig, scheme: WeightScheme, target: Target):
        super().__init__(cfg, scheme, target)
        self.model = LlamaModel(cfg, scheme)
        if not cfg.tie_word_embeddings:
            self.lm_head = VocabHead(cfg.hidden_size, cfg.vocab_size, scheme, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward_hidden(self, input_embeds: Tensor, kv: PagedKVCache) -> Tensor:
        return self.model(input_embeds, kv)

    def get_logits(self, hidden: Tensor) -> Tensor:
        if self.tie_word_embeddings:
            return self.model.embed_tokens.logits(hidden)
        return self.lm_head(hidden)

    def kv_cache_shape(self) -> KVCacheShape:
        c = self.config
        return KVCacheShape(
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            rope_scaling=c.rope_scaling,
            rotary_dim=c.head_dim,
        )
