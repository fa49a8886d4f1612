"""Compiled Qwen2, Qwen3, Phi-2 and pruned Llama bundles against transformers.

Each tiny model is compiled once per scheme (module-scoped fixture) and compared over a
chunked 37-token prefill and 12 greedy decode steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_matches_fp32, compile_bundle, greedy_compare, prompt_ids, top2_margins
from tiny_models import make_model, tiny_config

from mlc_edge.config import ModelSpec
from mlc_edge.errors import UserError
from mlc_edge.runtime import Engine

QWEN_VOCAB = 151936

# A pruned Llama: head_dim (32) is not hidden / heads (96 / 4), widths are not powers of
# two, every projection has a bias.
PRUNED = dict(
    hidden_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=200,
    attention_bias=True,
    mlp_bias=True,
)

# name → (transformers family, overrides of tiny_models.FAMILY_DEFAULTS)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-tied": ("Qwen2", {}),
    "qwen3-qk-norm-head-dim": ("Qwen3", {}),
    "phi2-partial-rotary": ("Phi", {}),
    "phi2-qwen-vocab": ("Phi", {"vocab_size": QWEN_VOCAB}),
    # No published Phi ties its embeddings, but transformers can: the bias stays untied.
    "phi-tied": ("Phi", {"tie_word_embeddings": True}),
    "llama-pruned-1-layer": ("Llama", {**PRUNED, "num_hidden_layers": 1}),
    "llama-pruned-5-layers": ("Llama", {**PRUNED, "num_hidden_layers": 5}),
}

# Variants whose only new code path the fp32 test already covers.
FP32_ONLY = {"phi-tied"}


@dataclass
class Tiny:
    model: Any
    path: Path
    engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, quantization: str) -> Engine:
        """The model compiled with ``quantization``, once per module."""
        if quantization not in self.engines:
            bundle = compile_bundle(
                self.path / "hf", self.path / quantization, "--quantization", quantization
            )
            self.engines[quantization] = Engine(bundle)
        return self.engines[quantization]


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory) -> Tiny:
    family, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return Tiny(make_model(family, path / "hf", **overrides), path)


def test_q0f32t_logits_and_greedy_tokens(tiny):
    ids = prompt_ids(tiny.model.config.vocab_size)
    assert_matches_fp32(tiny.engine("q0f32t"), tiny.model, ids)


@pytest.mark.parametrize("tiny", [v for v in VARIANTS if v not in FP32_ONLY], indirect=True)
def test_q0f16t_greedy_tokens(tiny):
    ids = prompt_ids(tiny.model.config.vocab_size)
    ours, theirs, _ = greedy_compare(tiny.engine("q0f16t"), tiny.model, ids)
    # fp16 rounding may flip a near-tie of the fp32 reference; every step decided by a
    # margin larger than fp16's error must agree, and most steps must be decided.
    decisive = [i for i, m in enumerate(top2_margins(tiny.model, ids, theirs)) if m > 0.05]
    assert len(decisive) >= len(theirs) - 2
    assert [ours[i] for i in decisive] == [theirs[i] for i in decisive], (ours, theirs)


@pytest.mark.parametrize(
    "tiny",
    ["qwen2-tied", "qwen3-qk-norm-head-dim", "phi2-partial-rotary", "llama-pruned-1-layer"],
    indirect=True,
)
def test_compiles_for_android_opencl_with_every_function_a_kernel(tiny):
    """``RequireKernels`` runs inside the compile: a host fallback would raise UserError."""
    from mlc_edge.compiler.build import compile_model
    from mlc_edge.compiler.targets import get_target

    chat = json.loads((tiny.engine("q0f32t").bundle / "mlc-chat-config.json").read_text())
    spec = ModelSpec.from_chat_config({**chat, "quantization": "q0f16t"})
    executable, metadata = compile_model(spec, get_target("android-opencl"), "family_test")
    source = executable.mod.imports[0].imports[0].inspect_source()
    assert "__kernel" in source and metadata["quantization"] == "q0f16t"


def test_phi_partial_rotary_factor_changes_the_result(tmp_path):
    """The Phi cases above must exercise partial RoPE: rotating all of each head differs."""
    partial = make_model("Phi", tmp_path / "partial")
    full = make_model("Phi", tmp_path / "full", partial_rotary_factor=1.0)
    ids = prompt_ids(partial.config.vocab_size)
    with torch.no_grad():
        a = partial(torch.tensor([ids])).logits[0, -1]
        b = full(torch.tensor([ids])).logits[0, -1]
    assert float((a - b).abs().max()) > 1e-2


# -- configs we refuse rather than silently compile wrong ------------------------------------
SIZES = {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 512}


def _hf(family: str, **changes: Any) -> dict[str, Any]:
    """A tiny model's config.json contents, changed."""
    return {**tiny_config(family).to_dict(), "architectures": [f"{family}ForCausalLM"], **changes}


