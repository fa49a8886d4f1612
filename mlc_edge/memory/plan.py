"""What a bundle needs in GPU memory, and whether MLC's engine agrees to load it.

The breakdown (``MemoryPlan``), all in bytes:

    weights       every parameter the runtime loads (tensor-cache.json ``nbytes``, or the
                  same sum from ``_metadata.params``): embedding, output layer, the
                  decoder layers, everything else (final norm, ...); a table split to
                  fit the largest allocation counts all its pieces, its largest
                  buffer is one piece
    KV cache      layers x kv_heads x head_dim x tokens x 2 (k, v) x dtype bytes, tokens =
                  the context window in whole pages of 16, plus one page (TVM's paged cache),
                  or the engine's KV capacity (at the highest floor) when that is less
    temporaries   ``_metadata.memory_usage`` (the compiler's static memory plan, per
                  function); one function runs at a time, so the peak counts the largest
    logits        [max_batch, 1, vocab] float32: the logits of one step
    overhead      the runtime's fixed ~48 MiB (docs/runtime-contract.md, "GPU memory")

``predict_load`` is the engine's own check, ``EstimateMemoryUsageOnMode`` of mlc-llm
``cpp/serve/config.cc``, term by term in ``engine_estimate.py``::

    memory      = max(reported CL_DEVICE_GLOBAL_MEM_SIZE, floor)   floor 5 GiB upstream
    KV capacity = (memory x 0.85 - params - 2 x max(memory_usage) - aux KV workspace
                   - model workspace - logit-processor workspace)
                  / (head_dim x kv_heads x layers x 4 + 1.25)       tokens; <= 0 aborts
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..compiler.contract import PAGE_SIZE
from ..models.vocab import split_parameter
from .engine_estimate import EngineEstimate, estimate_engine_memory

MiB = 1 << 20
GiB = 1 << 30

RUNTIME_OVERHEAD_BYTES = 48 * MiB
UPSTREAM_FLOOR_BYTES = 5 * GiB  # TotalDetectGlobalMemory on OpenCL, upstream
OUR_FLOOR_BYTES = 16 * GiB  # the floor of our runtime build


@dataclass(frozen=True)
class WeightBreakdown:
    embedding: int
    # 0 when tied to the embedding; a tied model's 4-bit copy (``int4_head``) counts here
    output_layer: int
    layers: int  # all decoder layers together
    other: int
    num_layers: int
    largest_name: str
    largest_bytes: int
    # Buffers the embedding / output layer are stored in: > 1 when split to fit the
    # device's largest allocation (mlc_edge.models.vocab); 0 for a tied output layer.
    embedding_pieces: int = 1
    output_pieces: int = 1

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.layers + self.other


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def weight_breakdown(records: list[tuple[str, int]]) -> WeightBreakdown:
    """(name, nbytes) of every weight → embedding / output layer / layers / other."""
    embedding = output = layers = other = 0
    embedding_tables: set[str] = set()  # the whole tables' names, pieces by their table
    output_tables: set[str] = set()
    embedding_pieces = output_pieces = 0
    layer_ids: set[int] = set()
    largest = ("", 0)
    for name, nbytes in records:
        table = (split_parameter(name) or (name, 0))[0]
        if nbytes > largest[1]:
            largest = (name, nbytes)
        match = _LAYER.search(name)
        if match:
            layers += nbytes
            layer_ids.add(int(match.group(1)))
        elif "embed_tokens" in name or name.endswith("embed.weight"):
            embedding += nbytes
            embedding_tables.add(table)
            embedding_pieces += 1
        elif "lm_head" in name:
            output += nbytes
            # One buffer of the layer per piece: its weight's (fp16 ``weight`` or 4-bit
            # ``qweight``, each with its scales and zeros); the bias is not a piece.
            if table.endswith((".weight", ".qweight")):
                output_tables.add(table)
                output_pieces += 1
        else:
            other += nbytes
    return WeightBreakdown(
        embedding,
        output,
        layers,
        other,
        len(layer_ids),
        *largest,
        embedding_pieces=embedding_pieces if embedding_tables else 0,
        output_pieces=output_pieces if output_tables else 0,
    )


def records_from_metadata(metadata: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (p["name"], int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize)
        for p in metadata["params"]
    ]


def kv_tokens(context_window_size: int, page_size: int = PAGE_SIZE) -> int:
    """Tokens the paged cache allocates for one context window: whole pages, plus one
    spare page (what TVM 0.27's PagedAttentionKVCache allocates, whatever the batch size:
    ``vm.builtin.attention_kv_cache_get_num_available_pages`` of a fresh cache, checked in
    tests/test_memory.py)."""
    return (math.ceil(context_window_size / page_size) + 1) * page_size


def kv_bytes_per_token(metadata: dict[str, Any], kv_dtype: str) -> int:
    kv = metadata["kv_cache"]
    return (
        kv["num_hidden_layers"]
        * kv["num_key_value_heads"]
        * kv["head_dim"]
        * 2
        * np.dtype(kv_dtype).itemsize
    )


@dataclass(frozen=True)
class LoadPrediction:
    floor_bytes: int
    memory_bytes: int  # max(reported, floor)
    kv_capacity_tokens: int
    loads: bool  # capacity > 0: the engine does not abort
    context_fits: bool  # capacity >= the context window
    engine: EngineEstimate  # the terms of the engine's formula


@dataclass
class MemoryPlan:
    label: str
    target: str
    quantization: str
    kv_dtype: str
    context_window_size: int
    prefill_chunk_size: int
    max_batch_size: int
    vocab_size: int
    weights: WeightBreakdown
    kv_tokens: int
    kv_cache_bytes: int
    kv_layer_buffer_bytes: int  # the pages of one layer: the runtime's largest KV buffer
    memory_usage: dict[str, int]
    logits_bytes: int
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES
    max_alloc_bytes: int | None = None
    loads: list[LoadPrediction] = field(default_factory=list)
    reported_memory_bytes: int = 0
    budget_bytes: int | None = None

    @property
    def temp_prefill_bytes(self) -> int:
        return int(self.memory_usage.get("prefill", 0))

    @property
    def temp_decode_bytes(self) -> int:
        return int(self.memory_usage.get("decode", 0))

    @property
    def temp_max_bytes(self) -> int:
        return int(max(self.memory_usage.values(), default=0))

    @property
    def total_bytes(self) -> int:
        """Peak: weights + KV + the largest function's temporaries + logits + overhead."""
        return (
            self.weights.total
            + self.kv_cache_bytes
            + self.temp_max_bytes
            + self.logits_bytes
            + self.overhead_bytes
        )

    @property
    def largest_buffer(self) -> tuple[str, int]:
        """The largest single allocation: a weight, one layer's KV pages, or (an upper
        bound: the whole plan of one function) the planned temporaries."""
        candidates = [
            (f"weight {self.weights.largest_name}", self.weights.largest_bytes),
            ("KV pages of one layer", self.kv_layer_buffer_bytes),
            ("planned temporaries (<= max memory_usage)", self.temp_max_bytes),
            ("logits", self.logits_bytes),
        ]
        return max(candidates, key=lambda c: c[1])

    @property
    def fits_max_alloc(self) -> bool | None:
        if self.max_alloc_bytes is None:
            return None
        return self.largest_buffer[1] <= self.max_alloc_bytes

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        name, size = self.largest_buffer
        return {
            "label": self.label,
            "target": self.target,
            "quantization": self.quantization,
            "context_window_size": self.context_window_size,
            "prefill_chunk_size": self.prefill_chunk_size,
            "max_batch_size": self.max_batch_size,
            "weights": {
                **{
                    k: v
                    for k, v in asdict(self.weights).items()
                    if k not in ("largest_name", "largest_bytes")
                },
                "total": self.weights.total,
            },
            "kv_cache": {
                "tokens": self.kv_tokens,
                "dtype": self.kv_dtype,
                "bytes": self.kv_cache_bytes,
                "layer_buffer_bytes": self.kv_layer_buffer_bytes,
            },
            "temporaries": {
                "prefill": self.temp_prefill_bytes,
                "decode": self.temp_decode_bytes,
                "max": self.temp_max_bytes,
                "memory_usage": dict(self.memory_usage),
            },
            "logits_bytes": self.logits_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "largest_buffer": {
                "name": name,
                "bytes": size,
                "max_alloc_bytes": self.max_alloc_bytes,
                "fits": self.fits_max_alloc,
            },
            "reported_memory_bytes": self.reported_memory_bytes,
            "load": [asdict(p) for p in self.loads],
            "budget_bytes": self.budget_bytes,
            "within_budget": self.within_budget,
        }


