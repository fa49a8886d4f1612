"""The embedding table and the output layer, split along the vocabulary when one buffer
cannot hold them.

OpenCL caps one buffer at CL_DEVICE_MAX_MEM_ALLOC_SIZE (1024 MiB on Adreno): Qwen2-7B's
fp16 ``152064 x 3584`` table is 1039.5 MiB. ``vocab_pieces`` is the one place that decides
the split; the model definition (these modules), the weight conversion and the memory
plan all follow it. A split table is an ``nn.ParameterList``, so piece ``i`` of the
parameter ``P`` is named ``P.i`` (``model.embed_tokens.weight.0``, ``lm_head.weight.1``)
and holds the vocabulary rows ``[start_i, start_i + rows_i)`` of the Hugging Face tensor.

- Embedding: one kernel reads each token's row from the piece that holds it (indices
  clamped into every piece), equal to ``take`` on the whole table.
- Output layer: the logits of each piece, concatenated along the vocabulary.
"""

from __future__ import annotations

import math
import re

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..quantization import WeightScheme

# Piece sizes are whole multiples of the largest of these that fits: rows in multiples of
# 128 keep every piece on the matmul/GEMV kernels' tile sizes (no ragged tiles but the last).
_ROW_ALIGNMENTS = (128, 64, 32, 16, 8, 1)
_PIECE = re.compile(r"^(?P<base>.+)\.(?P<index>\d+)$")


def vocab_pieces(
    vocab_size: int, hidden_size: int, dtype: str, max_alloc_bytes: int | None
) -> tuple[int, ...]:
    """Rows of each piece of a ``[vocab, hidden]`` table so that every piece fits in
    ``max_alloc_bytes``: ``(vocab_size,)`` (no split) when the table fits, when there is
    no limit, or when not even one row fits (the allocation guard then names the table).

    Pieces are as few as possible and of equal size but the last.
    """
    row_bytes = hidden_size * np.dtype(dtype).itemsize
    if max_alloc_bytes is None or vocab_size * row_bytes <= max_alloc_bytes:
        return (vocab_size,)
    max_rows = max_alloc_bytes // row_bytes
    if max_rows < 1:
        return (vocab_size,)
    rows = math.ceil(vocab_size / math.ceil(vocab_size / max_rows))
    for align in _ROW_ALIGNMENTS:
        aligned = math.ceil(rows / align) * align
        if aligned <= max_rows:
            rows = aligned
            break
    count = math.ceil(vocab_size / rows)
    return (rows,) * (count - 1) + (vocab_size - rows * (count - 1),)


