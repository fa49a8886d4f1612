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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


# Every family's tiny model: small, GQA, bos/eos ids of make_tokenizer's ...
_COMMON = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=384,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
)

# ... plus the shape of the family's real checkpoints, in miniature.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "Llama": dict(rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Qwen2.5-0.5B: tied embeddings; the sliding-window fields are present but off.
    "Qwen2": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32,
        max_window_layers=2,
    ),
    # Qwen3-0.6B: head_dim explicit and larger than hidden_size / heads; tied.
    "Qwen3": dict(head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Phi-2: MHA, head_dim 20 (not a power of two), partial_rotary_factor 0.4 (rotary_dim
    # 8 of 20), gelu_new, untied.
    "Phi": dict(
        hidden_size=80,
        intermediate_size=320,
        num_key_value_heads=4,
        layer_norm_eps=1e-5,
        hidden_act="gelu_new",
        partial_rotary_factor=0.4,
        tie_word_embeddings=False,
    ),
}


def tiny_config(family: str, **overrides: Any):
    """transformers' ``<family>Config`` of a tiny model, e.g. ``tiny_config("Qwen2")``."""
    import transformers

    config_class = getattr(transformers, f"{family}Config")
    return config_class(**{**_COMMON, **FAMILY_DEFAULTS[family], **overrides})


def save_model(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save like the hub: safetensors in ``dtype``, config.json, tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    # A copy: casting in place would also round the model's rotary buffers.
    copy.deepcopy(model).to(dtype).save_pretrained(path, safe_serialization=True)
    make_tokenizer().save(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"], "save_pretrained must record the architecture"
    return path


def make_model(
    family: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
):
    """A random ``<family>ForCausalLM``, saved to ``path`` like the hub; returns it in fp32."""
    import transformers

    torch.manual_seed(seed)
    model_class = getattr(transformers, f"{family}ForCausalLM")
    model = model_class(tiny_config(family, **overrides)).eval()
    randomize(model)
    save_model(model, path, dtype)
    return model


def randomize(model) -> None:
    """Larger-than-default weights give logits with a wide spread, so greedy tokens are
    decided by clear margins and a real bug cannot hide behind near-ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and not name.endswith(".bias"):  # norm scales stay near 1
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.15)


def make_llama(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    return make_model("Llama", path, seed, dtype, **overrides)
