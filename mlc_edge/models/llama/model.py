"""Llama 2 / 3 / 3.1 / 3.2 (and pruned variants) in ``tvm.relax.frontend.nn``.

Llama is the Llama-style decoder as it is (``models/llama_style.py``): q/k/v and
gate/up fused into one matmul each, attention and rotate-half RoPE inside TVM's paged KV
cache, as transformers' Llama computes them.
"""

from __future__ import annotations

from ..llama_style import LlamaStyleLM


class LlamaForCausalLM(LlamaStyleLM):
    pass
