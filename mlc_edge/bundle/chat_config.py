"""``mlc-chat-config.json`` and the tokenizer files beside it.

Every field MLC-LLM's runtime requires (docs/runtime-contract.md) is written, those it
shares with the library's ``_metadata`` from ``compiler.contract``; the sampling
defaults come from the checkpoint's ``generation_config.json`` when it has one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..compiler.contract import chat_config_fields
from ..config import ModelSpec
from ..errors import UserError
from .derive_template import checkpoint_template
from .layout import CHAT_CONFIG

# Copied as they are when present; tokenizer.json is what the runtime tries first.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",  # where newer transformers save the chat template
)

_SAMPLING_DEFAULTS = {
    "temperature": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_p": 1.0,
}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def copy_tokenizer(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files; make tokenizer.json from tokenizer.model when missing."""
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        if "tokenizer.model" not in copied:
            raise UserError(
                f"no tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(
                "this checkpoint has only tokenizer.model; turning it into tokenizer.json "
                "needs transformers: pip install 'mlc-edge[hf]'"
            ) from None
        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
            tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
        except Exception as e:  # transformers raises many kinds here
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"could not turn {model_dir / 'tokenizer.model'} into tokenizer.json ({first}); "
                "add a tokenizer.json to the checkpoint"
            ) from None
        copied.append("tokenizer.json")
    return copied


def _tokenizer_info(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    decoder = tokenizer_json.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    byte_level = "ByteLevel" in kinds
    return {
        "token_postproc_method": "byte_level" if byte_level else "byte_fallback",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": False,
    }


def tokenizer_vocab(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    vocab = dict(tokenizer_json.get("model", {}).get("vocab") or {})
    if isinstance(vocab, list):  # Unigram models store [token, score] pairs
        vocab = {tok: i for i, (tok, _) in enumerate(vocab)}
    for added in tokenizer_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def generate_chat_config(
    model_dir: Path, spec: ModelSpec, out_dir: Path, conv_template: str | None = None
) -> dict[str, Any]:
    """Write ``mlc-chat-config.json`` and the tokenizer files into ``out_dir``."""
    model_dir = Path(model_dir)
    files = copy_tokenizer(model_dir, out_dir)
    tokenizer_json = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = tokenizer_vocab(tokenizer_json)
    hf = spec.model_config
    generation: dict[str, Any] = {}
    if (model_dir / "generation_config.json").is_file():
        generation = json.loads((model_dir / "generation_config.json").read_text())
    bos = generation.get("bos_token_id", hf.get("bos_token_id"))
    eos = _as_list(generation.get("eos_token_id", hf.get("eos_token_id")))
    pad = generation.get("pad_token_id", hf.get("pad_token_id"))
    template = checkpoint_template(
        model_dir, spec.family.model_type, tokenizer_json, vocab, bos, eos, conv_template
    )
    config = {
        "version": "0.1.0",
        **chat_config_fields(spec),
        "model_config": spec.model_config,
        "vocab_size": spec.config.vocab_size,
        **{k: generation.get(k, v) for k, v in _SAMPLING_DEFAULTS.items()},
        "tokenizer_files": files,
        "tokenizer_info": _tokenizer_info(tokenizer_json),
        "conv_template": template,
        "pad_token_id": pad if pad is not None else 0,
        "bos_token_id": bos if bos is not None else -1,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    (out_dir / CHAT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config
