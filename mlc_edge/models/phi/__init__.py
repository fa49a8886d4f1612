"""Phi-1 / Phi-1.5 / Phi-2 (``PhiForCausalLM``): parallel attention and MLP, partial RoPE."""