def predict_load(
    params_bytes: int,
    memory_usage: dict[str, int],
    metadata_kv: dict[str, int],
    reported_bytes: int,
    floor_bytes: int,
    context_window_size: int,
    *,
    vocab_size: int,
    prefill_chunk_size: int,
) -> LoadPrediction:
    """MLC's KV capacity check with the app's engine (mode "interactive") on a device
    reporting ``reported_bytes``, raised to ``floor_bytes``."""
    memory = max(int(reported_bytes), int(floor_bytes))
    estimate = estimate_engine_memory(
        memory_bytes=memory,
        params_bytes=params_bytes,
        memory_usage=memory_usage,
        kv_cache=metadata_kv,
        vocab_size=vocab_size,
        prefill_chunk_size=prefill_chunk_size,
    )
    capacity = estimate.kv_capacity_tokens
    return LoadPrediction(
        int(floor_bytes), memory, capacity, capacity > 0, capacity >= context_window_size, estimate
    )


def make_plan(
    metadata: dict[str, Any],
    *,
    label: str,
    target: str,
    kv_dtype: str,
    weight_records: list[tuple[str, int]] | None = None,
    max_alloc_bytes: int | None = None,
    reported_memory_bytes: int = 0,
    budget_bytes: int | None = None,
    floors: tuple[int, ...] = (UPSTREAM_FLOOR_BYTES, OUR_FLOOR_BYTES),
) -> MemoryPlan:
    """The plan of a library's ``_metadata`` (and, when known, the bundle's weights)."""
    weights = weight_breakdown(weight_records or records_from_metadata(metadata))
    context = int(metadata["context_window_size"])
    batch = int(metadata["max_batch_size"])
    vocab = int(metadata["active_vocab_size"])
    tokens = kv_tokens(context)
    per_token = kv_bytes_per_token(metadata, kv_dtype)
    memory_usage = {k: int(v) for k, v in metadata.get("memory_usage", {}).items()}
    logits = batch * 1 * vocab * 4
    plan = MemoryPlan(
        label=label,
        target=target,
        quantization=str(metadata["quantization"]),
        kv_dtype=str(np.dtype(kv_dtype)),
        context_window_size=context,
        prefill_chunk_size=int(metadata["prefill_chunk_size"]),
        max_batch_size=batch,
        vocab_size=vocab,
        weights=weights,
        kv_tokens=tokens,
        kv_cache_bytes=tokens * per_token,
        kv_layer_buffer_bytes=tokens * per_token // metadata["kv_cache"]["num_hidden_layers"],
        memory_usage=memory_usage,
        logits_bytes=logits,
        max_alloc_bytes=max_alloc_bytes,
        reported_memory_bytes=int(reported_memory_bytes),
        budget_bytes=budget_bytes,
    )
    plan.loads = [
        predict_load(
            weights.total,
            memory_usage,
            metadata["kv_cache"],
            reported_memory_bytes,
            floor,
            context,
            vocab_size=vocab,
            prefill_chunk_size=int(metadata["prefill_chunk_size"]),
        )
        for floor in floors
    ]
    # The engine (mode "interactive") sizes its KV cache to min(context, capacity): a
    # context beyond what the highest floor's capacity allows gets the capacity, in pages.
    capacity = plan.loads[-1].kv_capacity_tokens if plan.loads else 0
    if 0 < capacity < tokens:
        plan.kv_tokens = capacity // PAGE_SIZE * PAGE_SIZE
        plan.kv_cache_bytes = plan.kv_tokens * per_token
        plan.kv_layer_buffer_bytes = (
            plan.kv_cache_bytes // metadata["kv_cache"]["num_hidden_layers"]
        )
    return plan


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}


def parse_size(text: str) -> int:
    """``12GB`` (10^9), ``5GiB`` (2^30), ``5368709120`` → bytes; ValueError otherwise."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"'{text}' is not a size (e.g. 12GB, 5.4GB, 5GiB, 5368709120)")
    return int(float(match.group(1)) * _UNITS[unit])
