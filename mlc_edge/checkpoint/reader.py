"""Read the weights of a Hugging Face model folder, one tensor at a time.

``Checkpoint.open`` understands the layouts the Hub uses: a single
``model.safetensors``, shards listed by ``model.safetensors.index.json``, loose
``*.safetensors`` files, and the older ``pytorch_model*.bin`` (single or indexed).
Shapes and dtypes are known without reading any tensor data, so callers can check a
whole checkpoint against its config before converting anything.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..closable import Closable
from ..errors import UserError
from .gguf_file import GGUF_SUFFIX, GGUFFile
from .safetensors_file import SafetensorsFile

_ST_INDEX = "model.safetensors.index.json"
_ST_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"


class _BinFile:
    """A ``pytorch_model*.bin`` loaded with torch, memory-mapped where torch can."""

    def __init__(self, path: Path) -> None:
        torch = _import_torch(path)
        self._bfloat16 = torch.bfloat16
        self.path = path
        try:
            # torch warns (on stderr) about pickle protocols it cannot check; the
            # refusal below is the one line the user needs.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise UserError(_bin_unreadable(path, err)) from None
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err2:  # any failure means a bad file
                raise UserError(_bin_unreadable(path, err2)) from None
        except Exception as err:  # pickle/zip errors vary by damage
            raise UserError(_bin_unreadable(path, err)) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(
                f"{path} does not hold a state dict of tensors; save the model with "
                f"save_pretrained or convert it to safetensors"
            )
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        return str(self._tensors[name].dtype).removeprefix("torch.")

    def nbytes(self, name: str) -> int:
        t = self._tensors[name]
        return t.numel() * t.element_size()

    def load(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if t.dtype == self._bfloat16:
            # numpy has no bfloat16; widening one tensor at a time keeps memory flat.
            t = t.float()
        try:
            return t.numpy()
        except (TypeError, RuntimeError) as err:
            raise UserError(
                f"tensor {name} in {self.path} is stored as {self.dtype(name)}, which "
                f"mlc-edge cannot read ({err}); convert the checkpoint to safetensors"
            ) from None

    def close(self) -> None:
        self._tensors = {}


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch checkpoint and reading it needs torch: "
            f"pip install torch==2.13.0, or convert the checkpoint to safetensors"
        ) from None
    return torch


def _bin_unreadable(path: Path, err: BaseException) -> str:
    if "Weights only load failed" in str(err):
        # A pickle that names a callable (os.system, ...): it would run code on load.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        return (
            f"{path} holds Python objects other than tensors{what}, which would run "
            "code if loaded; mlc-edge loads only tensors from .bin files: use the "
            "model's safetensors files or re-save it with save_pretrained"
        )
    # torch's messages run to several sentences; the first names the damage.
    why = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
    return f"{path} cannot be read ({why}); it may be truncated or corrupt: download it again"


_File = SafetensorsFile | _BinFile | GGUFFile


class Checkpoint(Closable):
    """All weight files of one model folder, seen as one name -> tensor mapping."""

    def __init__(self, model_dir: Path, files: list[_File]) -> None:
        self.model_dir = model_dir
        self._files = files
        self._where: dict[str, _File] = {}
        for f in files:
            for name in f.names():
                other = self._where.get(name)
                if other is not None:
                    self.close()
                    raise UserError(
                        f"tensor {name} is in both {other.path.name} and {f.path.name} in "
                        f"{model_dir}; remove the weight files that do not belong to the model"
                    )
                self._where[name] = f

    @classmethod
    def open(cls, model_dir: Path) -> Checkpoint:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            what = "is not a folder" if model_dir.exists() else "does not exist"
            raise UserError(
                f"{model_dir} {what}; pass the folder holding the model's config.json and weights"
            )
        if (model_dir / _ST_INDEX).is_file():
            return cls._open_indexed(model_dir, _ST_INDEX, SafetensorsFile)
        if (model_dir / _ST_SINGLE).is_file():
            return cls._open_files(model_dir, [model_dir / _ST_SINGLE], SafetensorsFile)
        loose = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
        if loose:
            return cls._open_files(model_dir, loose, SafetensorsFile)
        if (model_dir / _BIN_INDEX).is_file():
            return cls._open_indexed(model_dir, _BIN_INDEX, _BinFile)
        bins = sorted(p for p in model_dir.glob("pytorch_model*.bin") if p.is_file())
        if bins:
            return cls._open_files(model_dir, bins, _BinFile)
        # A folder prepared from a GGUF (checkpoint/gguf_file.py) links to the one file.
        ggufs = sorted(p for p in model_dir.glob(f"*{GGUF_SUFFIX}") if p.is_file())
        if len(ggufs) == 1:
            return cls._open_files(model_dir, ggufs, GGUFFile)
        raise UserError(
            f"no weights in {model_dir}: expected model.safetensors, model-*.safetensors "
            f"with model.safetensors.index.json, or pytorch_model*.bin"
        )

    @classmethod
    def _open_files(cls, model_dir: Path, paths: list[Path], kind: type[_File]) -> Checkpoint:
        files: list[_File] = []
        try:
            for p in paths:
                files.append(kind(p))
        except BaseException:
            for f in files:
                f.close()
            raise
        return cls(model_dir, files)

    @classmethod
    def _open_indexed(cls, model_dir: Path, index_name: str, kind: type[_File]) -> Checkpoint:
        index_path = model_dir / index_name
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{index_path} is not a valid index (no JSON weight_map); download it again"
            ) from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise UserError(
                    f"{index_name} lists shard {shard}, which is missing from {model_dir}; "
                    f"download it"
                )
        ckpt = cls._open_files(model_dir, [model_dir / s for s in shards], kind)
        # The index is only a hint; a name it promises but its shard lacks means the
        # files come from different downloads.
        for name, shard in weight_map.items():
            f = ckpt._where.get(name)
            if f is None or f.path.name != Path(shard).name:
                ckpt.close()
                raise UserError(
                    f"{index_name} says tensor {name} is in {shard}, but it is not; "
                    f"download the checkpoint again"
                )
        return ckpt

    # -- queries ------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> _File:
        try:
            return self._where[name]
        except KeyError:
            raise UserError(
                f"tensor {name} is not in the checkpoint in {self.model_dir}; the checkpoint "
                f"does not match its config.json or is incomplete"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> str:
        """The dtype the checkpoint stores, e.g. ``"bfloat16"``."""
        return self._file(name).dtype(name)

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes in the checkpoint (not after widening bf16)."""
        return self._file(name).nbytes(name)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def load(self, name: str) -> np.ndarray:
        """The tensor as numpy: float32 for bfloat16, the stored dtype otherwise."""
        return self._file(name).load(name)

    def gguf_file(self, name: str) -> GGUFFile | None:
        """The GGUF file holding ``name`` (for its block-quantized bits), or None."""
        f = self._file(name)
        return f if isinstance(f, GGUFFile) else None

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        for f in self._files:
            f.close()
