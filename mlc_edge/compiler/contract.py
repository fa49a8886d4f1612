"""What MLC-LLM's engine looks up in a model library, by device type, and the values it
relies on. Written down once here; ``docs/runtime-contract.md`` says the same in words.

No TVM import: the runtime (which may run on a runtime-only TVM) reads this too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ModelSpec

# Tokens of a page of the paged KV cache: what ``create_tir_paged_kv_cache`` is given
# (MLC's engine and our runner pass 16, TVM's default), the KV kernels are built for and
# the memory plan rounds the cache up to.
PAGE_SIZE = 16

# ``softmax_with_temperature`` treats a row with temperature <= this as greedy (a one-hot
# distribution at the maximum); the engine's CPU sampler takes the argmax below it.
GREEDY_TEMPERATURE = 1e-5

# Every library: the model's forward passes, the KV cache, sampling's first step and the
# in-place logit processors (``_metadata`` is read before anything else).
MODEL_FUNCTIONS = frozenset(
    {
        "_metadata",
        "embed",
        "prefill",
        "decode",
        "batch_prefill",
        "batch_decode",
        "create_tir_paged_kv_cache",
        "alloc_embedding_tensor",
        "softmax_with_temperature",
        "apply_logit_bias_inplace",
        "apply_penalty_inplace",
        "apply_bitmask_inplace",
    }
)

# On CUDA, Vulkan and Metal the engine samples on the GPU: the first four are checked when
# the engine starts (it stops without them), ``renormalize_by_top_p`` is called for any
# request with top_p < 1.
GPU_SAMPLER_FUNCTIONS = frozenset(
    {
        "multinomial_from_uniform",
        "argsort_probs",
        "sample_with_top_p",
        "sampler_take_probs",
        "renormalize_by_top_p",
    }
)

# The engine looks up ``sampler_verify_draft_tokens`` too, but uses it only for speculative
# decoding, which mlc-edge bundles do not support: not exported.

# The device types whose engine builds its GPU sampler (others sample on the CPU).
GPU_SAMPLER_DEVICES = frozenset({"cuda", "vulkan", "metal"})


def required_functions(device: str) -> frozenset[str]:
    """The functions a library for ``device`` (TVM's device name: ``cpu``, ``opencl``,
    ``cuda``, ...) must export for MLC's engine to load it and serve ordinary requests."""
    if device in GPU_SAMPLER_DEVICES:
        return MODEL_FUNCTIONS | GPU_SAMPLER_FUNCTIONS
    return MODEL_FUNCTIONS


def uses_gpu_sampler(device: str) -> bool:
    return device in GPU_SAMPLER_DEVICES


def chat_config_fields(spec: ModelSpec) -> dict[str, Any]:
    """The fields ``mlc-chat-config.json`` and the library's ``_metadata`` both carry, with
    the same values: the model, its scheme, the runtime sizes the library was built for,
    and the features mlc-edge bundles do not use (sliding window, attention sink, tensor
    and pipeline parallelism)."""
    sizes = spec.runtime_sizes
    return {
        "model_type": spec.family.model_type,
        "quantization": spec.scheme.name,
        "context_window_size": sizes["context_window_size"],
        "sliding_window_size": -1,
        "prefill_chunk_size": sizes["prefill_chunk_size"],
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": spec.config.vocab_size,
        "model_task": "chat",
    }


def metadata_fields(spec: ModelSpec) -> dict[str, Any]:
    """``_metadata``'s fields that need no compiled model: ``chat_config_fields`` and the
    engine's own (the parameter list, KV cache shape and memory usage come from the build)."""
    return {
        **chat_config_fields(spec),
        "max_batch_size": spec.runtime_sizes["max_batch_size"],
        "kv_state_kind": "kv_cache",
        "disaggregation": False,
    }
