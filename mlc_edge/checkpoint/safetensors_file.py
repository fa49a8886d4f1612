"""A small streaming reader of the safetensors format.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional
``"__metadata__"`` of strings), then the tensor bytes; offsets count from the end of the
header. Each tensor is read with one seek and one ``readinto`` into a fresh array, so
loading a tensor touches only its own bytes and the result does not pin the file.

We read the format ourselves rather than through the ``safetensors`` package so that a
truncated download is reported at open time, in one line, before any work is done.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..closable import Closable
from ..errors import UserError

# safetensors dtype -> (our dtype name, bytes per element, numpy dtype to read the raw
# bytes as). BF16 is read as uint16 and widened; float8 has no numpy dtype.
_DTYPES: dict[str, tuple[str, int, str | None]] = {
    "F64": ("float64", 8, "<f8"),
    "F32": ("float32", 4, "<f4"),
    "F16": ("float16", 2, "<f2"),
    "BF16": ("bfloat16", 2, "<u2"),
    "F8_E4M3": ("float8_e4m3fn", 1, None),
    "F8_E5M2": ("float8_e5m2", 1, None),
    "I64": ("int64", 8, "<i8"),
    "I32": ("int32", 4, "<i4"),
    "I16": ("int16", 2, "<i2"),
    "I8": ("int8", 1, "i1"),
    "U64": ("uint64", 8, "<u8"),
    "U32": ("uint32", 4, "<u4"),
    "U16": ("uint16", 2, "<u2"),
    "U8": ("uint8", 1, "u1"),
    "BOOL": ("bool", 1, "?"),
}

# The format caps the header at 100 MB; a larger length means a corrupt file, and
# checking it keeps us from trying to read gigabytes of "JSON".
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    st_dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> str:
        return _DTYPES[self.st_dtype][0] if self.st_dtype in _DTYPES else self.st_dtype

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32: bf16 is the top half of an f32."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place, so the widening costs one float32-sized array
    return wide.view(np.float32)


class SafetensorsFile(Closable):
    """One open ``.safetensors`` file; the header is read and checked on open."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # kept open until close()
        except OSError as err:
            raise UserError(f"cannot open {self.path}: {err.strerror}") from None
        try:
            self.metadata, self._tensors, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        where = str(self.path)
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise UserError(
                f"{where} is truncated: it holds {size} bytes, less than a safetensors "
                f"header; download it again"
            )
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise UserError(
                f"{where} is not a valid safetensors file (header length {header_len} "
                f"bytes); download it again"
            )
        if 8 + header_len > size:
            raise UserError(
                f"{where} is truncated: its header needs {8 + header_len} bytes but the "
                f"file holds {size}; download it again"
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _DuplicateName as dup:
            raise UserError(
                f"{where} is corrupt: its header names tensor {_show(dup.args[0])} twice; "
                f"download it again"
            ) from None
        # ValueError: a number too long to convert; RecursionError: nesting too deep.
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise UserError(
                f"{where} is not a valid safetensors file (its header is not JSON); "
                f"download it again"
            ) from None
        if not isinstance(header, dict):
            raise UserError(
                f"{where} is not a valid safetensors file (its header is not a JSON "
                f"object); download it again"
            )

        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            metadata = {}
        data_start = 8 + header_len
        data_size = size - data_start
        tensors: dict[str, TensorInfo] = {}
        data_end = 0
        for name, entry in header.items():
            info = _parse_entry(where, name, entry)
            tensors[name] = info
            data_end = max(data_end, info.end)
        if data_end > data_size:
            raise UserError(
                f"{where} is truncated: its header describes {data_end} bytes of tensor "
                f"data but the file holds {data_size}; download it again"
            )
        # Two tensors sharing bytes: one of them is not what the header says.
        previous: TensorInfo | None = None
        for info in sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.begin):
            if previous is not None and info.begin < previous.end:
                raise UserError(
                    f"{where} is corrupt: tensors {_show(previous.name)} and "
                    f"{_show(info.name)} overlap in the file; download it again"
                )
            previous = info
        return metadata, tensors, data_start

    # -- queries ------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{name} is not in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The stored dtype, e.g. ``"bfloat16"``."""
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def load(self, name: str) -> np.ndarray:
        """The tensor as a fresh array; bfloat16 comes back as float32."""
        info = self.info(name)
        np_dtype = _DTYPES[info.st_dtype][2] if info.st_dtype in _DTYPES else None
        if np_dtype is None:
            raise UserError(
                f"tensor {_show(name)} in {self.path} is stored as {_show(info.dtype)}, "
                f"which mlc-edge cannot read; use a checkpoint with float32, float16 or "
                f"bfloat16 weights"
            )
        out = np.empty(info.shape, dtype=np_dtype)
        view = out.reshape(-1).view(np.uint8)
        self._file.seek(self._data_start + info.begin)
        got = self._file.readinto(memoryview(view)) if info.nbytes else 0
        if got != info.nbytes:
            # The file shrank after open (e.g. a download still being written over).
            raise UserError(
                f"{self.path} is truncated: tensor {_show(name)} needs {info.nbytes} bytes but "
                f"only {got} could be read; download it again"
            )
        if info.st_dtype == "BF16":
            return bf16_bits_to_float32(out)
        if not out.dtype.isnative:
            out = out.astype(out.dtype.newbyteorder("="))
        return out

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        self._file.close()


class _DuplicateName(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object; a key given twice (json.loads would keep the last) is refused."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateName(key)
        out[key] = value
    return out


_SHOWN_CHARS = 120


def _show(text: object) -> str:
    """A name from the file, safe to print on one line: escaped if it holds control or
    unpaired-surrogate characters, cut if long."""
    text = str(text)
    if not text.isprintable():
        text = ascii(text)[1:-1]
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


# numpy arrays have at most 64 axes; a dimension must fit an int64.
_MAX_DIMS = 64
_MAX_DIM = (1 << 63) - 1


def _parse_entry(where: str, name: str, entry: object) -> TensorInfo:
    """Check one header entry; anything malformed means the file is corrupt."""

    def corrupt(why: str) -> UserError:
        return UserError(
            f"{where} is corrupt: tensor {_show(name)} {_show(why)}; download it again"
        )

    if not isinstance(entry, dict):
        raise corrupt("has no dtype/shape/data_offsets entry")
    st_dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(st_dtype, str):
        raise corrupt("has no dtype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise corrupt(f"has an invalid shape {shape!r}")
    if len(shape) > _MAX_DIMS or math.prod(d for d in shape if d) > _MAX_DIM:
        raise corrupt(
            f"has an impossible shape of {len(shape)} dimensions (numpy takes at most "
            f"{_MAX_DIMS} and 2**63 elements)"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise corrupt(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if st_dtype in _DTYPES:
        expected = math.prod(shape) * _DTYPES[st_dtype][1]
        if end - begin != expected:
            raise corrupt(
                f"has {end - begin} bytes of data but shape {shape} of {st_dtype} needs {expected}"
            )
    return TensorInfo(name, st_dtype, tuple(shape), begin, end)
