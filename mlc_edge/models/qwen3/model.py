"""Qwen3 in ``tvm.relax.frontend.nn``: the Llama-style decoder with q/k RMSNorm per head.

transformers normalises each q and k head over ``head_dim`` before RoPE. The paged KV
cache applies RoPE inside ``attention_with_fused_qkv``, so the heads are normalised on
the fused q/k/v tensor first and then concatenated back for it.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from ...quantization import WeightScheme
from ..layers import FusedQKVAttention
from ..llama_style import LlamaStyleLM
from .config import Qwen3Config


class Qwen3Attention(FusedQKVAttention):
    def __init__(self, cfg: Qwen3Config, scheme: WeightScheme):
        super().__init__(cfg, scheme)
        norm = dict(axes=-1, epsilon=cfg.rms_norm_eps, bias=False, dtype=scheme.dtype)
        self.q_norm = nn.RMSNorm(cfg.head_dim, **norm)
        self.k_norm = nn.RMSNorm(cfg.head_dim, **norm)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        qkv = op.reshape(self.qkv_proj(x), (b, s, hq + 2 * hkv, d))
        q, k, v = op.split(qkv, [hq, hq + hkv], axis=2)
        qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        out = kv.attention_with_fused_qkv(layer_id, qkv, hq, sm_scale=d**-0.5)
        return self.o_proj(op.reshape(out, (b, s, hq * d)))


class Qwen3ForCausalLM(LlamaStyleLM):
    attention_class = Qwen3Attention
