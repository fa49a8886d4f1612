"""The config.json of the model shapes the benchmarks measure (random weights, real sizes).

Benchmarks run as scripts (``python benchmarks/x.py``), so they import this module by its
bare name. cpu_decode.py and cuda_decode.py build transformers' ``LlamaConfig`` directly
and keep their own keyword form of the same shape.
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
