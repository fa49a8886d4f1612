"""The KV capacity MLC's engine computes when it loads a model, term by term.

This is ``EstimateMemoryUsageOnMode`` of mlc-llm's ``cpp/serve/config.cc`` (79d603f0) for one
model, written out so each term can be checked (tests/test_memory.py does it by hand).
With S = max_num_sequence, P = prefill_chunk_size (``model_config``), V = vocab_size
(``model_config``), L / KV / H / D = the KV cache's layers, kv heads, attention heads and
head_dim (``_metadata.kv_cache``), all in bytes:

    temp buffer          2 x max(_metadata.memory_usage)        ("for safety")
    KV bytes per token   D x KV x (L / pipeline stages) x 4 + 1.25
    aux KV workspace     (S + 1) x 88 + P x (H + 1) x 8 + P x D x (H + KV) x 4 + 48 MiB
    model workspace      P x 4 + S x 4 + (2P + S) x (D x H) x 2
    logit workspace      S x 20 + S x V x 16.125
    capacity (tokens)    int((memory x 0.85 - params - temp - aux - model - logit)
                             / KV bytes per token)              <= 0: the engine refuses

``memory`` is the device's total (on OpenCL at least the runtime's floor, see plan.py);
the division is done in doubles and truncated toward zero, as the engine's
``static_cast<int>``. The app's engine runs in mode "interactive": S = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MiB = 1 << 20

GPU_MEMORY_UTILIZATION = 0.85  # the app engine's share of memory
INTERACTIVE_MAX_NUM_SEQUENCE = 1  # mode "interactive" (the app's)
KV_AUX_FIXED_BYTES = 48 * MiB


@dataclass(frozen=True)
class EngineEstimate:
    memory_bytes: int
    params_bytes: int
    temp_buffer_bytes: int
    kv_bytes_per_token: float
    kv_aux_workspace_bytes: float
    model_workspace_bytes: float
    logit_processor_workspace_bytes: float
    kv_capacity_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_engine_memory(
    *,
    memory_bytes: int,
    params_bytes: int,
    memory_usage: dict[str, int],
    kv_cache: dict[str, int],
    vocab_size: int,
    prefill_chunk_size: int,
    max_num_sequence: int = INTERACTIVE_MAX_NUM_SEQUENCE,
    pipeline_parallel_stages: int = 1,
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
) -> EngineEstimate:
    """The engine's terms and KV capacity for one model (``kv_cache``: ``_metadata``'s)."""
    s, p, v = max_num_sequence, prefill_chunk_size, vocab_size
    layers = kv_cache["num_hidden_layers"]
    kv_heads = kv_cache["num_key_value_heads"]
    heads = kv_cache["num_attention_heads"]
    head_dim = kv_cache["head_dim"]
    hidden = head_dim * heads  # the engine's "hidden size", whatever the model's is
    temp = 2 * max(memory_usage.values(), default=0)
    per_token = head_dim * kv_heads * (layers // pipeline_parallel_stages) * 4 + 1.25
    kv_aux = (
        (s + 1) * 88
        + p * (heads + 1) * 8
        + p * head_dim * (heads + kv_heads) * 4
        + KV_AUX_FIXED_BYTES
    )
    model_ws = p * 4 + s * 4 + (p * 2 + s) * hidden * 2
    logit_ws = s * 20 + s * v * 16.125
    free = (
        memory_bytes * gpu_memory_utilization - params_bytes - temp - kv_aux - model_ws - logit_ws
    )
    return EngineEstimate(
        memory_bytes=int(memory_bytes),
        params_bytes=int(params_bytes),
        temp_buffer_bytes=temp,
        kv_bytes_per_token=per_token,
        kv_aux_workspace_bytes=kv_aux,
        model_workspace_bytes=model_ws,
        logit_processor_workspace_bytes=logit_ws,
        kv_capacity_tokens=int(free / per_token),
    )
