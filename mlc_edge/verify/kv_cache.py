"""The paged KV cache's kernels: synthetic page tables, and the CPU kernels as reference.

TVM's ``TIRPagedKVCache`` brings its attention and page kernels already scheduled for the
GPU, so there is no unscheduled form to compare with. For an LLVM target it builds CPU
kernels of the same signatures instead (a separate implementation of the same
arithmetic): those are the reference here, taken from the model exported for LLVM. They
are TVM's but for decode attention, where a CPU build holds ours
(``decode_attention_cpu``, checked against float64 attention in its tests), and the
split-rotary kernel ``fused_rope``, where a CPU build holds ours too and the reference is
TVM's kernel made here (``tvm_rope_reference``).

Inputs are one sequence (batch 1) laid out in a paged cache the way the runtime does it:
pages of 16 tokens in shuffled order with an unused page between, ``page_indptr`` /
``page_values`` naming them, ``length_info`` the tokens of the last page (for the
sliding-window variants: the window offset and attention sink at 0, which the runtime
passes while no window has slid). RoPE is applied before the cache (``rotary_mode`` 0,
what mlc-edge's models do: ``fused_rope``); the tree-attention kernels (speculative
decoding's ``batch_verify``, not called by the phone runtime) need tree masks and are
listed as not checked.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm.kv_cache import llama_rope_with_position_map

from ..models import KVCacheShape
from ..models.rope_kernel import FUSED_ROPE
from .inputs import (
    ArrayPool,
    NotChecked,
    Param,
    Prepared,
    Recipe,
    Sizes,
    random_floats,
    shape_of,
)

# GPU function -> the CPU function TVM's KV cache makes for an LLVM target.
CPU_NAMES = {
    "batch_decode_paged_kv": "batch_decode_paged_kv_cpu",
    "batch_decode_paged_kv_sliding_window": "batch_decode_paged_kv_cpu_sliding_window",
    "batch_prefill_paged_kv": "batch_prefill_paged_kv_cpu",
    "batch_prefill_paged_kv_sliding_window": "batch_prefill_paged_kv_cpu_sliding_window",
    "batch_prefill_ragged_kv": "batch_prefill_ragged_kv",
    "tir_attention_merge_state": "merge_state_inplace_cpu",
    "copy_single_page": "copy_single_page_cpu",
    "compact_kv_copy": "compact_kv_copy_cpu",
    # ours on the GPU (mlc_edge/models/kv_cache_kernels.py), TVM's on the CPU
    "tir_kv_cache_transpose_append": "tir_kv_cache_transpose_append",
}

NOT_CHECKED = {
    "batch_tree_attn": "tree attention for speculative decoding (batch_verify), not called "
    "by the phone runtime; needs tree masks: not checked yet",
    "tree_attn_paged_kv": "tree attention for speculative decoding (batch_verify), not "
    "called by the phone runtime; needs tree masks: not checked yet",
}

# Kernels that fail here for a reason outside mlc-edge: run and shown, not counted as
# failures (``verify --strict`` counts them). None now: TVM's racy merge_state kernel is
# replaced by ours (mlc_edge/models/kv_cache_kernels.py).
KNOWN_ISSUES: dict[str, str] = {}

PREFIX_TOKENS = 24  # tokens already in the cache before a prefill chunk (1.5 pages)
DECODE_KV_LENS = (16, 40)  # one full page; two pages and a half-filled third


def _attention_scalars(head_dim: int, rope_theta: float) -> dict[str, Any]:
    return {
        "rotary_mode": 0,
        "rope_scale": 1.0,
        "rope_theta": rope_theta,
        "sm_scale": head_dim**-0.5,
        "causal": 1,
    }


def _head_dim(params: list[Param], name: str) -> int:
    p = next(p for p in params if p.name == name)
    return int(p.shape[-1])


def _page_table(
    kv_len: int, page_size: int, rng: np.random.Generator
) -> tuple[int, np.ndarray, int]:
    """(pages in the cache buffer, page ids of the sequence in order, last page's tokens)."""
    used = max(1, math.ceil(kv_len / page_size))
    total = used + 2  # unused pages too: reading one of them is an error that shows
    ids = rng.permutation(total)[:used].astype("int32")
    return total, ids, kv_len - (used - 1) * page_size


class _Attention(Recipe):
    """Shared by the paged decode/prefill kernels: fills in the buffers by name."""

    sliding_window = False

    def _length_info(self, last_page_len: int) -> np.ndarray:
        if self.sliding_window:  # (last page's tokens, window offset, sink size)
            return np.array([[last_page_len], [0], [0]], "int32")
        return np.array([last_page_len], "int32")

    def _fill(
        self,
        params: list[Param],
        env: dict[str, Any],
        given: dict[str, np.ndarray],
        scalars: dict[str, Any],
        rng: np.random.Generator,
        host_dtype: Any,
    ) -> dict[str, np.ndarray]:
        arrays = {}
        for p in params:
            if not p.is_buffer:
                continue
            if p.name in given:
                arrays[p.name] = given[p.name]
            elif "float" in p.dtype:
                arrays[p.name] = random_floats(shape_of(p, env), host_dtype(p.dtype), rng)
            else:
                raise NotChecked(f"integer input '{p.name}' has no known valid values")
        return arrays


class DecodeRecipe(_Attention):
    def __init__(self, sliding_window: bool, rope_theta: float):
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta

    def cases(self, params: list[Param], sizes: Sizes) -> list[dict[str, int]]:
        return [{"kv_len": n} for n in DECODE_KV_LENS]

    def prepare(
        self,
        params: list[Param],
        case: dict[str, int],
        sizes: Sizes,
        rng: np.random.Generator,
        host_dtype: Any,
        pool: ArrayPool | None = None,
    ) -> Prepared:
        kv_len = case["kv_len"]
        total, ids, last = _page_table(kv_len, sizes.page_size, rng)
        env = {"B": 1, "max_num_pages": total, "nnz_pages": len(ids)}
        given = {
            "page_table_indptr": np.array([0, len(ids)], "int32"),
            "page_table_values": ids,
            "length_info": self._length_info(last),
            "k_rope_pos_offset": np.zeros(1, "int32"),
            "q_rope_position": np.array([kv_len - 1], "int32"),
        }
        scalars = _attention_scalars(_head_dim(params, "Q"), self.rope_theta)
        scalars = {p.name: scalars[p.name] for p in params if not p.is_buffer}
        env.update(scalars)
        return Prepared(
            dict(case), self._fill(params, env, given, scalars, rng, host_dtype), scalars, env
        )


class PrefillRecipe(_Attention):
    """A chunk of ``seq_len`` tokens after ``PREFIX_TOKENS`` already cached (paged), or
    attending to itself only (``ragged``: the chunk's own K/V, not yet in pages)."""

    def __init__(self, sliding_window: bool, ragged: bool, rope_theta: float):
        self.sliding_window = sliding_window
        self.ragged = ragged
        self.rope_theta = rope_theta

    def cases(self, params: list[Param], sizes: Sizes) -> list[dict[str, int]]:
        if self.ragged:
            return [{"seq_len": s} for s in sizes.seq_lens]
        return [{"seq_len": s, "kv_len": PREFIX_TOKENS + s} for s in sizes.seq_lens]

    def prepare(
        self,
        params: list[Param],
        case: dict[str, int],
        sizes: Sizes,
        rng: np.random.Generator,
        host_dtype: Any,
        pool: ArrayPool | None = None,
    ) -> Prepared:
        s = case["seq_len"]
        q_name = "q"
        if self.ragged:
            env = {"batch_size": 1, "qo_len": s, "kv_len": s}
            given = {
                "q_indptr": np.array([0, s], "int32"),
                "kv_indptr": np.array([0, s], "int32"),
                "q_rope_position": np.arange(s, dtype="int32"),
                "k_rope_pos_offset": np.zeros(1, "int32"),
            }
        else:
            kv_len = case["kv_len"]
            total, ids, last = _page_table(kv_len, sizes.page_size, rng)
            env = {"batch_size": 1, "total_len": s, "max_num_pages": total, "nnz_pages": len(ids)}
            given = {
                "q_indptr": np.array([0, s], "int32"),
                "page_indptr": np.array([0, len(ids)], "int32"),
                "page_values": ids,
                "length_info": self._length_info(last),
                "k_rope_pos_offset": np.zeros(1, "int32"),
                "q_rope_position": np.arange(kv_len - s, kv_len, dtype="int32"),
            }
        scalars = _attention_scalars(_head_dim(params, q_name), self.rope_theta)
        scalars = {p.name: scalars[p.name] for p in params if not p.is_buffer}
        env.update(scalars)
        return Prepared(
            dict(case), self._fill(params, env, given, scalars, rng, host_dtype), scalars, env
        )


class MergeStateRecipe(Recipe):
    """Two partial attention results (values and log-sum-exp) merged in place."""

    def __init__(self, num_heads: int, head_dim: int):
        self.num_heads, self.head_dim = num_heads, head_dim

    def cases(self, params: list[Param], sizes: Sizes) -> list[dict[str, int]]:
        return [{"N": s} for s in sizes.seq_lens]

    def prepare(
        self,
        params: list[Param],
        case: dict[str, int],
        sizes: Sizes,
        rng: np.random.Generator,
        host_dtype: Any,
        pool: ArrayPool | None = None,
    ) -> Prepared:
        env = {**case, "H": self.num_heads, "D": self.head_dim}
        arrays = {p.name: random_floats(shape_of(p, env), host_dtype(p.dtype), rng) for p in params}
        return Prepared(dict(case), arrays, {}, env)


class CopyPageRecipe(Recipe):
    """``copy_single_page``: the first tokens of page 2 copied onto page 0 (a fork)."""

    def cases(self, params: list[Param], sizes: Sizes) -> list[dict[str, int]]:
        return [{"copy_length": 10}]

    def prepare(
        self,
        params: list[Param],
        case: dict[str, int],
        sizes: Sizes,
        rng: np.random.Generator,
        host_dtype: Any,
        pool: ArrayPool | None = None,
    ) -> Prepared:
        scalars = {"src_page_id": 2, "tgt_page_id": 0, "copy_length": case["copy_length"]}
        env = {"num_pages": 4, "page_size": sizes.page_size, **scalars}
        pages = next(p for p in params if p.name == "pages")
        arrays = {"pages": random_floats(shape_of(pages, env), host_dtype(pages.dtype), rng)}
        return Prepared(dict(case), arrays, scalars, env)


class CompactCopyRecipe(Recipe):
    """``compact_kv_copy``: tokens moved to other slots (distinct sources and targets)."""

    def cases(self, params: list[Param], sizes: Sizes) -> list[dict[str, int]]:
        return [{"total_copy_length": 5}]

    def prepare(
        self,
        params: list[Param],
        case: dict[str, int],
        sizes: Sizes,
        rng: np.random.Generator,
        host_dtype: Any,
        pool: ArrayPool | None = None,
    ) -> Prepared:
        n = case["total_copy_length"]
        num_pages = 4
        slots = rng.permutation(num_pages * sizes.page_size)[: 2 * n].astype("int32")
        scalars = {"batch_size": 1}
        env = {"num_pages": num_pages, "total_copy_length": n, **scalars}
        pages = next(p for p in params if p.name == "pages")
        arrays = {
            "pages": random_floats(shape_of(pages, env), host_dtype(pages.dtype), rng),
            "copy_length_indptr": np.array([0, n], "int32"),
            "copy_src_dst_pos": np.stack([slots[:n], slots[n:]]),
        }
        return Prepared(dict(case), arrays, scalars, env)


def kv_recipes(num_heads: int, head_dim: int, rope_theta: float) -> dict[str, Recipe]:
    """The recipes of the KV cache's pre-scheduled kernels, by GPU function name."""
    return {
        "batch_decode_paged_kv": DecodeRecipe(False, rope_theta),
        "batch_decode_paged_kv_sliding_window": DecodeRecipe(True, rope_theta),
        "batch_prefill_paged_kv": PrefillRecipe(False, False, rope_theta),
        "batch_prefill_paged_kv_sliding_window": PrefillRecipe(True, False, rope_theta),
        "batch_prefill_ragged_kv": PrefillRecipe(False, True, rope_theta),
        "tir_attention_merge_state": MergeStateRecipe(num_heads, head_dim),
        "copy_single_page": CopyPageRecipe(),
        "compact_kv_copy": CompactCopyRecipe(),
    }


def cpu_references(cpu_module: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The CPU kernels of ``cpu_module`` (the model exported for LLVM), by GPU name."""
    funcs = {
        gv.name_hint: f for gv, f in cpu_module.functions_items() if isinstance(f, tirx.PrimFunc)
    }
    return {gpu: funcs[cpu] for gpu, cpu in CPU_NAMES.items() if cpu in funcs}


def tvm_rope_reference(kv: KVCacheShape, dtype: str) -> dict[str, tirx.PrimFunc]:
    """TVM's own split-rotary kernel for this model, the reference of ``fused_rope``
    (both our GPU and our CPU build hold ours: ``mlc_edge/models/rope_kernel.py``)."""
    return {
        FUSED_ROPE: llama_rope_with_position_map(
            kv.rope_theta,
            1,
            kv.head_dim,
            kv.num_attention_heads,
            kv.num_key_value_heads,
            dtype,
            kv.rope_scaling,
            kv.rotary_dim,
        )
    }
