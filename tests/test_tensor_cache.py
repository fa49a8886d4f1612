"""The tensor-cache writer (checked against TVM's own readers) and convert_weights."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file as save_numpy

from mlc_edge.convert.tensor_cache import (
    TensorCacheWriter,
    load_tensor_cache,
    read_tensor_cache_json,
)
from mlc_edge.convert.weights import convert_weights
from mlc_edge.errors import UserError
from mlc_edge.models.base import ParamSource
from mlc_edge.models.parameters import TablePiece
from mlc_edge.quantization.schemes import get_scheme

MiB = 1024 * 1024


def _write_cache(out: Path, shard_bytes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {
        "small.0": rng.standard_normal((64, 64)).astype(np.float16),  # 8 KiB
        "mid.0": rng.standard_normal((256, 1024)).astype(np.float16),  # 512 KiB
        "mid.1": rng.standard_normal((256, 1024)).astype(np.float16),  # 512 KiB
        "big": rng.standard_normal((1024, 384)).astype(np.float32),  # 1.5 MiB
        "ints": np.arange(1000, dtype=np.int32),
        "mid.2": rng.standard_normal((128, 1024)).astype(np.float32),  # 512 KiB
        "f32": rng.standard_normal(77).astype(np.float32),
    }
    with TensorCacheWriter(out, shard_bytes=shard_bytes) as writer:
        for name, arr in tensors.items():
            writer.add(name, arr)
        cache = writer.finish()
    assert cache == read_tensor_cache_json(out)
    return tensors


def test_writer_shards_offsets_and_md5(tmp_path: Path) -> None:
    tensors = _write_cache(tmp_path, shard_bytes=MiB)
    cache = json.loads((tmp_path / "tensor-cache.json").read_text())

    n_params = sum(a.size for a in tensors.values())
    n_bytes = sum(a.nbytes for a in tensors.values())
    assert cache["metadata"]["ParamSize"] == n_params
    assert cache["metadata"]["ParamBytes"] == n_bytes
    assert cache["metadata"]["BitsPerParam"] == pytest.approx(8 * n_bytes / n_params, abs=1e-3)

    order = [r["name"] for shard in cache["records"] for r in shard["records"]]
    assert order == list(tensors)
    for i, shard in enumerate(cache["records"]):
        assert shard["dataPath"] == f"params_shard_{i}.bin"
        assert shard["format"] == "raw-shard"
        data = (tmp_path / shard["dataPath"]).read_bytes()
        assert len(data) == shard["nbytes"]
        assert hashlib.md5(data).hexdigest() == shard["md5sum"]
        if len(shard["records"]) > 1:
            assert shard["nbytes"] <= MiB
        offset = 0
        for rec in shard["records"]:
            arr = tensors[rec["name"]]
            assert rec["format"] == "raw"
            assert rec["byteOffset"] == offset
            assert rec["nbytes"] == arr.nbytes
            assert rec["shape"] == list(arr.shape)
            assert rec["dtype"] == str(arr.dtype)
            assert data[offset : offset + arr.nbytes] == arr.tobytes()
            offset += arr.nbytes
        assert offset == shard["nbytes"]

    # The 1.5 MiB tensor is over the cap, so it sits alone.
    (big_shard,) = [s for s in cache["records"] if any(r["name"] == "big" for r in s["records"])]
    assert [r["name"] for r in big_shard["records"]] == ["big"]
    assert [[r["name"] for r in s["records"]] for s in cache["records"]] == [
        ["small.0", "mid.0"],
        ["mid.1"],
        ["big"],
        ["ints", "mid.2", "f32"],
    ]

    back = load_tensor_cache(tmp_path, verify_md5=True)
    assert list(back) == list(tensors)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr)


def test_tvm_reads_what_we_write(tmp_path: Path) -> None:
    tvm = pytest.importorskip("tvm")
    from tvm.contrib import tvmjs

    tensors = _write_cache(tmp_path, shard_bytes=MiB)

    loaded, metadata = tvmjs.load_tensor_cache(str(tmp_path), tvm.cpu())
    assert metadata["ParamSize"] == sum(a.size for a in tensors.values())
    for name, arr in tensors.items():
        np.testing.assert_array_equal(loaded[name].numpy(), arr)

    # The C++ loader is the one the MLC-LLM runtime uses.
    load = tvm.get_global_func("vm.builtin.tensor_cache.load")
    get = tvm.get_global_func("vm.builtin.tensor_cache.get")
    clear = tvm.get_global_func("vm.builtin.tensor_cache.clear")
    load(str(tmp_path), tvm.cpu().dlpack_device_type(), 0)
    try:
        for name, arr in tensors.items():
            got = get(name).numpy()
            assert got.dtype == arr.dtype
            np.testing.assert_array_equal(got, arr)
    finally:
        clear()


def test_load_detects_short_shard(tmp_path: Path) -> None:
    _write_cache(tmp_path, shard_bytes=MiB)
    shard = tmp_path / "params_shard_1.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"params_shard_1\.bin holds"):
        load_tensor_cache(tmp_path)


# -- convert_weights ------------------------------------------------------------------


def _toy_checkpoint(model_dir: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((50, 32)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((16, 32)).astype(np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((16, 32)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(32).astype(np.float32),
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    save_numpy(hf, str(model_dir / "model.safetensors"))
    return hf


_QKV = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
)
_MAPPING = {
    "model.embed_tokens.weight": ParamSource(("model.embed_tokens.weight",)),
    "model.layers.0.self_attn.qkv_proj.weight": ParamSource(_QKV, is_linear_weight=True),
    "model.layers.0.mlp.up_proj.weight": ParamSource(
        ("model.layers.0.mlp.up_proj.weight",), is_linear_weight=True
    ),
    "model.norm.weight": ParamSource(("model.norm.weight",)),
}


def _expected(dtype: str, transposed: bool, up_rows: int = 64):
    def lin(out_f: int, in_f: int) -> tuple[int, ...]:
        return (in_f, out_f) if transposed else (out_f, in_f)

    return [
        ("model.embed_tokens.weight", (50, 32), dtype),
        ("model.layers.0.self_attn.qkv_proj.weight", lin(64, 32), dtype),
        ("model.layers.0.mlp.up_proj.weight", lin(up_rows, 32), dtype),
        ("model.norm.weight", (32,), dtype),
    ]


@pytest.mark.parametrize(
    ("scheme", "dtype", "transposed"),
    [("q0f32t", "float32", True), ("q0f16t", "float16", True), ("q0f16", "float16", False)],
)
def test_convert_fuses_and_transposes(
    tmp_path: Path, scheme: str, dtype: str, transposed: bool
) -> None:
    hf = _toy_checkpoint(tmp_path / "hf")
    out = tmp_path / "bundle"
    out.mkdir()
    cache = convert_weights(
        tmp_path / "hf",
        out,
        _expected(dtype, transposed),
        _MAPPING,
        get_scheme(scheme),
        progress=False,
    )
    assert cache == read_tensor_cache_json(out)
    got = load_tensor_cache(out)
    assert list(got) == [name for name, _, _ in _expected(dtype, transposed)]

    qkv = np.concatenate([hf[n] for n in _QKV], axis=0)
    want = {
        "model.embed_tokens.weight": hf["model.embed_tokens.weight"],
        "model.layers.0.self_attn.qkv_proj.weight": qkv.T if transposed else qkv,
        "model.layers.0.mlp.up_proj.weight": (
            hf["model.layers.0.mlp.up_proj.weight"].T
            if transposed
            else hf["model.layers.0.mlp.up_proj.weight"]
        ),
        "model.norm.weight": hf["model.norm.weight"],
    }
    for name, arr in want.items():
        assert got[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[name], arr.astype(dtype))


def test_convert_shape_mismatch_names_tensor(tmp_path: Path) -> None:
    _toy_checkpoint(tmp_path / "hf")
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(UserError) as err:
        convert_weights(
            tmp_path / "hf",
            out,
            _expected("float16", True, up_rows=128),
            _MAPPING,
            get_scheme("q0f16t"),
            progress=False,
        )
    assert str(err.value) == (
        "weight model.layers.0.mlp.up_proj.weight has shape [64, 32] but config.json "
        "implies [128, 32]; the checkpoint does not match its config.json"
    )
    # Failing fast: nothing was written.
    assert list(out.iterdir()) == []


def test_convert_fused_shape_mismatch(tmp_path: Path) -> None:
    _toy_checkpoint(tmp_path / "hf")
    expected = _expected("float32", True)
    expected[1] = ("model.layers.0.self_attn.qkv_proj.weight", (32, 96), "float32")
    with pytest.raises(UserError, match=r"fused shape \[64, 32\] but config.json implies \[96"):
        convert_weights(
            tmp_path / "hf", tmp_path, expected, _MAPPING, get_scheme("q0f32t"), progress=False
        )


def test_convert_missing_tensor(tmp_path: Path) -> None:
    _toy_checkpoint(tmp_path / "hf")
    mapping = dict(_MAPPING)
    mapping["model.norm.weight"] = ParamSource(("model.final_norm.weight",))
    with pytest.raises(UserError, match=r"^tensor model\.final_norm\.weight is missing"):
        convert_weights(
            tmp_path / "hf",
            tmp_path,
            _expected("float16", True),
            mapping,
            get_scheme("q0f16t"),
            progress=False,
        )


_EMBED = "model.embed_tokens.weight"


def _split_embedding(rows: list[tuple[int, int]]):
    """``_expected`` with the embedding in pieces of ``rows``, and those pieces."""
    names = [f"{_EMBED}.{i}" for i in range(len(rows))]
    expected = [
        (n, (stop - start, 32), "float32") for n, (start, stop) in zip(names, rows, strict=True)
    ]
    expected += _expected("float32", True)[1:]
    return expected, {n: TablePiece(_EMBED, r) for n, r in zip(names, rows, strict=True)}


def test_convert_writes_the_pieces_the_model_declares(tmp_path: Path) -> None:
    """Each piece of a split table holds the rows the model gave it (uneven on purpose:
    the converter must not re-derive the split)."""
    hf = _toy_checkpoint(tmp_path / "hf")
    rows = [(0, 24), (24, 30), (30, 50)]
    expected, pieces = _split_embedding(rows)
    out = tmp_path / "bundle"
    out.mkdir()
    convert_weights(
        tmp_path / "hf",
        out,
        expected,
        _MAPPING,
        get_scheme("q0f32t"),
        progress=False,
        pieces=pieces,
    )
    got = load_tensor_cache(out)
    assert _EMBED not in got and f"{_EMBED}.3" not in got
    for i, (start, stop) in enumerate(rows):
        np.testing.assert_array_equal(got[f"{_EMBED}.{i}"], hf[_EMBED][start:stop])


def test_convert_refuses_a_table_of_another_vocabulary(tmp_path: Path) -> None:
    _toy_checkpoint(tmp_path / "hf")  # a 50-row embedding
    expected, pieces = _split_embedding([(0, 20), (20, 40), (40, 60)])
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(UserError) as err:
        convert_weights(
            tmp_path / "hf",
            out,
            expected,
            _MAPPING,
            get_scheme("q0f32t"),
            progress=False,
            pieces=pieces,
        )
    assert str(err.value) == (
        "weight model.embed_tokens.weight has shape [50, 32] but config.json implies 60 "
        "vocabulary rows; the checkpoint does not match its config.json"
    )
    assert list(out.iterdir()) == []


def test_convert_streams(tmp_path: Path) -> None:
    """Peak numpy memory stays near one tensor, far below the checkpoint size."""
    rows, cols = 1024, 2048  # 8 MiB per float32 tensor
    one = rows * cols * 4
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    rng = np.random.default_rng(0)
    names = [f"layer.{i}.weight" for i in range(8)]
    save_numpy(
        {n: rng.standard_normal((rows, cols), dtype=np.float32) for n in names},
        str(model_dir / "model.safetensors"),
    )
    expected = [(n, (cols, rows), "float16") for n in names]
    mapping = {n: ParamSource((n,), is_linear_weight=True) for n in names}
    out = tmp_path / "bundle"
    out.mkdir()

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        convert_weights(model_dir, out, expected, mapping, get_scheme("q0f16t"), progress=False)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()

    checkpoint_bytes = len(names) * one
    assert peak < 3 * one, f"peak {peak / MiB:.1f} MiB for {one / MiB:.0f} MiB tensors"
    assert peak < checkpoint_bytes / 2
    assert sum(s["nbytes"] for s in read_tensor_cache_json(out)["records"]) == len(names) * one // 2


def test_bits_per_param_counts_the_weights_a_packed_tensor_holds(tmp_path: Path) -> None:
    """A 4-bit layer: qweight's int32 words hold 8 weights each, scales and zero points
    none; BitsPerParam is the bundle's bytes per model weight (MLC-LLM's meaning)."""
    from mlc_edge.quantization.int4 import model_parameters

    k, n, group = 256, 64, 32
    parts = {
        "q.qweight": np.zeros((k, n // 8), np.int32),
        "q.qzeros": np.zeros((k // group, n // 8), np.int32),
        "q.scales": np.ones((k // group, n), np.float16),
    }
    with TensorCacheWriter(tmp_path) as writer:
        for name, arr in parts.items():
            writer.add(name, arr, params=model_parameters(name.rpartition(".")[2], arr.shape))
        meta = writer.finish()["metadata"]
    n_bytes = sum(a.nbytes for a in parts.values())
    assert meta["ParamSize"] == k * n and meta["ParamBytes"] == n_bytes
    # 4 bits a weight, plus per group of 32: a 16-bit scale and a 4-bit zero point.
    assert meta["BitsPerParam"] == pytest.approx(4 + (16 + 4) / group, abs=1e-3)
