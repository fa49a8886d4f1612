"""The runtime-facing surface shared by every decoder-only model.

A family's model is a ``DecoderLM`` whose ``self.model`` is a ``layers.DecoderStack``
(embedding, layers, final norm) and whose output layer is ``self.lm_head`` (absent when
tied to the embedding). The hooks ``embed``, ``forward_hidden`` (input embeddings →
final hidden states, through the paged KV cache), ``get_logits`` and ``kv_cache_shape``
have defaults for that shape, read from the family's ``hf_config.DecoderConfig``; a
family overrides only what differs. This base turns them into the functions MLC-LLM's
runtime calls (see docs/runtime-contract.md): ``embed``, ``prefill``, ``decode``,
``batch_prefill``, ``batch_decode``, ``create_tir_paged_kv_cache``,
``alloc_embedding_tensor`` and ``softmax_with_temperature``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from ..compiler.contract import GREEDY_TEMPERATURE
from .decode_attention import replace_decode_attention
from .hf_config import DecoderConfig
from .kv_cache_kernels import replace_merge_state, replace_transpose_append
from .layers import DecoderStack
from .rope_kernel import replace_split_rotary


def softmax_with_temperature_te(
    logits: te.Tensor, temperature: te.Tensor, active_vocab_size: int
) -> te.Tensor:
    """``softmax(logits / T)`` per row; for ``T <= GREEDY_TEMPERATURE`` the maximum's ids
    share probability 1 equally (dividing by 0 would make every entry NaN). Ids from
    ``active_vocab_size`` on get 0.

    One expression, ``weight``, is both summed and normalised: ``exp(x - max)`` when
    sampling, ``x == max`` (1 or 0) when greedy.
    """
    batch, _, vocab = logits.shape
    f32 = "float32"

    def greedy(b):
        return temperature[b] <= tirx.const(GREEDY_TEMPERATURE, f32)

    def scaled(b, v):  # -inf past the active vocabulary: never the maximum
        return tirx.if_then_else(
            v < active_vocab_size,
            tirx.if_then_else(greedy(b), logits[b, 0, v], logits[b, 0, v] / temperature[b]),
            tirx.min_value(f32),
        )

    k = te.reduce_axis((0, vocab), name="k")
    row_max = te.compute((batch,), lambda b: te.max(scaled(b, k), axis=k), name="row_max")

    def weight(b, v):
        x = scaled(b, v)
        return tirx.if_then_else(
            v < active_vocab_size,
            tirx.if_then_else(greedy(b), (x == row_max[b]).astype(f32), te.exp(x - row_max[b])),
            tirx.const(0, f32),
        )

    j = te.reduce_axis((0, vocab), name="j")
    total = te.compute((batch,), lambda b: te.sum(weight(b, j), axis=j), name="total")
    return te.compute((batch, 1, vocab), lambda b, _, v: weight(b, v) / total[b], name="probs")


@dataclass(frozen=True)
class KVCacheShape:
    """What the paged KV cache needs to know about the attention layers."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any]
    rotary_dim: int


