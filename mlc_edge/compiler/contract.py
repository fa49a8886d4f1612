"""What MLC-LLM's engine looks up in a model library, by device type, and the values it
relies on. Written down once here; ``docs/runtime-contract.md`` says the same in words.

No TVM import: the runtime (which may run on a runtime-only TVM) reads this too.
"""

from __future__ import annotations

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

# Looked up too, but used only for speculative decoding, which mlc-edge bundles do not
# support: not exported.
SPECULATIVE_DECODING_FUNCTIONS = frozenset({"sampler_verify_draft_tokens"})

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
