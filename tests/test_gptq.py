"""GPTQ checkpoints without act-order, repacked into our 4-bit layout with the same numbers.

The test's GPTQ packer and unpacker are written from the format's description (AutoGPTQ's
``QuantLinear.pack``: ``qweight`` int32 ``[in/8, out]``, row ``8i + j`` in bits ``4j..`` of
word ``i``; ``qzeros`` int32 ``[in/g, out/8]``, column ``8w + j`` in bits ``4j..`` of word
``w``, each zero point stored minus one in format v1), independently of mlc-edge's reader;
the bundle's tensors are read back with ``test_int4``'s own AWQ-order unpacker.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import assert_matches_fp32, compile_bundle, load_cache_rows, one_error_line, prompt_ids
from safetensors.numpy import save_file
from test_int4 import AWQ_LINEARS, awq_unpack
from tiny_models import make_llama

from mlc_edge.cli import main
from mlc_edge.runtime import Engine

GPTQ_CONFIG = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 32,
    "desc_act": False,
    "sym": False,
    "checkpoint_format": "gptq",
}


def gptq_pack_rows(values: np.ndarray) -> np.ndarray:
    """``[in, out]`` 4-bit values as GPTQ's ``qweight`` ``[in/8, out]``, a value at a time."""
    rows, cols = values.shape
    out = np.zeros((rows // 8, cols), dtype=np.int64)
    for row in range(rows):
        out[row // 8] |= values[row].astype(np.int64) << (4 * (row % 8))
    return out.astype(np.uint32).view(np.int32)


def gptq_pack_columns(values: np.ndarray) -> np.ndarray:
    """``[groups, out]`` 4-bit values as GPTQ's ``qzeros`` ``[groups, out/8]``."""
    rows, cols = values.shape
    out = np.zeros((rows, cols // 8), dtype=np.int64)
    for col in range(cols):
        out[:, col // 8] |= values[:, col].astype(np.int64) << (4 * (col % 8))
    return out.astype(np.uint32).view(np.int32)


def gptq_unpack_rows(words: np.ndarray) -> np.ndarray:
    words = words.view(np.uint32).astype(np.int64)
    return np.stack([(words >> (4 * j)) & 15 for j in range(8)], axis=1).reshape(-1, words.shape[1])


def test_the_test_packer_matches_the_format_by_hand():
    # Rows 0..7 of one column hold 0..7: nibble j (from the bottom) is row j.
    assert gptq_pack_rows(np.arange(8)[:, None]).view(np.uint32)[0, 0] == 0x76543210
    # Columns 0..7 of one group hold 1..8: nibble j is column j.
    assert gptq_pack_columns(np.arange(1, 9)[None]).view(np.uint32)[0, 0] == 0x87654321
    values = np.random.default_rng(1).integers(0, 16, size=(16, 5))
    np.testing.assert_array_equal(gptq_unpack_rows(gptq_pack_rows(values)), values)


def make_gptq_checkpoint(model, path, group: int = 32, form: str = "gptq"):
    """A tiny GPTQ checkpoint of ``model``'s shape: random 4-bit values, zero points in
    1..15 (v1 stores them minus one) and fp16 scales, ``g_idx`` in order. Returns (the fp32
    transformers model running the weights they stand for, the values and zero points
    per layer, the checkpoint's tensors)."""
    rng = np.random.default_rng(11)
    tensors = {
        n: p.detach().numpy().copy() for n, p in model.state_dict().items() if "rotary" not in n
    }
    reference = copy.deepcopy(model).eval()
    state = reference.state_dict()
    numbers = {}
    for i in range(model.config.num_hidden_layers):
        for linear in AWQ_LINEARS:
            name = f"model.layers.{i}.{linear}"
            out, k = tensors.pop(f"{name}.weight").shape
            q = rng.integers(0, 16, size=(k, out))
            z = rng.integers(1, 16, size=(k // group, out))
            s = rng.uniform(0.01, 0.03, size=(k // group, out)).astype(np.float16)
            stored = z - 1 if form == "gptq" else z
            tensors[f"{name}.qweight"] = gptq_pack_rows(q)
            tensors[f"{name}.qzeros"] = gptq_pack_columns(stored)
            tensors[f"{name}.scales"] = s
            tensors[f"{name}.g_idx"] = (np.arange(k) // group).astype(np.int32)
            np.testing.assert_array_equal(gptq_unpack_rows(tensors[f"{name}.qweight"]), q)
            numbers[name] = (q, z)
            w = (q - np.repeat(z, group, axis=0)) * np.repeat(s.astype(np.float32), group, 0)
            state[f"{name}.weight"].copy_(torch.from_numpy(w.T.astype(np.float32)))
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_bytes((path.parent / "hf" / "tokenizer.json").read_bytes())
    config = json.loads((path.parent / "hf" / "config.json").read_text())
    config["quantization_config"] = {**GPTQ_CONFIG, "group_size": group, "checkpoint_format": form}
    (path / "config.json").write_text(json.dumps(config))
    return reference, numbers, tensors


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq")
    model = make_llama(path / "hf")
    return (*make_gptq_checkpoint(model, path / "gptq"), path / "gptq")


def test_gptq_checkpoint_runs_with_its_numbers_unchanged(gptq_checkpoint):
    reference, numbers, tensors, path = gptq_checkpoint
    bundle = compile_bundle(path, path.parent / "gptq-q4f32t-hf", "--quantization", "q4f32t-hf")
    cache = load_cache_rows(bundle)
    layer = "model.layers.1"
    # The same integers in our packing: o_proj alone, q/k/v side by side; v1's zero + 1.
    q, z = numbers[f"{layer}.self_attn.o_proj"]
    np.testing.assert_array_equal(awq_unpack(cache[f"{layer}.self_attn.o_proj.qweight"]), q)
    np.testing.assert_array_equal(awq_unpack(cache[f"{layer}.self_attn.o_proj.qzeros"]), z)
    qkv = [numbers[f"{layer}.self_attn.{p}_proj"] for p in "qkv"]
    np.testing.assert_array_equal(
        awq_unpack(cache[f"{layer}.self_attn.qkv_proj.qweight"]),
        np.concatenate([q for q, _ in qkv], axis=1),
    )
    np.testing.assert_array_equal(
        awq_unpack(cache[f"{layer}.self_attn.qkv_proj.qzeros"]),
        np.concatenate([z for _, z in qkv], axis=1),
    )
    np.testing.assert_array_equal(
        cache[f"{layer}.mlp.down_proj.scales"],
        tensors[f"{layer}.mlp.down_proj.scales"].astype(np.float32),
    )
    ids = prompt_ids(reference.config.vocab_size)
    assert_matches_fp32(Engine(bundle), reference, ids)


def test_gptq_v2_zero_points_are_taken_as_stored(tmp_path):
    model = make_llama(tmp_path / "hf")
    _, numbers, _ = make_gptq_checkpoint(model, tmp_path / "v2", form="gptq_v2")
    main(
        ["convert", str(tmp_path / "v2"), "-o", str(tmp_path / "b"), "--quantization", "q4f16t-hf"]
    )
    cache = load_cache_rows(tmp_path / "b")
    _, z = numbers["model.layers.0.mlp.down_proj"]
    np.testing.assert_array_equal(awq_unpack(cache["model.layers.0.mlp.down_proj.qzeros"]), z)


def _refused(path, tmp_path, capsys, quantization: str = "q4f16t") -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["convert", str(path), "-o", str(tmp_path / "b"), "--quantization", quantization])
    line = one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "b").exists()
    return line


@pytest.mark.parametrize(
    "change, quantization, message",
    [
        ({"bits": 8}, "q4f16t", "GPTQ checkpoints with 8-bit weights are not supported"),
        ({"lm_head": True}, "q4f16t", "quantized output layer (lm_head: true)"),
        ({"checkpoint_format": "marlin"}, "q4f16t", "checkpoint_format 'marlin' is not"),
        ({"group_size": -1}, "q4f16t", "GPTQ group_size -1 is not supported"),
        ({}, "q4f16t-g128", "the GPTQ checkpoint's group size is 32 but q4f16t-g128 uses 128"),
        ({}, "q0f16t", "is GPTQ-quantized (4-bit, groups of 32) and cannot be stored as q0f16t"),
    ],
)
def test_gptq_kinds_we_refuse_get_one_line(
    gptq_checkpoint, tmp_path, capsys, change, quantization, message
):
    path = gptq_checkpoint[-1]
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    try:
        assert message in _refused(path, tmp_path, capsys, quantization)
    finally:
        config["quantization_config"] = GPTQ_CONFIG
        (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fault", ["act-order g_idx", "zero point 16"])
def test_gptq_tensors_we_cannot_store_get_one_line(gptq_checkpoint, tmp_path, capsys, fault):
    """Act-order rows without ``desc_act`` in the config, and v1's unstorable zero 16: the
    tensors themselves are refused, before any output."""
    from safetensors.numpy import load_file

    source = gptq_checkpoint[-1]
    path = tmp_path / "ckpt"
    path.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (path / name).write_bytes((source / name).read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    if fault == "act-order g_idx":
        tensors[f"{name}.g_idx"] = np.random.default_rng(0).permutation(tensors[f"{name}.g_idx"])
        message = f"GPTQ tensor {name}.g_idx does not put row i in group i // 32 (act-order)"
    else:
        tensors[f"{name}.qzeros"][0, 0] |= 0xF  # column 0 of group 0: stored 15 -> zero 16
        message = f"GPTQ tensor {name}.qzeros holds a zero point of 16"
    save_file(tensors, str(path / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    assert message in _refused(path, out, capsys)
