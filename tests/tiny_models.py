"""Tiny random Hugging Face checkpoints (and a tokenizer) for the tests.

Real model families, a few layers wide enough to exercise GQA and fused projections,
saved the way the hub ships them: config.json, safetensors, tokenizer.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? It is Paris, a city on the Seine.",
    "Small language models run on phones with a GPU and little memory.",
    "Compile the model, convert the weights, and run it on the device.",
] * 4


def make_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def save_model(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save like the hub: safetensors in ``dtype``, config.json, tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    # A copy: casting in place would also round the model's rotary buffers.
    copy.deepcopy(model).to(dtype).save_pretrained(path, safe_serialization=True)
    make_tokenizer().save(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"], "save_pretrained must record the architecture"
    return path


def make_llama(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).eval()
    # Larger-than-default weights give logits with a wide spread, so greedy tokens are
    # decided by clear margins and a real bug cannot hide behind near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.15)
    save_model(model, path, dtype)
    return model