def piece_ranges(pieces: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[start, stop)`` vocabulary rows of each piece."""
    stops = np.cumsum(pieces).tolist()
    return [(stop - rows, stop) for rows, stop in zip(pieces, stops, strict=True)]


def split_parameter(name: str) -> tuple[str, int] | None:
    """``(name of the whole parameter, piece index)`` of a piece's name, else None."""
    match = _PIECE.match(name)
    return (match["base"], int(match["index"])) if match else None


def scheme_pieces(vocab_size: int, hidden_size: int, scheme: WeightScheme) -> tuple[int, ...]:
    """The split of a table stored by ``scheme`` (its dtype, its device's allocation limit)."""
    return vocab_pieces(vocab_size, hidden_size, scheme.dtype, scheme.max_alloc_bytes)


class VocabEmbedding(nn.Module):
    """``[vocab, hidden]`` token embedding; ``weight`` is a parameter, or a ParameterList
    of pieces along the vocabulary when the scheme's allocation limit requires it."""

    def __init__(self, vocab_size: int, hidden_size: int, scheme: WeightScheme):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.pieces = scheme_pieces(vocab_size, hidden_size, scheme)
        if len(self.pieces) == 1:
            self.weight = nn.Parameter((vocab_size, hidden_size), scheme.dtype)
        else:
            self.weight = nn.ParameterList(
                [nn.Parameter((rows, hidden_size), scheme.dtype) for rows in self.pieces]
            )

    @property
    def tables(self) -> list[nn.Parameter]:
        return [self.weight] if len(self.pieces) == 1 else list(self.weight)

    def split_tables(self) -> list[nn.ParameterList]:
        """The split table (its pieces in vocabulary order); empty when not split."""
        return [] if len(self.pieces) == 1 else [self.weight]

    def forward(self, input_ids: Tensor) -> Tensor:  # [s] int32 -> [s, hidden]
        if len(self.pieces) == 1:
            return op.take(self.weight, input_ids, axis=0)
        ranges = piece_ranges(self.pieces)

        def split_take(ids: te.Tensor, *tables: te.Tensor) -> te.Tensor:
            def row(i: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
                token = ids[i]
                value = None
                # From the last piece back: the first piece whose stop exceeds the token.
                for table, (start, stop) in reversed(list(zip(tables, ranges, strict=True))):
                    # Clamped into the piece, so no branch can read out of bounds.
                    local = tirx.max(tirx.min(token - start, stop - start - 1), 0)
                    here = table[local, j]
                    value = here if value is None else tirx.if_then_else(token < stop, here, value)
                return value

            return te.compute((ids.shape[0], self.hidden_size), row, name="split_take")

        return op.tensor_expr_op(split_take, "split_take", args=[input_ids, *self.weight])

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output layer: ``hidden @ table.T``, piece by piece (the transpose fuses
        into each matmul)."""
        parts = [op.matmul(hidden, op.permute_dims(t)) for t in self.tables]
        return parts[0] if len(parts) == 1 else op.concat(parts, dim=-1)


class VocabHead(nn.Module):
    """The output layer ``hidden -> vocab`` as the scheme's ``head_linear`` stores it
    (``weight`` in its float layout, or 4-bit ``qweight``/``qzeros``/``scales``); split
    into pieces of the vocabulary (``weight.i``, or ``qweight.i``, ``qzeros.i``,
    ``scales.i``) like ``VocabEmbedding``. The bias, a ``[vocab]`` vector, is never split.

    The pieces are sized for a table in the scheme's float dtype: a 4-bit piece (about a
    quarter of those bytes) fits with room to spare. Its rows are a multiple of 128 (so of
    the 8 columns a 32-bit word packs) wherever a piece holds 128 rows; a scheme's layer
    check refuses, in one line, a piece that is not a multiple of 8.
    """

    def __init__(self, hidden_size: int, vocab_size: int, scheme: WeightScheme, bias: bool):
        self.pieces = scheme_pieces(vocab_size, hidden_size, scheme)
        # The scheme's own linear modules give each piece its layout and matmul; only
        # their parameters are registered, as this module's, under their own names.
        self._linears = tuple(scheme.head_linear(hidden_size, rows) for rows in self.pieces)
        self._part_names = tuple(n for n, _ in self._linears[0].named_parameters())
        for part in self._part_names:
            params = [dict(lin.named_parameters())[part] for lin in self._linears]
            setattr(self, part, params[0] if len(params) == 1 else nn.ParameterList(params))
        self.bias = nn.Parameter((vocab_size,), scheme.dtype) if bias else None

    def split_tables(self) -> list[nn.ParameterList]:
        """Each split parameter (its pieces in vocabulary order); empty when not split."""
        if len(self.pieces) == 1:
            return []
        return [getattr(self, part) for part in self._part_names]

    def to(self, dtype: str | None = None) -> None:
        # Each piece's module knows which of its tensors take the model's dtype (a 4-bit
        # layer's integer tensors stay int32).
        for lin in self._linears:
            lin.to(dtype)
        if self.bias is not None:
            self.bias.to(dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        parts = [lin(hidden) for lin in self._linears]
        logits = parts[0] if len(parts) == 1 else op.concat(parts, dim=-1)
        return logits + self.bias if self.bias is not None else logits
