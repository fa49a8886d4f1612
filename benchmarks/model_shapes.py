"""The config.json of the real models whose shapes the benchmarks measure and the tests
compile, verify or plan (random weights or none: the shapes are the point).

Benchmarks run as scripts (``python benchmarks/x.py``), so they import this module by its
bare name; the tests too (``tests/conftest.py`` puts this folder on the path).
cpu_decode.py and cuda_decode.py build transformers' ``LlamaConfig`` directly and keep
their own keyword form of the same shape.
"""

from __future__ import annotations

from typing import Any

# Llama-3.2-1B (tied embeddings, llama3 rope scaling), as its config.json says.
LLAMA_3_2_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 16,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
}

# One layer of it: what the kernel benchmarks compile (every layer runs the same kernels).
LLAMA_3_2_1B_ONE_LAYER: dict[str, Any] = {**LLAMA_3_2_1B, "num_hidden_layers": 1}

# Qwen2.5-1.5B: attention biases, 12 heads / 2 kv heads of 128, vocab 151936, tied.
QWEN2_5_1_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "num_hidden_layers": 28,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 21,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
}

# Llama-3.1-8B pruned to hidden 3072 / intermediate 9216 / 24 heads: 4,311,419,904 params.
LLAMA_3_1_8B_PRUNED: dict[str, Any] = {
    **LLAMA_3_2_1B,
    "hidden_size": 3072,
    "intermediate_size": 9216,
    "num_attention_heads": 24,
    "num_hidden_layers": 32,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "factor": 8.0},
}