class DecoderLM(nn.Module):
    """Base class of the model definitions: ``__init__`` keeps what every family's
    functions read from the config; subclasses add ``self.model`` (and ``self.lm_head``)."""

    model: DecoderStack

    def __init__(self, cfg: DecoderConfig, scheme: Any, target: Target):
        self.config = cfg
        self.dtype: str = scheme.dtype
        self.hidden_size: int = cfg.hidden_size
        self.vocab_size: int = cfg.vocab_size
        self.prefill_chunk_size: int = cfg.runtime.prefill_chunk_size
        self.target = target
        self.tie_word_embeddings: bool = cfg.tie_word_embeddings
        # The output layer has parameters of its own (``lm_head``): untied, or tied in the
        # checkpoint but stored apart in 4 bits by the scheme (``int4_head``).
        self.has_lm_head: bool = not cfg.tie_word_embeddings or scheme.int4_head

    # -- hooks (defaults for the shape above) ----------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:  # [s] int32 -> [s, hidden]
        return self.model.embed_tokens(input_ids)

    def forward_hidden(self, input_embeds: Tensor, kv: PagedKVCache) -> Tensor:
        return self.model(input_embeds, kv)

    def get_logits(self, hidden: Tensor) -> Tensor:
        if not self.has_lm_head:
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
            rotary_dim=c.rotary_dim,
        )

    # -- runtime functions -----------------------------------------------------------------
    def _float32_logits(self, hidden: Tensor) -> Tensor:
        logits = self.get_logits(hidden)
        return logits if logits.dtype == "float32" else logits.astype("float32")

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        """One sequence's chunk ``[1, s, h]`` → logits of its last token ``[1, 1, vocab]``."""

        def last_token(x: te.Tensor):
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_token")

        hidden = self.forward_hidden(input_embed, paged_kv_cache)
        hidden = op.tensor_expr_op(last_token, name_hint="last_token", args=[hidden])
        return self._float32_logits(hidden), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.forward_hidden(input_embed, paged_kv_cache)
        return self._float32_logits(hidden), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache):
        hidden = self.forward_hidden(input_embeds, paged_kv_cache)
        hidden = op.take(hidden, logit_positions, axis=1)
        return self._float32_logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.forward_hidden(input_embeds, paged_kv_cache)
        return self._float32_logits(hidden), paged_kv_cache

    def create_tir_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        shape = self.kv_cache_shape()
        rope_mode = RopeMode.NORMAL  # RoPE applied before the append (fused_rope)
        cache = TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, shape.num_hidden_layers]),
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads,
            qk_head_dim=shape.head_dim,
            v_head_dim=shape.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=rope_mode,
            rope_scale=1,
            rope_theta=shape.rope_theta,
            rope_scaling=shape.rope_scaling,
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=shape.rotary_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )
        # TVM's GPU merge-state kernel races on S (see kv_cache_kernels.py): use ours.
        replace_merge_state(
            rx.BlockBuilder.current(),
            shape.num_attention_heads,
            shape.head_dim,
            self.dtype,
            self.target,
        )
        # TVM's append kernel reads past position_map (see kv_cache_kernels.py): ours.
        replace_transpose_append(
            rx.BlockBuilder.current(),
            shape.num_key_value_heads,
            shape.head_dim,
            self.dtype,
            self.target,
        )
        # TVM's decode attention re-reads K/V and the page table (3.2x its minimum
        # bytes; see decode_attention.py): ours reads each byte once.
        replace_decode_attention(
            rx.BlockBuilder.current(),
            shape.num_key_value_heads,
            shape.num_attention_heads,
            shape.head_dim,
            self.dtype,
            rope_mode,
            self.target,
        )
        # TVM's split-rotary kernel loads 3.2x the bytes it needs (see rope_kernel.py).
        replace_split_rotary(
            rx.BlockBuilder.current(),
            shape.rope_theta,
            shape.head_dim,
            shape.num_attention_heads,
            shape.num_key_value_heads,
            self.dtype,
            shape.rope_scaling,
            shape.rotary_dim,
            self.target,
        )
        return cache

    def alloc_embedding_tensor(self) -> Tensor:
        return op.zeros((self.prefill_chunk_size, self.hidden_size), self.dtype)

    def softmax_with_temperature(self, logits: Tensor, temperature: Tensor) -> Tensor:
        """Token probabilities ``[b, 1, V]``; greedy rows (temperature <= 1e-5) one-hot.

        MLC's engine passes each request's temperature unchanged, 0 for greedy, and samples
        from what this returns (docs/runtime-contract.md)."""
        return op.tensor_expr_op(
            softmax_with_temperature_te,
            name_hint="softmax_with_temperature_tir",
            args=[logits, temperature, self.vocab_size],
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, dtype = self.hidden_size, self.dtype
        kv = nn.spec.Object(object_type=PagedKVCache)
        packed = {"param_mode": "packed", "effect_mode": "none"}
        none = {"param_mode": "none", "effect_mode": "none"}
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {
                "input_embed": nn.spec.Tensor([1, "seq_len", h], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "decode": {
                "input_embed": nn.spec.Tensor([1, 1, h], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], dtype),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, h], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "create_tir_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": none,
            },
            "alloc_embedding_tensor": {"$": none},
            "softmax_with_temperature": {
                "logits": nn.spec.Tensor(["batch_size", 1, "vocab_size"], "float32"),
                "temperature": nn.spec.Tensor(["batch_size"], "float32"),
                "$": none,
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)
