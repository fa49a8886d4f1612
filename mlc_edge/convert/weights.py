"""Convert a Hugging Face checkpoint into a bundle's tensor cache, one parameter at a time.

Every name and shape is checked against what config.json implies before any tensor is
read, so a wrong checkpoint fails in a second instead of halfway through a 10 GB
conversion. Then each bundle parameter is loaded (its fused parts written into one
preallocated array), converted by the weight scheme and streamed to disk, so peak memory
stays near one source tensor whatever the model size. A table the model holds in pieces
(``P.0``, ``P.1``, ... of ``P``: an embedding / output layer split to fit the device's
largest buffer, ``mlc_edge.models.vocab``) is read once and written piece by piece, each
piece the rows the model declares for it (``mlc_edge.models.parameters.table_pieces``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..checkpoint.prequantized import read_checkpoint_quantization
from ..checkpoint.reader import Checkpoint
from ..errors import UserError
from ..models.base import ParamSource
from ..models.parameters import TablePiece
from ..quantization.schemes import WeightScheme
from .tensor_cache import TensorCacheWriter


@dataclass(frozen=True)
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: str
    source: ParamSource
    source_bytes: int
    rows: tuple[int, int] | None = None  # a piece of a split table: its vocabulary rows


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fused_shape(ckpt: Checkpoint, hf_names: tuple[str, ...]) -> tuple[int, ...]:
    shapes = [ckpt.shape(n) for n in hf_names]
    first = shapes[0]
    for n, s in zip(hf_names[1:], shapes[1:], strict=True):
        if len(s) != len(first) or len(s) == 0 or s[1:] != first[1:]:
            raise UserError(
                f"weights {hf_names[0]} {_fmt(first)} and {n} {_fmt(s)} cannot be fused: "
                f"their shapes differ past the first axis; the checkpoint does not match "
                f"its config.json"
            )
    if len(shapes) == 1:
        return first
    return (sum(s[0] for s in shapes), *first[1:])


def _describe(ckpt: Checkpoint, hf_names: tuple[str, ...]) -> str:
    if len(hf_names) == 1:
        return f"weight {hf_names[0]} has shape {_fmt(ckpt.shape(hf_names[0]))}"
    parts = " + ".join(f"{n} {_fmt(ckpt.shape(n))}" for n in hf_names)
    return f"weights {parts} have fused shape {_fmt(_fused_shape(ckpt, hf_names))}"


def _piece_rows(
    ckpt: Checkpoint,
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    pieces: Mapping[str, TablePiece],
) -> tuple[dict[str, ParamSource], dict[str, tuple[int, int]]]:
    """The mapping with an entry for each piece of a split table (its table's source),
    and each piece's rows of the checkpoint tensor, as the model declared them.

    The pieces of a table together cover the vocabulary config.json gives; a checkpoint
    tensor with another number of rows does not match it.
    """
    full = dict(mapping)
    rows: dict[str, tuple[int, int]] = {}
    vocab: dict[str, int] = {}  # split table -> the rows its pieces cover
    for name, _, _ in expected:
        piece = pieces.get(name)
        if piece is None or name in mapping or piece.table not in mapping:
            continue
        full[name] = mapping[piece.table]
        rows[name] = piece.rows
        vocab[piece.table] = max(vocab.get(piece.table, 0), piece.rows[1])
    for table, declared in vocab.items():
        hf_names = mapping[table].hf_names
        if any(hf not in ckpt for hf in hf_names):
            continue  # reported as missing by _plan
        have = _fused_shape(ckpt, hf_names)
        if not have or have[0] != declared:
            raise UserError(
                f"{_describe(ckpt, hf_names)} but config.json implies {declared} vocabulary "
                f"rows; the checkpoint does not match its config.json"
            )
    return full, rows


def _plan(
    ckpt: Checkpoint,
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    scheme: WeightScheme,
    rows: dict[str, tuple[int, int]] | None = None,
) -> list[_Planned]:
    """Check every name and shape from the headers alone; no tensor data is read.

    ``rows`` gives the pieces of split tables their rows of the checkpoint tensor.
    """
    rows = rows or {}
    missing = [
        (hf, name)
        for name, _, _ in expected
        if name in mapping
        for hf in mapping[name].hf_names
        if hf not in ckpt
    ]
    if missing:
        hf, name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"tensor {hf}{more} is missing from the checkpoint in {ckpt.model_dir} (needed "
            f"for {name}); the checkpoint does not match its config.json or is incomplete"
        )

    plan: list[_Planned] = []
    for name, shape, dtype in expected:
        source = mapping.get(name)
        if source is None or not source.hf_names:
            raise ValueError(f"the model declares parameter {name} but maps no tensor to it")
        shape = tuple(shape)
        is_linear = source.is_linear_weight
        want = scheme.hf_shape(shape, is_linear)
        have = _fused_shape(ckpt, source.hf_names)
        piece = rows.get(name)
        if piece is not None:
            have = (piece[1] - piece[0], *have[1:])
        if have != want:
            raise UserError(
                f"{_describe(ckpt, source.hf_names)} but config.json implies {_fmt(want)}; "
                f"the checkpoint does not match its config.json"
            )
        if scheme.dtype != dtype:
            # The model and the scheme disagree: a bug in mlc-edge, not in the input.
            raise ValueError(
                f"parameter {name} is declared {dtype} but scheme produces {scheme.dtype}"
            )
        nbytes = sum(ckpt.nbytes(n) for n in source.hf_names)
        if piece is not None:
            nbytes = nbytes * (piece[1] - piece[0]) // _fused_shape(ckpt, source.hf_names)[0]
        plan.append(_Planned(name, shape, dtype, source, nbytes, piece))
    return plan


def _load_fused(ckpt: Checkpoint, hf_names: tuple[str, ...]) -> np.ndarray:
    """Load and concatenate along axis 0, holding the result plus one part at a time."""
    if len(hf_names) == 1:
        return ckpt.load(hf_names[0])
    out: np.ndarray | None = None
    row = 0
    for n in hf_names:
        part = ckpt.load(n)
        if out is None:
            shape = _fused_shape(ckpt, hf_names)
            out = np.empty(shape, dtype=part.dtype)
        out[row : row + part.shape[0]] = part
        row += part.shape[0]
        del part
    assert out is not None
    return out


def check_finite(name: str, hf_names: tuple[str, ...], tensor: np.ndarray, allow: bool) -> None:
    """NaN or Inf in a weight: an error naming the tensor, or with ``allow`` a warning.

    Every tensor passes through here anyway, so the check costs one pass over it. It
    runs on the converted tensor, so a value beyond fp16's range (now Inf) is caught too.
    """
    if tensor.dtype.kind != "f" or np.isfinite(tensor).all():
        return
    nan = int(np.isnan(tensor).sum())
    inf = int(tensor.size - nan - np.isfinite(tensor).sum())
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(tensor))[0])
    source = " + ".join(hf_names)
    what = (
        f"weight {source} holds {nan} NaN and {inf} Inf values (first at "
        f"{list(first)} of {name} as stored, {tensor.dtype})"
    )
    if allow:
        print(
            f"warning: {what}; converted anyway (--allow-non-finite)", file=sys.stderr, flush=True
        )
        return
    raise UserError(
        f"{what}; the checkpoint is damaged or overflows "
        f"{tensor.dtype}: download it again, or pass --allow-non-finite to "
        "convert it anyway"
    )


@contextmanager
def converting(
    out_dir: Path, total: int, progress: bool
) -> Iterator[tuple[TensorCacheWriter, tqdm]]:
    """The tensor cache being written and its progress bar (bytes of the checkpoint read)."""
    with (
        TensorCacheWriter(out_dir) as writer,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="converting weights",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        yield writer, bar


class PlannedReader:
    """Reads and converts planned parameters one at a time, checking each against what
    config.json implies. The pieces of a split table follow one another: its tensor is
    read once and released when the next tensor is read."""

    def __init__(self, ckpt: Checkpoint, scheme: WeightScheme, allow_non_finite: bool):
        self.ckpt = ckpt
        self.scheme = scheme
        self.allow_non_finite = allow_non_finite
        self._table: tuple[tuple[str, ...], np.ndarray] | None = None

    def convert(self, p: _Planned) -> np.ndarray:
        ckpt, src = self.ckpt, p.source
        if p.rows is None:
            self._table = None
            tensor = _load_fused(ckpt, src.hf_names)
        else:
            if self._table is None or self._table[0] != src.hf_names:
                self._table = None  # release the previous table before reading the next
                self._table = (src.hf_names, _load_fused(ckpt, src.hf_names))
            tensor = self._table[1][p.rows[0] : p.rows[1]]
        # A value beyond the scheme's range becomes Inf: check_finite names it.
        with np.errstate(over="ignore"):
            if src.is_linear_weight:
                tensor = self.scheme.convert_linear_weight(tensor)
            else:
                tensor = self.scheme.convert_plain(tensor)
        if tuple(tensor.shape) != p.shape:
            raise UserError(
                f"{_describe(ckpt, src.hf_names)}, which converts to "
                f"{_fmt(tuple(tensor.shape))}, but config.json implies "
                f"{_fmt(p.shape)}; the checkpoint does not match its config.json"
            )
        if str(tensor.dtype) != p.dtype:
            raise ValueError(f"parameter {p.name} converted to {tensor.dtype}, expected {p.dtype}")
        check_finite(p.name, src.hf_names, tensor, self.allow_non_finite)
        return tensor


def convert_weights(
    model_dir: Path,
    out_dir: Path,
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    scheme: WeightScheme,
    progress: bool = True,
    allow_non_finite: bool = False,
    pieces: Mapping[str, TablePiece] | None = None,
) -> dict[str, Any]:
    """Write ``tensor-cache.json`` and shards for ``expected`` into ``out_dir``.

    ``expected`` lists (bundle name, shape, dtype) in the order the runtime loads them;
    ``mapping`` says which checkpoint tensors make each one; ``pieces`` gives each piece
    of a split table its table and rows (``mlc_edge.models.parameters.table_pieces``).
    Returns the json written. A NaN or Inf in a weight is refused unless
    ``allow_non_finite`` (then a warning).
    """
    packed = read_checkpoint_quantization(Path(model_dir))
    if scheme.int4_layout is not None or packed is not None:
        from .int4_weights import convert_int4_weights  # imports this module's helpers

        return convert_int4_weights(
            model_dir,
            out_dir,
            expected,
            mapping,
            scheme,
            packed,
            progress,
            allow_non_finite,
            pieces,
        )
    with Checkpoint.open(Path(model_dir)) as ckpt:
        mapping, rows = _piece_rows(ckpt, expected, mapping, pieces or {})
        plan = _plan(ckpt, expected, mapping, scheme, rows)
        total = sum(p.source_bytes for p in plan)
        with converting(Path(out_dir), total, progress) as (writer, bar):
            reader = PlannedReader(ckpt, scheme, allow_non_finite)
            for p in plan:
                writer.add(p.name, reader.convert(p))
                bar.update(p.source_bytes)
            return writer.finish()
