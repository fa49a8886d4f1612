"""GGUF (llama.cpp's format) as a checkpoint: config, tokenizer and weights.

A ``.gguf`` file holds what a Hugging Face folder spreads over several files: metadata
(architecture, sizes, the tokenizer's tokens/merges and chat template) and the tensors
under llama.cpp's names (``blk.N.attn_q.weight``), many block-quantized. We read it with
the ``gguf`` package (maintained with llama.cpp), which memory-maps the file:

* ``read_metadata`` turns the metadata into the ``config.json`` our families take;
* ``GGUFFile`` shows the tensors under Hugging Face names and shapes, and ``load``
  dequantizes one tensor at a time to float32 (peak memory: one tensor, as for
  safetensors), undoing llama.cpp's q/k row permutation for Llama (see ``_unpermute``);
  ``load_q4_0`` gives a Q4_0 tensor's 4-bit values and scales as they are, for the
  4-bit schemes (``mlc_edge.convert.int4_weights``);
* ``prepare_model_dir`` writes a folder (``config.json``, the tokenizer files built by
  transformers from the metadata, a link to the ``.gguf``) that the rest of mlc-edge
  treats as any Hugging Face model folder; ``prepare_config_dir`` writes the
  ``config.json`` alone (what ``memory`` and ``verify`` read).

Families: llama, qwen2, qwen3 and phi2 (Phi-2, fused or separate q/k/v). Llama 3.1+'s
``rope_freqs`` tensor becomes ``rope_scaling`` of type llama3 (see ``_llama3_scaling``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Family:
    """How llama.cpp stores one of our families."""

    hf_architecture: str
    model_type: str
    # llama.cpp's converter permutes q/k rows only for Llama-style models; Qwen2/3 and
    # Phi-2 keep Hugging Face's rotary layout (their GGUFs use NeoX-style rope).
    permuted_qk: bool
    global_names: dict[str, str]  # GGUF name before .weight/.bias -> ours
    layer_names: dict[str, str]  # blk.N.<name> -> model.layers.N.<ours>


_LLAMA_GLOBALS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LLAMA_LAYERS = {
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
# Phi-2 (gguf's MODEL_ARCH.PHI2): LayerNorms with biases, dense q/k/v (separate when
# converted from today's Hugging Face checkpoint, one ``attn_qkv`` when converted from
# Microsoft's original one), GELU MLP, an output bias.
_PHI2_GLOBALS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.final_layernorm",
    "output": "lm_head",
}
_PHI2_LAYERS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
# A fused ``blk.N.attn_qkv`` holds q, k and v rows in this order (llama.cpp's phi2 graph
# views it so); we show it as the three Hugging Face tensors.
_FUSED_QKV = "attn_qkv"

# general.architecture -> family
_ARCHITECTURES = {
    "llama": _Family("LlamaForCausalLM", "llama", True, _LLAMA_GLOBALS, _LLAMA_LAYERS),
    "qwen2": _Family("Qwen2ForCausalLM", "qwen2", False, _LLAMA_GLOBALS, _LLAMA_LAYERS),
    "qwen3": _Family("Qwen3ForCausalLM", "qwen3", False, _LLAMA_GLOBALS, _LLAMA_LAYERS),
    "phi2": _Family("PhiForCausalLM", "phi", False, _PHI2_GLOBALS, _PHI2_LAYERS),
}

# Llama 3.1+: llama.cpp stores no rope.scaling.* keys for "llama3" rope, only this tensor
# of per-frequency divisors (LlamaModel.generate_extra_tensors in its convert_hf_to_gguf.py),
# computed with an original context of 8192. It is derived data: we recover
# Hugging Face's rope_scaling from it, recompute it and drop it (see _llama3_scaling).
ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_ORIGINAL_CONTEXT = 8192

_NAME_RE = re.compile(r"(\w+)\.(weight|bias)")
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


def _dequantized(gguf: Any, tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32, in Hugging Face (numpy) order."""
    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    # GGUF lists dimensions fastest-first; Hugging Face (numpy) order is reversed.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(data, dtype=np.float32).reshape(shape)


# Q4_0 (llama.cpp's ggml-common.h ``block_q4_0``; gguf's ``quants.Q4_0``): 32 consecutive
# values of a row, 18 bytes: the fp16 scale d, then 16 bytes whose low nibbles are values
# 0..15 and high nibbles values 16..31; value = (q - 8) * d.
Q4_0_BLOCK = 32
Q4_0_ZERO = 8
_Q4_0_BLOCK_BYTES = 2 + Q4_0_BLOCK // 2