def _qwen2(**changes: Any) -> dict[str, Any]:
    return _hf("Qwen2", **changes)


def _phi(**changes: Any) -> dict[str, Any]:
    return _hf("Phi", **changes)


REFUSED = {
    "qwen2-sliding-window": (_qwen2(use_sliding_window=True), "use_sliding_window"),
    "qwen2-sliding-layer-types": (
        _qwen2(layer_types=["full_attention", "sliding_attention", "full_attention"]),
        "layer_types",
    ),
    "qwen3-sliding-window": (_hf("Qwen3", use_sliding_window=True), "use_sliding_window"),
    "qwen2-hidden-act": (_qwen2(hidden_act="gelu"), "hidden_act"),
    "qwen2-yarn-rope": (
        _qwen2(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
        "rope",
    ),
    "phi-qk-layernorm": (_phi(qk_layernorm=True), "qk_layernorm"),
    "phi-hidden-act": (_phi(hidden_act="relu"), "hidden_act"),
    "phi-rope-scaling": (
        _phi(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
        "rope",
    ),
    "phi-odd-rotary-dim": (
        _phi(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.35,
            }
        ),
        "partial_rotary_factor",
    ),
    "unknown-architecture": (
        {**_qwen2(), "architectures": ["GemmaForCausalLM"]},
        "GemmaForCausalLM",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_config_is_refused(case):
    hf, field = REFUSED[case]
    with pytest.raises(UserError, match=field):
        ModelSpec.create(hf, "q0f32t", SIZES)


# -- published sizes: our definitions declare exactly the checkpoints' parameters ------------
def _published(arch: str, **fields: Any) -> dict[str, Any]:
    return {"architectures": [arch], "rms_norm_eps": 1e-6, "rope_theta": 1e6, **fields}


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# config.json shapes as published on the hub; the counts are those checkpoints' tensor
# totals (the model cards round them: 0.49B, 1.54B, 7.61B, 0.6B, 1.7B, 2.7B, 1.23B,
# 3.21B, 8.03B).
PUBLISHED = {
    "Qwen2.5-0.5B": (
        _published(
            "Qwen2ForCausalLM",
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=21,
        ),
        494_032_768,
    ),
    "Qwen2.5-1.5B": (
        _published(
            "Qwen2ForCausalLM",
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        1_543_714_304,
    ),
    "Qwen2.5-7B": (
        _published(
            "Qwen2ForCausalLM",
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
        7_615_616_512,
    ),
    "Qwen3-0.6B": (
        _published(
            "Qwen3ForCausalLM",
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            attention_bias=False,
        ),
        596_049_920,
    ),
    "Qwen3-1.7B": (
        _published(
            "Qwen3ForCausalLM",
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            attention_bias=False,
        ),
        1_720_574_976,
    ),
    "Phi-2": (
        {
            "architectures": ["PhiForCausalLM"],
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 51200,
            "hidden_act": "gelu_new",
            "layer_norm_eps": 1e-5,
            "partial_rotary_factor": 0.4,
            "qk_layernorm": False,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
        2_779_683_840,
    ),
    "Llama-3.2-1B": (
        _published(
            "LlamaForCausalLM",
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_ROPE,
        ),
        1_235_814_400,
    ),
    "Llama-3.2-3B": (
        _published(
            "LlamaForCausalLM",
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_ROPE,
        ),
        3_212_749_824,
    ),
    "Llama-3.1-8B": (
        _published(
            "LlamaForCausalLM",
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        ),
        8_030_261_248,
    ),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_of_published_configs(name):
    from mlc_edge.models.parameters import parameter_list

    hf, expected = PUBLISHED[name]
    params = parameter_list(ModelSpec.create(hf, "q0f16t", SIZES))
    assert sum(math.prod(shape) for _, shape, _ in params) == expected
