"""Compiled Llama bundles against transformers on the same random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import assert_matches_fp32, compile_bundle, greedy_compare, prompt_ids, top2_margins
from tiny_models import make_llama

from mlc_edge.runtime import Engine

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the tiny head_dim has low, medium and high frequency bands.
    "original_max_position_embeddings": 64,
}

VARIANTS = {
    "untied-gqa": ({}, torch.float32),
    "tied-embeddings": ({"tie_word_embeddings": True}, torch.float32),
    "llama3-rope-scaling": ({"rope_parameters": LLAMA3_ROPE}, torch.float32),
    "bf16-checkpoint": ({}, torch.bfloat16),
    "mha-biases": (
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
        torch.float32,
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_q0f32t_logits_and_greedy_tokens(tmp_path, variant):
    overrides, dtype = VARIANTS[variant]
    model = make_llama(tmp_path / "hf", dtype=dtype, **overrides)
    if dtype == torch.bfloat16:
        # The reference is the checkpoint as saved (bf16 values), computed in fp32.
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    bundle = compile_bundle(tmp_path / "hf", tmp_path / "bundle", "--quantization", "q0f32t")
    engine = Engine(bundle)
    assert_matches_fp32(engine, model, prompt_ids(model.config.vocab_size))


def test_llama3_rope_scaling_changes_the_result(tmp_path):
    """The rope case above must exercise the scaling: without it the logits differ."""
    scaled = make_llama(tmp_path / "scaled", rope_parameters=LLAMA3_ROPE)
    plain = make_llama(
        tmp_path / "plain", rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
    )
    ids = prompt_ids(scaled.config.vocab_size)
    with torch.no_grad():
        a = scaled(torch.tensor([ids])).logits[0, -1]
        b = plain(torch.tensor([ids])).logits[0, -1]
    assert float((a - b).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return make_llama(path / "hf"), path


def test_q0f16t_greedy_tokens_match_fp32_transformers(tiny_llama):
    model, path = tiny_llama
    engine = Engine(compile_bundle(path / "hf", path / "q0f16t", "--quantization", "q0f16t"))
    ids = prompt_ids(model.config.vocab_size)
    ours, theirs, errors = greedy_compare(engine, model, ids)
    assert ours == theirs
    # The tolerance is fp16's own: transformers run in fp16 on the same weights, over
    # the same positions, is off from its fp32 logits by `fp16_error`. We accumulate in
    # fp16 where PyTorch's CPU kernels use fp32, so allow a small multiple of it.
    with torch.no_grad():
        seq = torch.tensor([ids + theirs[:-1]])
        fp32 = model(seq).logits[0, len(ids) - 1 :]
        fp16 = copy.deepcopy(model).half()(seq).logits[0, len(ids) - 1 :].float()
    fp16_error = float((fp16 - fp32).abs().max())
    assert max(errors) < 4 * fp16_error, (errors, fp16_error)


def test_q0f16_nk_layout_gives_the_same_tokens(tiny_llama):
    model, path = tiny_llama
    kn = Engine(compile_bundle(path / "hf", path / "kn", "--quantization", "q0f16t"))
    nk = Engine(compile_bundle(path / "hf", path / "nk", "--quantization", "q0f16"))
    ids = prompt_ids(model.config.vocab_size, seed=1)
    kn_tokens, theirs, _ = greedy_compare(kn, model, ids)
    nk_tokens, _, _ = greedy_compare(nk, model, ids)
    assert nk_tokens == kn_tokens
    # This prompt has a near-tie (top-2 margin 0.003 in fp32) that fp16 rounding may
    # flip; every step decided by a margin larger than fp16's error must agree.
    decisive = [i for i, m in enumerate(top2_margins(model, ids, theirs)) if m > 0.05]
    assert len(decisive) >= len(theirs) - 2
    assert [kn_tokens[i] for i in decisive] == [theirs[i] for i in decisive]


def test_prefill_is_chunked(tiny_llama):
    """Feeding the prompt in one call or token by token gives the same next-token logits."""
    model, path = tiny_llama
    engine = Engine(compile_bundle(path / "hf", path / "f32", "--quantization", "q0f32t"))
    ids = prompt_ids(model.config.vocab_size)
    chunked = engine.prefill(ids)
    engine.reset()
    for token in ids[:-1]:
        engine.decode(token)
    one_by_one = engine.decode(ids[-1])
    np.testing.assert_allclose(chunked, one_by_one, atol=1e-5)
