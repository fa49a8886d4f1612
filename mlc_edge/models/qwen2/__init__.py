"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama's math with biases on q/k/v."""
