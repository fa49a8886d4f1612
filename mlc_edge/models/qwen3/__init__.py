"""Qwen3 (``Qwen3ForCausalLM``): Llama's math with per-head RMSNorm on q and k."""
