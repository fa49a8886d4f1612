"""Write and read MLC-LLM's weight format: ``tensor-cache.json`` + ``params_shard_*.bin``.

The runtime (TVM ``src/runtime/vm/tensor_cache_support.cc``) reads::

    {"metadata": {"ParamSize": n, "ParamBytes": b, "BitsPerParam": 8 * b / n},
     "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": N,
                  "md5sum": "...",
                  "records": [{"name": ..., "shape": [...], "dtype": "float16",
                               "format": "raw", "nbytes": ..., "byteOffset": ...}]}]}

``ParamSize`` is the model's parameter count (MLC-LLM's writer puts the number of tensors
there and divides by the source checkpoint's parameter count for ``BitsPerParam``; our
readers take ``ParamSize`` as parameters). A 4-bit layer's packed words count as the 8
weights each holds and its scales and zero points as none, so ``BitsPerParam`` is what the
bundle spends per weight of the model (about 4.5 for ``q4f16t``), as MLC-LLM reports it.

Tensors are appended to the current shard file as they arrive and the shard's md5 is
updated incrementally, so writing never holds more than the tensor being added.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..bundle.layout import TENSOR_CACHE as CACHE_JSON
from ..bundle.layout import read_tensor_cache as read_tensor_cache_json
from ..bundle.layout import shard_file_name
from ..checkpoint.safetensors_file import bf16_bits_to_float32
from ..closable import Closable
from ..errors import UserError


def _shard_name(index: int) -> str:
    return shard_file_name(index)


class TensorCacheWriter(Closable):
    """Streams named tensors into size-capped raw shards, in the order added."""

    def __init__(self, out_dir: Path, shard_bytes: int = 32 * 1024 * 1024) -> None:
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.out_dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self._shards: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._file: BinaryIO | None = None
        self._md5: Any = None
        self._param_count = 0
        self._param_bytes = 0
        self._finished = False

    def add(self, name: str, array: np.ndarray, params: int | None = None) -> None:
        """Append one tensor; it starts a new shard if it would overflow the current one.

        ``params``: how many of the model's parameters the tensor holds, when that is not
        its element count (a packed 4-bit weight, its scales and zero points).
        """
        if self._finished:
            raise RuntimeError("TensorCacheWriter.add after finish")
        if name in self._names:
            raise ValueError(f"tensor {name} added twice")
        array = np.asarray(array)
        if not array.dtype.isnative and array.dtype.byteorder != "|":
            array = array.astype(array.dtype.newbyteorder("="))
        # The runtime reads raw little-endian, C-order bytes.
        array = np.ascontiguousarray(array)
        nbytes = array.nbytes
        shard = self._shards[-1] if self._file is not None else None
        if shard is not None and shard["records"] and shard["nbytes"] + nbytes > self.shard_bytes:
            self._close_shard()
            shard = None
        if shard is None:
            shard = self._open_shard()
        shard["records"].append(
            {
                "name": name,
                "shape": [int(d) for d in array.shape],
                "dtype": str(array.dtype),
                "format": "raw",
                "nbytes": nbytes,
                "byteOffset": shard["nbytes"],
            }
        )
        if nbytes:
            raw = array.reshape(-1).view(np.uint8)  # a view: no copy of the tensor
            assert self._file is not None
            try:
                self._file.write(raw)
            except OSError as err:  # e.g. the disk is full: say which file
                err.filename = err.filename or self._file.name
                raise
            self._md5.update(raw)
        shard["nbytes"] += nbytes
        self._names.add(name)
        self._param_count += array.size if params is None else params
        self._param_bytes += nbytes

    def _open_shard(self) -> dict[str, Any]:
        shard: dict[str, Any] = {
            "dataPath": _shard_name(len(self._shards)),
            "format": "raw-shard",
            "nbytes": 0,
            "md5sum": "",
            "records": [],
        }
        self._file = open(self.out_dir / shard["dataPath"], "wb")
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._shards.append(shard)
        return shard

    def _close_shard(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()  # flushes: a full disk may show only here
        except OSError as err:
            err.filename = err.filename or self._file.name
            raise
        self._file = None
        self._shards[-1]["md5sum"] = self._md5.hexdigest()
        self._md5 = None

    def finish(self) -> dict[str, Any]:
        """Close the last shard, write ``tensor-cache.json`` and return its contents."""
        self._close_shard()
        self._finished = True
        bits = 8 * self._param_bytes / self._param_count if self._param_count else 0.0
        cache = {
            "metadata": {
                "ParamSize": self._param_count,
                "ParamBytes": self._param_bytes,
                "BitsPerParam": round(bits, 4),
            },
            "records": self._shards,
        }
        path = self.out_dir / CACHE_JSON
        try:
            path.write_text(json.dumps(cache, indent=2) + "\n")
        except OSError as err:
            err.filename = err.filename or str(path)
            raise
        return cache

    def close(self) -> None:
        """Release the open shard file without writing the json (used on errors)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def load_tensor_cache(bundle_dir: Path, verify_md5: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a bundle as numpy (bfloat16 widened to float32), sizes checked."""
    bundle_dir = Path(bundle_dir)
    cache = read_tensor_cache_json(bundle_dir)
    out: dict[str, np.ndarray] = {}
    for shard in cache["records"]:
        path = bundle_dir / shard["dataPath"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UserError(
                f"{path} cannot be read ({err.strerror}); convert the model again"
            ) from None
        if len(data) != shard["nbytes"]:
            raise UserError(
                f"{path} holds {len(data)} bytes but tensor-cache.json says {shard['nbytes']}; "
                f"convert the model again"
            )
        if verify_md5 and shard.get("md5sum"):
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != shard["md5sum"]:
                raise UserError(f"{path} fails its md5 check; convert the model again")
        for rec in shard["records"]:
            out[rec["name"]] = _decode_record(path, data, rec)
    return out


def _decode_record(path: Path, data: bytes, rec: dict[str, Any]) -> np.ndarray:
    name, shape, dtype = rec["name"], tuple(rec["shape"]), rec["dtype"]
    offset, nbytes = rec["byteOffset"], rec["nbytes"]
    # bf16 and f32-to-bf16 both store 2-byte bf16 bits; numpy has no bfloat16.
    stored = "uint16" if dtype == "bfloat16" or rec.get("format") == "f32-to-bf16" else dtype
    try:
        itemsize = np.dtype(stored).itemsize
    except TypeError:
        raise UserError(
            f"tensor {name} in {path} has dtype {dtype}, which numpy cannot read"
        ) from None
    if nbytes != math.prod(shape) * itemsize or offset + nbytes > len(data):
        raise UserError(
            f"tensor {name} in {path}: {nbytes} bytes at offset {offset} do not fit shape "
            f"{list(shape)} of {dtype} in a {len(data)}-byte shard; convert the model again"
        )
    little = np.dtype(stored).newbyteorder("<")
    arr = np.frombuffer(data, dtype=little, count=math.prod(shape), offset=offset)
    arr = arr.reshape(shape)
    if stored == "uint16" and dtype != "uint16":
        return bf16_bits_to_float32(arr)
    return arr.astype(arr.dtype.newbyteorder("="))
