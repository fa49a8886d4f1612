"""Reading Hugging Face checkpoints: every layout, bf16, and damaged downloads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from mlc_edge.checkpoint.reader import Checkpoint
from mlc_edge.checkpoint.safetensors_file import SafetensorsFile
from mlc_edge.errors import UserError


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(8).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(np.float64),
        "position_ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "counts": np.arange(5, dtype=np.int32),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _assert_same(ckpt: Checkpoint, want: dict[str, np.ndarray]) -> None:
    assert sorted(ckpt.names()) == sorted(want)
    for name, arr in want.items():
        got = ckpt.load(name)
        assert got.dtype == arr.dtype, name
        assert ckpt.shape(name) == arr.shape
        assert ckpt.dtype(name) == str(arr.dtype)
        assert ckpt.nbytes(name) == arr.nbytes
        np.testing.assert_array_equal(got, arr)


def test_single_safetensors(tmp_path: Path) -> None:
    want = _tensors()
    save_numpy(want, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with Checkpoint.open(tmp_path) as ckpt:
        _assert_same(ckpt, want)
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        assert f.metadata == {"format": "pt"}


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    want = _tensors()
    names = list(want)
    shards = {
        "model-00001-of-00002.safetensors": names[:3],
        "model-00002-of-00002.safetensors": names[3:],
    }
    weight_map = {}
    for shard, members in shards.items():
        save_numpy({n: want[n] for n in members}, str(tmp_path / shard))
        weight_map.update({n: shard for n in members})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    with Checkpoint.open(tmp_path) as ckpt:
        _assert_same(ckpt, want)


def test_loose_safetensors_without_index(tmp_path: Path) -> None:
    want = _tensors()
    names = list(want)
    save_numpy({n: want[n] for n in names[:2]}, str(tmp_path / "a.safetensors"))
    save_numpy({n: want[n] for n in names[2:]}, str(tmp_path / "b.safetensors"))
    with Checkpoint.open(tmp_path) as ckpt:
        _assert_same(ckpt, want)


def test_pytorch_bin_single_and_sharded(tmp_path: Path) -> None:
    want = _tensors()
    single = tmp_path / "single"
    single.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in want.items()}, single / "pytorch_model.bin")
    with Checkpoint.open(single) as ckpt:
        _assert_same(ckpt, want)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(want)
    weight_map = {}
    for i, members in enumerate((names[:4], names[4:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: torch.from_numpy(want[n]) for n in members}, sharded / shard)
        weight_map.update({n: shard for n in members})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Checkpoint.open(sharded) as ckpt:
        _assert_same(ckpt, want)


def test_bfloat16_widens_exactly(tmp_path: Path) -> None:
    src = torch.randn(33, 17, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.0e38])
    tensors = {"w": src, "special": special.to(torch.bfloat16)}
    save_torch(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ckpt:
        for name, t in tensors.items():
            assert ckpt.dtype(name) == "bfloat16"
            assert ckpt.nbytes(name) == t.numel() * 2
            got = ckpt.load(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, t.float().numpy())
            # Bit-exact, not just numerically equal (-0.0 vs 0.0).
            assert got.tobytes() == t.float().numpy().tobytes()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(tensors, bin_dir / "pytorch_model.bin")
    with Checkpoint.open(bin_dir) as ckpt:
        assert ckpt.dtype("w") == "bfloat16"
        assert ckpt.nbytes("w") == src.numel() * 2
        np.testing.assert_array_equal(ckpt.load("w"), src.float().numpy())


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_numpy(_tensors(), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated") as err:
        Checkpoint.open(tmp_path)
    assert "download it again" in str(err.value)
    assert "\n" not in str(err.value)

    # Cut inside the header, and below the 8-byte length.
    path.write_bytes(data[:20])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(tmp_path)


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    header = b"{not json"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(UserError, match=r"model\.safetensors is not a valid safetensors"):
        Checkpoint.open(tmp_path)

    # Offsets that disagree with shape x itemsize.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(UserError, match=r"model\.safetensors is corrupt: tensor w"):
        Checkpoint.open(tmp_path)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^no weights in .*pytorch_model\*\.bin$"):
        Checkpoint.open(tmp_path)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    want = _tensors()
    save_numpy({"counts": want["counts"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "counts": "model-00001-of-00002.safetensors",
                    "scalar": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with pytest.raises(UserError, match=r"model-00002-of-00002\.safetensors.*missing"):
        Checkpoint.open(tmp_path)


def test_index_names_tensor_absent_from_shard(tmp_path: Path) -> None:
    save_numpy({"a": np.zeros(2, np.float32)}, str(tmp_path / "model-1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors"}})
    )
    with pytest.raises(UserError, match=r"tensor b is in model-1\.safetensors, but it is not"):
        Checkpoint.open(tmp_path)


def test_truncated_pytorch_bin(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1000)}, tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"pytorch_model\.bin cannot be read"):
        Checkpoint.open(tmp_path)


def test_unknown_tensor_is_user_error(tmp_path: Path) -> None:
    save_numpy({"a": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ckpt, pytest.raises(UserError, match="tensor b is not"):
        ckpt.load("b")
