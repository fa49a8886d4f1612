"""The bundle's parameters as the model definition declares them.

Which parameters a model has (names, shapes and dtypes, in the order the runtime loads
them) and which vocabulary rows each piece of a split table holds (``vocab.py``) are facts
of the model: the weight converter, the bundle's weight check and the compiler read them
here, so converting weights does not load the compiler.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvm.relax.frontend import nn
from tvm.target import Target

from .decoder import DecoderLM
from .vocab import VocabEmbedding, VocabHead, piece_ranges, split_parameter

if TYPE_CHECKING:
    from ..config import ModelSpec


@dataclass(frozen=True)
class TablePiece:
    """One piece of a table split along the vocabulary (``vocab.py``)."""

    table: str  # the whole table's parameter name, as the checkpoint's weight map knows it
    rows: tuple[int, int]  # [start, stop): its rows of the Hugging Face tensor


def instantiate(spec: ModelSpec, target: Target | None = None) -> DecoderLM:
    """The model definition ``spec`` describes, for ``target`` (the host CPU's when None:
    the parameters do not depend on the target)."""
    model = spec.family.model_class(spec.config, spec.scheme, target or Target({"kind": "llvm"}))
    model.to(spec.scheme.dtype)
    return model


def parameter_list(spec: ModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """The bundle's parameters in load order: (name, shape, dtype)."""
    model = instantiate(spec)
    return [(n, tuple(int(d) for d in p.shape), p.dtype) for n, p in model.named_parameters()]


def table_pieces(spec: ModelSpec) -> dict[str, TablePiece]:
    """Each parameter that is a piece of a split table (``P.i`` of ``P``), by name, with
    its table and its vocabulary rows; empty when no table is split."""
    model = instantiate(spec)
    rows_of: dict[int, tuple[int, int]] = {}
    for table in _vocab_tables(model):
        if len(table.pieces) > 1:
            for param, rows in zip(table.weight, piece_ranges(table.pieces), strict=True):
                rows_of[id(param)] = rows
    pieces = {}
    for name, param in model.named_parameters():
        split = split_parameter(name)
        if id(param) in rows_of and split is not None:
            pieces[name] = TablePiece(split[0], rows_of[id(param)])
    return pieces


def _vocab_tables(module: nn.Module) -> Iterator[VocabEmbedding | VocabHead]:
    for item in vars(module).values():
        if isinstance(item, VocabEmbedding | VocabHead):
            yield item
        elif isinstance(item, nn.ModuleList):
            for sub in item:
                yield from _vocab_tables(sub)
        elif isinstance(item, nn.Module):
            yield from _vocab_tables(item)