def _q4_0_blocks(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_0 tensor's raw bytes as its 4-bit values ``q`` (uint8 ``[rows, cols]``, 0..15)
    and block scales ``d`` (float16 ``[rows, cols / 32]``), bits unchanged."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // Q4_0_BLOCK, _Q4_0_BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(rows, -1)
    packed = blocks[:, :, 2:]
    q = np.empty((rows, cols // Q4_0_BLOCK, Q4_0_BLOCK), dtype=np.uint8)
    q[:, :, : Q4_0_BLOCK // 2] = packed & np.uint8(0x0F)
    q[:, :, Q4_0_BLOCK // 2 :] = packed >> np.uint8(4)
    return q.reshape(rows, cols), d


def _llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: float
) -> np.ndarray:
    """The divisor of each rotary frequency under Llama 3's rope scaling, as llama.cpp
    stores it in ``rope_freqs`` and as transformers' ``_compute_llama3_parameters``
    applies it (1 for short wavelengths, ``factor`` for long ones, smooth between)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    long = np.where(wavelen > original / low, factor, between)
    return np.where(wavelen < original / high, 1.0, long)


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict[str, Any]:
    """Hugging Face's ``rope_scaling`` whose factors are ``factors`` (llama.cpp's
    ``rope_freqs``), checked by recomputing them; {} when they are all 1.

    The factors depend on ``original / low_freq_factor`` and ``original / high_freq_factor``
    only (the two wavelength thresholds), so ``original`` is llama.cpp's 8192 and the two
    factors follow from a line through the frequencies between the thresholds; with
    fewer than two of those, Llama 3's own 1 and 4 are tried. The largest factor is taken
    for ``factor``: Llama 3's heads have frequencies past the low threshold (where it is
    not, the recomputation differs and the file is refused).
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2:
        raise UserError(
            f"{path}: {ROPE_FREQS} has {factors.size} values for head_dim {head_dim} "
            f"(expected {head_dim // 2}); the file is inconsistent"
        )
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return {}
    top = float(factors.max())
    original = float(_LLAMA3_ORIGINAL_CONTEXT)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wavelen = freqs / (2 * np.pi)
    between = (factors > 1 + 1e-5) & (factors < top * (1 - 1e-5))
    candidates = []
    if between.sum() >= 2:
        # 1/f = (1 - s)/F + s with s = original * inv_wavelen / (high - low) - low / (high - low)
        s = (1 / factors[between] - 1 / top) / (1 - 1 / top)
        slope, intercept = np.polyfit(inv_wavelen[between], s, 1)
        if slope > 0:
            low = -intercept * original / slope
            high = low + original / slope
            candidates += [(round(low, 4), round(high, 4)), (low, high)]
    candidates.append((1.0, 4.0))
    for low, high in candidates:
        if not 0 < low < high:
            continue
        ours = _llama3_rope_factors(head_dim, theta, top, low, high, original)
        if np.allclose(ours, factors, rtol=1e-4, atol=0):
            return {
                "rope_type": "llama3",
                "factor": round(top, 4) if abs(top - round(top, 4)) < 1e-5 * top else top,
                "low_freq_factor": float(low),
                "high_freq_factor": float(high),
                "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
            }
    raise UserError(
        f"{path}: {ROPE_FREQS} does not follow Llama 3's rope scaling (no factor, "
        f"low_freq_factor and high_freq_factor reproduce it); this GGUF is not supported"
    )


def read_metadata(reader: Any, path: Path) -> tuple[str, dict[str, Any]]:
    """``general.architecture`` and the config dict our families take."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture '{arch}' is not supported (supported: "
            f"{', '.join(_ARCHITECTURES)})"
        )
    family = _ARCHITECTURES[arch]

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
    tensors = {t.name: t for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [family.hf_architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "vocab_size": int(vocab),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if arch == "phi2":
        _phi2_config(config, need, tensors, path)
    else:
        config["rms_norm_eps"] = float(need("attention.layer_norm_rms_epsilon"))
        config["hidden_act"] = "silu"
        head_dim = _field(reader, f"{arch}.attention.key_length") or _field(
            reader, f"{arch}.rope.dimension_count"
        )
        if head_dim is not None and int(head_dim) != hidden // heads or arch == "qwen3":
            config["head_dim"] = int(head_dim or hidden // heads)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        # Our families compile plain RoPE and Llama 3's (which llama.cpp stores as
        # rope_freqs, below), not linear/yarn/longrope scaling.
        raise UserError(
            f"{path}: GGUF rope scaling '{scaling}' is not supported (plain RoPE and "
            f"Llama 3's rope_freqs are)"
        )
    if ROPE_FREQS in tensors:
        if arch != "llama":
            raise UserError(
                f"{path}: {ROPE_FREQS} (per-frequency rope factors) is supported for Llama "
                f"GGUFs only, not for '{arch}'"
            )
        head_dim = config.get("head_dim") or hidden // heads
        llama3 = _llama3_scaling(
            _dequantized(_import_gguf(path), tensors[ROPE_FREQS]),
            head_dim,
            config["rope_theta"],
            path,
        )
        if llama3:
            config["rope_scaling"] = llama3
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    for ours, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[ours] = int(value)
    return arch, config


def _phi2_config(config: dict[str, Any], need: Any, tensors: dict[str, Any], path: Path) -> None:
    """Phi-2's own keys (llama.cpp's ``Phi2Model.set_gguf_parameters``)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = hidden // heads
    # rope.dimension_count is the rotary part of a head (partial_rotary_factor * head_dim),
    # not head_dim; our Phi config takes the factor and truncates as transformers does.
    rotary = int(need("rope.dimension_count"))
    factor = rotary / head_dim
    if int(head_dim * factor) != rotary:
        factor = float(np.nextafter(factor, 1.0))
    config["partial_rotary_factor"] = factor
    config["layer_norm_eps"] = float(need("attention.layer_norm_epsilon"))
    # transformers' "gelu_new" is llama.cpp's GELU (tanh approximation) of phi2.
    config["hidden_act"] = "gelu_new"
    # llama.cpp writes feed_forward_length as 4 * embedding_length whatever the model's
    # intermediate size: the first fc1 (ffn_up) says it.
    up = tensors.get("blk.0.ffn_up.weight")
    if up is None:
        raise UserError(f"{path}: GGUF has no blk.0.ffn_up.weight; the file is incomplete")
    config["intermediate_size"] = int(up.shape[-1])


def _hf_name(family: _Family, name: str) -> str | None:
    m = _NAME_RE.fullmatch(name)
    if m and m.group(1) in family.global_names:
        return f"{family.global_names[m.group(1)]}.{m.group(2)}"
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in family.layer_names:
        return f"model.layers.{m.group(1)}.{family.layer_names[m.group(2)]}.{m.group(3)}"
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
    """One open ``.gguf``, its tensors under Hugging Face names (float32 on load).

    A fused ``attn_qkv`` (Phi-2) shows as q/k/v: each a slice of its rows; the fused
    tensor is dequantized once for the three (the last one is kept).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        arch, config = read_metadata(self._reader, self.path)
        self._gguf = _import_gguf(self.path)
        family = _ARCHITECTURES[arch]
        permuted = family.permuted_qk
        self._heads = {
            "self_attn.q_proj": config["num_attention_heads"] if permuted else None,
            "self_attn.k_proj": config["num_key_value_heads"] if permuted else None,
        }
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        q_rows = config["num_attention_heads"] * head_dim
        kv_rows = config["num_key_value_heads"] * head_dim
        qkv = {
            "self_attn.q_proj": (0, q_rows),
            "self_attn.k_proj": (q_rows, q_rows + kv_rows),
            "self_attn.v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows),
        }
        # HF name -> (GGUF tensor, rows of it or None for all)
        self._tensors: dict[str, tuple[Any, tuple[int, int] | None]] = {}
        self._cached: tuple[str, np.ndarray] | None = None
        for t in self._reader.tensors:
            if t.name == ROPE_FREQS:
                continue  # checked and turned into rope_scaling by read_metadata
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise UserError(
                    f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, which "
                    f"mlc-edge cannot read exactly (supported: {', '.join(SUPPORTED_TYPES)}); "
                    f"use a GGUF quantized with one of those"
                )
            m = _LAYER_RE.fullmatch(t.name)
            if arch == "phi2" and m and m.group(2) == _FUSED_QKV:
                if int(t.shape[-1]) != q_rows + 2 * kv_rows:
                    raise UserError(
                        f"{self.path}: {t.name} has {int(t.shape[-1])} rows, not q+k+v's "
                        f"{q_rows + 2 * kv_rows}; the file is inconsistent"
                    )
                for module, rows in qkv.items():
                    self._tensors[f"model.layers.{m.group(1)}.{module}.{m.group(3)}"] = (t, rows)
                continue
            name = _hf_name(family, t.name)
            if name is None:
                raise UserError(
                    f"{self.path}: tensor {t.name} has no counterpart in the Hugging Face "
                    f"{config['architectures'][0]} layout; this GGUF is not supported"
                )
            self._tensors[name] = (t, None)

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        t, rows = self._tensors[name]
        # GGUF lists dimensions fastest-first; Hugging Face (numpy) order is reversed.
        shape = tuple(int(d) for d in reversed(t.shape))
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    def dtype(self, name: str) -> str:
        """GGUF tensors load as float32 (dequantized); ``stored_type`` names the block type."""
        return "float32"

    def stored_type(self, name: str) -> str:
        return self._tensors[name][0].tensor_type.name

    def nbytes(self, name: str) -> int:
        t, rows = self._tensors[name]
        if rows is None:
            return int(t.n_bytes)
        return int(t.n_bytes) * (rows[1] - rows[0]) // int(t.shape[-1])

    def load(self, name: str) -> np.ndarray:
        t, rows = self._tensors[name]
        if rows is None:
            data = _dequantized(self._gguf, t)
        else:
            if self._cached is None or self._cached[0] != t.name:
                self._cached = (t.name, _dequantized(self._gguf, t))
            data = np.ascontiguousarray(self._cached[1][rows[0] : rows[1]])
        n_head = self._heads.get(name.rsplit(".", 1)[0].split(".", 3)[-1])
        if n_head:
            data = _unpermute(data, n_head)
        return data

    def load_q4_0(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A Q4_0 tensor (``stored_type`` "Q4_0") without dequantizing: its values ``q``
        (uint8 ``[out, in]``, 0..15) and scales ``d`` (float16 ``[out, in / 32]``), so
        that ``load(name) == (q - 8) * d`` per block of 32 along ``in``. Rows are sliced
        and un-permuted as ``load`` does (both arrays' rows are the output axis)."""
        t, rows = self._tensors[name]
        if t.tensor_type.name != "Q4_0":
            raise ValueError(f"{name} is stored as {t.tensor_type.name}, not Q4_0")
        out, cols = self.shape(name)[0], int(t.shape[0])
        raw = np.asarray(t.data)
        if rows is not None:
            raw = raw.reshape(int(t.shape[-1]), -1)[rows[0] : rows[1]]
        q, d = _q4_0_blocks(raw, out, cols)
        n_head = self._heads.get(name.rsplit(".", 1)[0].split(".", 3)[-1])
        if n_head:
            q, d = _unpermute(q, n_head), _unpermute(d, n_head)
        return q, d

    def close(self) -> None:
        self._tensors = {}
        self._cached = None
        self._reader = None


def _tokenizer_files(gguf_path: Path, out_dir: Path, model_type: str) -> None:
    """tokenizer.json + tokenizer_config.json (and the chat template) from the metadata."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise UserError(
            f"building the tokenizer of {gguf_path} needs transformers: "
            f'pip install "mlc-edge[hf]" (or transformers==5.23.0)'
        ) from None
    # AutoTokenizer reads the GGUF's model config first, which transformers refuses for
    # architectures it cannot load (phi2); the tokenizer itself is built from
    # tokenizer.ggml.* alone, which the plain fast tokenizer does.
    builder = PreTrainedTokenizerFast if model_type == "phi" else AutoTokenizer
    try:
        tok = builder.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        tok.save_pretrained(str(out_dir))
    except Exception as err:  # transformers raises many kinds for unsupported tokenizers
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"could not build the tokenizer of {gguf_path} ({first})") from None
    if not (out_dir / "tokenizer.json").is_file():
        raise UserError(f"transformers wrote no tokenizer.json for {gguf_path}")


def read_config(gguf_path: Path) -> dict[str, Any]:
    """The ``config.json`` a GGUF stands for; its tensors are checked too, so a file we
    cannot convert is refused here, before any other work."""
    gguf_path = Path(gguf_path).absolute()
    _, config = read_metadata(_open_reader(gguf_path), gguf_path)
    GGUFFile(gguf_path).close()
    return config


def prepare_config_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Write only the ``config.json`` of ``gguf_path`` into ``out_dir`` (which exists):
    all that ``memory`` and ``verify`` read of a model folder."""
    config = read_config(gguf_path)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def prepare_model_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face-style folder for ``gguf_path`` into ``out_dir`` (which
    exists): config.json, tokenizer files, and ``model.gguf`` linking to the file."""
    gguf_path = Path(gguf_path).absolute()
    config = read_config(gguf_path)
    print(
        f"read {gguf_path.name}: {config['architectures'][0]}, "
        f"{config['num_hidden_layers']} layers; building its tokenizer ...",
        file=sys.stderr,
        flush=True,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _tokenizer_files(gguf_path, out_dir, config["model_type"])
    os.symlink(gguf_path, out_dir / LINK_NAME)
    return out_dir
