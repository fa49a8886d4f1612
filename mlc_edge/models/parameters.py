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

from .base import ParamSource
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
        for split in table.split_tables():
            for param, rows in zip(split, piece_ranges(table.pieces), strict=True):
                rows_of[id(param)] = rows
    pieces = {}
    for name, param in model.named_parameters():
        split = split_parameter(name)
        if id(param) in rows_of and split is not None:
            pieces[name] = TablePiece(split[0], rows_of[id(param)])
    return pieces


# The output layer of every family, and the embedding table a tied one is made from.
LM_HEAD = "lm_head"
EMBEDDING_TABLE = "model.embed_tokens.weight"


def weight_sources(spec: ModelSpec) -> dict[str, ParamSource]:
    """Where each bundle parameter comes from in the checkpoint: the family's weight map,
    and for a tied model whose scheme stores the output layer apart in 4 bits
    (``int4_head``), that layer from the embedding table ``[vocab, hidden]``, read as the
    ``[out, in]`` weight of a linear layer (transformers' tied ``lm_head.weight`` is it)."""
    mapping = dict(spec.family.weight_map(spec.config))
    if spec.scheme.int4_head and spec.config.tie_word_embeddings:
        table = mapping[EMBEDDING_TABLE].hf_names
        mapping[f"{LM_HEAD}.weight"] = ParamSource(table, is_linear_weight=True)
    return mapping


def _vocab_tables(module: nn.Module) -> Iterator[VocabEmbedding | VocabHead]:
    for item in vars(module).values():
        if isinstance(item, VocabEmbedding | VocabHead):
            yield item
        elif isinstance(item, nn.ModuleList):
            for sub in item:
                yield from _vocab_tables(sub)
        elif isinstance(item, nn.Module):
            yield from _vocab_tables(item)
