"""GGUF (llama.cpp's format) as a checkpoint: config, tokenizer and weights.

A ``.gguf`` file holds what a Hugging Face folder spreads over several files: metadata
(architecture, sizes, the tokenizer's tokens/merges and chat template) and the tensors
under llama.cpp's names (``blk.N.attn_q.weight``), many block-quantized. We read it with
the ``gguf`` package (maintained with llama.cpp), which memory-maps the file:

* ``read_metadata`` turns the metadata into the ``config.json`` our families take;
* ``GGUFFile`` shows the tensors under Hugging Face names and shapes, and ``load``
  dequantizes one tensor at a time to float32 (peak memory: one tensor, as for
  safetensors), undoing llama.cpp's q/k row permutation for Llama (see ``_unpermute``);
* ``prepare_model_dir`` writes a folder (``config.json``, the tokenizer files built by
  transformers from the metadata, a link to the ``.gguf``) that the rest of mlc-edge
  treats as any Hugging Face model folder.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

GGUF_SUFFIX = ".gguf"
LINK_NAME = "model.gguf"  # the link to the .gguf inside a prepared folder

# Tensor types read exactly: floats as they are, block quantizations with the gguf
# package's numpy dequantizers (checked against libggml by gguf's own tests).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# general.architecture -> (Hugging Face architecture, model_type, rows of q/k permuted).
# llama.cpp's converter permutes q/k rows only for Llama-style models; Qwen2/3 keep
# Hugging Face's rotary layout (their GGUFs use NeoX-style rope).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _import_gguf(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError(
            f"{path} is a GGUF file and reading it needs the gguf package: pip install gguf==0.19.0"
        ) from None
    return gguf


def find_gguf(path: Path) -> Path | None:
    """The ``.gguf`` a model path means: the file itself, or the only one in a folder
    that has no ``config.json`` (a Hugging Face folder that also holds a GGUF is read
    as a Hugging Face folder). None when the path is not a GGUF model."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{path} holds several GGUF files ({names}); pass the one to use")
    return found[0] if found else None


def _open_reader(path: Path) -> Any:
    gguf = _import_gguf(path)
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as err:  # the reader raises ValueError/IndexError/... by damage
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{path} cannot be read as GGUF ({why}); it may be truncated or corrupt: "
            f"download it again"
        ) from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_metadata(reader: Any, path: Path) -> tuple[str, dict[str, Any]]:
    """``general.architecture`` and the config dict our families take."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture '{arch}' is not supported (supported: "
            f"{', '.join(_ARCHITECTURES)})"
        )
    hf_arch, model_type, _ = _ARCHITECTURES[arch]

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise UserError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise UserError(f"{path}: GGUF metadata has no vocabulary size; the file is incomplete")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(
            f"{path}: rope scaling stored as per-frequency factors (rope_freqs, Llama 3.1+) "
            f"is not supported from GGUF; compile the Hugging Face checkpoint instead"
        )
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "vocab_size": int(vocab),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(
        reader, f"{arch}.rope.dimension_count"
    )
    if head_dim is not None and int(head_dim) != hidden // heads or model_type == "qwen3":
        config["head_dim"] = int(head_dim or hidden // heads)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UserError(f"{path}: GGUF rope scaling '{scaling}' is not supported (linear is)")
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(need("rope.scaling.factor")),
        }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    for ours, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[ours] = int(value)
    return arch, config


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (``LlamaModel.permute`` in its
    ``convert_hf_to_gguf.py``): Hugging Face orders each head's rows as
    [first rotary half, second half]; llama.cpp's rope pairs neighbouring rows, so its
    converter interleaves the halves (row ``2i`` of a head is HF row ``i``, row
    ``2i + 1`` is HF row ``i + head_dim / 2``). Weights and biases alike."""
    shape = rows.shape
    head_dim = shape[0] // n_head
    return rows.reshape(n_head, head_dim // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFFile:
    """One open ``.gguf``, its tensors under Hugging Face names (float32 on load)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        arch, config = read_metadata(self._reader, self.path)
        self._gguf = _import_gguf(self.path)
        permuted = _ARCHITECTURES[arch][2]
        self._heads = {
            "self_attn.q_proj": config["num_attention_heads"] if permuted else None,
            "self_attn.k_proj": config["num_key_value_heads"] if permuted else None,
        }
        self._tensors: dict[str, Any] = {}
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise UserError(
                    f"{self.path}: tensor {t.name} has no counterpart in the Hugging Face "
                    f"{config['architectures'][0]} layout; this GGUF is not supported"
                )
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise UserError(
                    f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, which "
                    f"mlc-edge cannot read exactly (supported: {', '.join(SUPPORTED_TYPES)}); "
                    f"use a GGUF quantized with one of those"
                )
            self._tensors[name] = t

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; Hugging Face (numpy) order is reversed.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def dtype(self, name: str) -> str:
        """GGUF tensors load as float32 (dequantized); ``stored_type`` names the block type."""
        return "float32"

    def stored_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def nbytes(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)

    def load(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        data = self._gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(self.shape(name))
        n_head = self._heads.get(name.rsplit(".", 1)[0].split(".", 3)[-1])
        if n_head:
            data = _unpermute(data, n_head)
        return data

    def close(self) -> None:
        self._tensors = {}
        self._reader = None


def _tokenizer_files(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json (and the chat template) from the metadata."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(
            f"building the tokenizer of {gguf_path} needs transformers: "
            f'pip install "mlc-edge[hf]" (or transformers==5.23.0)'
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        tok.save_pretrained(str(out_dir))
    except Exception as err:  # transformers raises many kinds for unsupported tokenizers
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"could not build the tokenizer of {gguf_path} ({first})") from None
    if not (out_dir / "tokenizer.json").is_file():
        raise UserError(f"transformers wrote no tokenizer.json for {gguf_path}")


def prepare_model_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face-style folder for ``gguf_path`` into ``out_dir`` (which
    exists): config.json, tokenizer files, and ``model.gguf`` linking to the file."""
    gguf_path = Path(gguf_path).absolute()
    reader = _open_reader(gguf_path)
    _, config = read_metadata(reader, gguf_path)
    GGUFFile(gguf_path).close()  # refuse unsupported tensors before any other work
    print(
        f"read {gguf_path.name}: {config['architectures'][0]}, "
        f"{config['num_hidden_layers']} layers; building its tokenizer ...",
        file=sys.stderr,
        flush=True,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _tokenizer_files(gguf_path, out_dir)
    os.symlink(gguf_path, out_dir / LINK_NAME)
    return out_dir
