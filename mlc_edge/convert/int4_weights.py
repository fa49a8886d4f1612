"""Converting a checkpoint for a 4-bit scheme (``q4f16t``, ``q4f16t-g128``, ``q4f32t``).

Every linear layer's bundle parameters are ``X.qweight``, ``X.qzeros`` and ``X.scales``
(``mlc_edge.quantization.int4``) where the family's weight map names one ``X.weight``:

- from an fp16/bf16/fp32 checkpoint, the weight (its fused parts) is read, quantized
  round-to-nearest and its three tensors written, one layer at a time: peak memory stays
  near one source tensor, as for the other schemes;
- from an AutoAWQ GEMM checkpoint (``mlc_edge.checkpoint.prequantized``) the parts' own
  ``qweight``/``qzeros``/``scales`` are concatenated along the output axis and written
  with their bits unchanged (the scales widened to fp32 for ``q4f32t``, exactly);
- from a GPTQ checkpoint without act-order, the same, but the parts' 4-bit values and
  zero points are unpacked from GPTQ's packing and packed in ours (the same integers; a
  v1 zero point gets its 1 back), scales unchanged;
- from a GGUF whose weight is Q4_0 (blocks of 32 along the input axis, value
  ``(q - 8) * d``), for the group-32 schemes: the blocks' nibbles and fp16 scales are
  repacked with their values unchanged (zero points all 8), so the stored layer
  dequantizes to exactly what llama.cpp's blocks hold. Other GGUF block types (Q4_1,
  whose ``q * d + m`` has a zero point -m/d that is not an integer in general, K-quants)
  and Q4_0 for ``q4f16t-g128`` are dequantized and re-quantized round-to-nearest, with a
  notice.

The output layer is one of these layers for a scheme with ``int4_head`` (all but the
``-hf`` ones; for a tied model its source is the embedding table,
``mlc_edge.models.parameters.weight_sources``): AWQ and GPTQ checkpoints keep it in fp16,
so it is quantized round-to-nearest, with a notice; a GGUF's Q4_0
``output.weight`` (or ``token_embd.weight``) is repacked as above. A split output layer
is quantized whole and written piece by piece.

For a CPU that reads them in tiles (``Int4Layout.tiles``) each ``qweight`` is written so,
the same words reordered, whatever its source.

Every other parameter (embedding, norms, biases, the output layer of the other schemes,
in the scheme's float dtype) goes through the same planning and checks as
``mlc_edge.convert.weights``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.gguf_file import Q4_0_BLOCK, Q4_0_ZERO
from ..checkpoint.prequantized import PrequantizedFormat, check_scheme
from ..checkpoint.reader import Checkpoint
from ..errors import UserError
from ..models.base import ParamSource
from ..models.parameters import TablePiece
from ..quantization import WeightScheme
from ..quantization.int4 import (
    PART_NAMES,
    Int4Layout,
    model_parameters,
    pack_int4,
    quantize_rtn,
    qweight_rows,
    tile_qweight,
)
from .weights import (
    PlannedReader,
    _describe,
    _fmt,
    _fused_shape,
    _load_fused,
    _piece_rows,
    _plan,
    check_finite,
    converting,
)


@dataclass(frozen=True)
class _Int4Linear:
    base: str  # bundle prefix: base + ".qweight" etc.
    hf_names: tuple[str, ...]  # the checkpoint's weights (".weight"), fused along out
    # the checkpoint holds them as qweight/qzeros/scales in this format (AWQ, GPTQ)
    prequantized: PrequantizedFormat | None
    shapes: dict[str, tuple[int, ...]]
    source_bytes: int
    gguf_q4_0: bool = False  # the GGUF holds them as Q4_0 blocks of our group size


def _packed_names(hf_weight: str) -> dict[str, str]:
    stem = hf_weight.removesuffix(".weight")
    return {part: f"{stem}.{part}" for part in PART_NAMES}


@dataclass(frozen=True)
class _StoredPart:
    """One bundle parameter of a 4-bit layer: its layer's prefix, which of the three
    tensors, and for a piece of a split output layer its columns (vocabulary rows)."""

    base: str
    part: str
    columns: tuple[int, int] | None = None


def _int4_parts(
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    pieces: Mapping[str, TablePiece],
    layout: Int4Layout,
) -> tuple[dict[str, _StoredPart], dict[str, dict[str, tuple[int, int]]]]:
    """The bundle parameters that are parts of 4-bit linear layers, and each layer's whole
    shapes (a split output layer is quantized whole and written piece by piece: the
    groups run along its input axis, so a piece's tensors are the whole's columns)."""
    parts: dict[str, _StoredPart] = {}
    sizes: dict[str, list[int]] = {}  # base -> [in, out]
    for name, shape, _ in expected:
        piece = pieces.get(name)
        base, _, part = (piece.table if piece is not None else name).rpartition(".")
        source = mapping.get(f"{base}.weight")
        if part not in PART_NAMES or source is None or not source.is_linear_weight:
            continue
        parts[name] = _StoredPart(base, part, piece.rows if piece is not None else None)
        size = sizes.setdefault(base, [0, 0])
        if part == "qweight":
            size[0] = qweight_rows(shape)
        if part == "scales":
            size[1] = max(size[1], piece.rows[1] if piece is not None else shape[1])
    return parts, {base: layout.shapes(k, n) for base, (k, n) in sizes.items()}


def _columns(tensor: np.ndarray, part: str, columns: tuple[int, int] | None) -> np.ndarray:
    """Output columns ``[start, stop)`` of a stored part (qweight/qzeros pack 8 a word)."""
    if columns is None:
        return tensor
    per_column = 1 if part == "scales" else 8
    return np.ascontiguousarray(tensor[:, columns[0] // per_column : columns[1] // per_column])


def _plan_int4(
    ckpt: Checkpoint,
    base: str,
    shapes: dict[str, tuple[int, ...]],
    source: ParamSource,
    layout: Int4Layout,
    packed: PrequantizedFormat | None,
) -> _Int4Linear:
    k, n = qweight_rows(shapes["qweight"]), shapes["scales"][1]
    hf_names = source.hf_names
    as_packed = [all(p in ckpt for p in _packed_names(h).values()) for h in hf_names]
    if packed is not None and any(as_packed):
        label = packed.label
        if not all(as_packed):
            raise UserError(
                f"{' + '.join(hf_names)} are fused into one layer but only some are {label} "
                "qweight/qzeros/scales in the checkpoint; it cannot be stored in 4 bits as "
                "it is"
            )
        outs = 0
        nbytes = 0
        for h in hf_names:
            names = _packed_names(h)
            qw, qz, sc = (ckpt.shape(names[p]) for p in PART_NAMES)
            part_n = sc[1] if len(sc) == 2 else -1
            want = {
                "qweight": (k // 8, part_n) if packed.method == "gptq" else (k, part_n // 8),
                "qzeros": (k // layout.group_size, part_n // 8),
                "scales": (k // layout.group_size, part_n),
            }
            for part, have in zip(PART_NAMES, (qw, qz, sc), strict=True):
                if tuple(have) != want[part] or part_n % 8:
                    raise UserError(
                        f"{label} tensor {names[part]} has shape {_fmt(tuple(have))} but "
                        f"config.json and group size {layout.group_size} imply "
                        f"{_fmt(want[part])}; the checkpoint does not match its config.json"
                    )
                if part != "scales" and ckpt.dtype(names[part]) != "int32":
                    raise UserError(
                        f"{label} tensor {names[part]} is {ckpt.dtype(names[part])}, not "
                        "int32; it is not in the format its config.json names"
                    )
            if packed.method == "gptq":
                _check_gptq_layer(ckpt, h, k, packed)
            outs += part_n
            nbytes += sum(ckpt.nbytes(names[p]) for p in PART_NAMES)
        if outs != n:
            raise UserError(
                f"{label} layers {' + '.join(hf_names)} have {outs} outputs together but "
                f"config.json implies {n}; the checkpoint does not match its config.json"
            )
        return _Int4Linear(base, hf_names, packed, shapes, nbytes)
    missing = [h for h in hf_names if h not in ckpt]
    if missing:
        raise UserError(
            f"tensor {missing[0]} is missing from the checkpoint in {ckpt.model_dir} (needed "
            f"for {base}.qweight); the checkpoint does not match its config.json or is "
            "incomplete"
        )
    have = _fused_shape(ckpt, hf_names)
    if have != (n, k):
        raise UserError(
            f"{_describe(ckpt, hf_names)} but config.json implies {_fmt((n, k))}; the "
            "checkpoint does not match its config.json"
        )
    nbytes = sum(ckpt.nbytes(h) for h in hf_names)
    q4_0 = layout.group_size == Q4_0_BLOCK and all(_gguf_type(ckpt, h) == "Q4_0" for h in hf_names)
    return _Int4Linear(base, hf_names, None, shapes, nbytes, gguf_q4_0=q4_0)


def _gguf_type(ckpt: Checkpoint, hf_name: str) -> str | None:
    """The GGUF block type of a tensor (e.g. "Q4_0"), None outside a GGUF."""
    f = ckpt.gguf_file(hf_name)
    return None if f is None else f.stored_type(hf_name)


def _requantized_notice(ckpt: Checkpoint, linears: dict[str, _Int4Linear], scheme: str) -> None:
    """One line when block-quantized GGUF weights go through float and round-to-nearest
    (their 4-bit values are not kept): which types, how many layers."""
    types: dict[str, int] = {}
    for lin in linears.values():
        if lin.gguf_q4_0 or lin.prequantized:
            continue
        kinds = {_gguf_type(ckpt, h) for h in lin.hf_names} - {None, "F32", "F16", "BF16"}
        for kind in kinds:
            types[kind] = types.get(kind, 0) + 1
    if types:
        listed = ", ".join(f"{n} {k}" for k, n in sorted(types.items()))
        print(
            f"note: GGUF weights ({listed} layers) are dequantized and re-quantized "
            f"round-to-nearest for {scheme}; only Q4_0 maps to it directly (the group-32 schemes)",
            file=sys.stderr,
        )


def _load_gguf_q4_0(
    ckpt: Checkpoint, hf_names: tuple[str, ...], dtype: str
) -> dict[str, np.ndarray]:
    """The parts' Q4_0 blocks as our three tensors: values and scales unchanged,
    transposed to ``[in, out]``, zero points 8 (Q4_0's value is ``(q - 8) * d``)."""
    qs, ds = [], []
    for h in hf_names:
        f = ckpt.gguf_file(h)
        assert f is not None
        q, d = f.load_q4_0(h)
        qs.append(q)
        ds.append(d)
    q = qs[0] if len(qs) == 1 else np.concatenate(qs, axis=0)  # [out, in]
    d = ds[0] if len(ds) == 1 else np.concatenate(ds, axis=0)
    del qs, ds
    zeros = np.full((d.shape[1], d.shape[0]), Q4_0_ZERO, dtype=np.uint8)
    return {
        "qweight": pack_int4(q.T),
        "qzeros": pack_int4(zeros),
        "scales": np.ascontiguousarray(d.T, dtype=dtype),
    }


def _check_gptq_layer(ckpt: Checkpoint, hf_weight: str, k: int, form: PrequantizedFormat) -> None:
    """One line unless a GPTQ layer fits our layout: its ``g_idx`` (if stored) puts row
    ``i`` in group ``i // group`` (any other order is act-order, whose groups are not runs
    of rows), and no zero point is 16 (v1 stores 15 for it; 4 bits cannot hold 16)."""
    names = _packed_names(hf_weight)
    g_idx_name = f"{hf_weight.removesuffix('.weight')}.g_idx"
    if g_idx_name in ckpt:
        g_idx = ckpt.load(g_idx_name)
        if g_idx.shape != (k,) or not np.array_equal(g_idx, np.arange(k) // form.group_size):
            raise UserError(
                f"GPTQ tensor {g_idx_name} does not put row i in group i // "
                f"{form.group_size} (act-order); such checkpoints are not supported: convert "
                "the original fp16/bf16 checkpoint with --quantization q4f16t"
            )
    if form.zero_offset and (_gptq_zeros(ckpt.load(names["qzeros"])) == 15).any():
        raise UserError(
            f"GPTQ tensor {names['qzeros']} holds a zero point of 16 (stored 15 in format "
            "v1), which 4 bits cannot store; convert the original fp16/bf16 checkpoint"
        )


_SHIFTS = np.arange(0, 32, 4, dtype=np.int32)  # nibble j of a word: bits 4j .. 4j + 3


def _plain_nibbles(words: np.ndarray, axis: int) -> np.ndarray:
    """GPTQ's packing undone: uint8 ``words``' shape with 8 inserted at ``axis``, nibble
    ``j`` of each word (bits ``4j..``) at index ``j`` there. A nibble at a time: no int32
    copy 8x the words."""
    out = np.empty((*words.shape[:axis], 8, *words.shape[axis:]), dtype=np.uint8)
    nibbles = np.moveaxis(out, axis, -1)  # a view: writing it fills out
    for j, shift in enumerate(_SHIFTS):
        nibbles[..., j] = (words >> shift) & 15
    return out


def _gptq_zeros(words: np.ndarray) -> np.ndarray:
    """GPTQ's ``qzeros`` ``[in/g, out/8]`` as stored, uint8 ``[in/g, out]``."""
    return _plain_nibbles(words, 2).reshape(words.shape[0], -1)


def _gptq_as_ours(
    ckpt: Checkpoint, hf_weight: str, form: PrequantizedFormat
) -> dict[str, np.ndarray]:
    """One GPTQ layer's values and zero points repacked in our layout: GPTQ's ``qweight``
    ``[in/8, out]`` holds row ``8i + j`` in bits ``4j..`` of word ``i``, its ``qzeros``
    column ``8w + j`` in bits ``4j..`` of word ``w`` (module docstring of
    ``mlc_edge.checkpoint.prequantized``)."""
    names = _packed_names(hf_weight)
    words = ckpt.load(names["qweight"])  # [in/8, out]
    values = _plain_nibbles(words, 1).reshape(-1, words.shape[1])  # [in, out]: row 8i + j
    del words
    # (_check_gptq_layer has refused a v1 zero point that would become 16)
    zeros = _gptq_zeros(ckpt.load(names["qzeros"])) + np.uint8(form.zero_offset)
    return {"qweight": pack_int4(values), "qzeros": pack_int4(zeros)}


def _load_prequantized(
    ckpt: Checkpoint, hf_names: tuple[str, ...], form: PrequantizedFormat, dtype: str
) -> dict[str, np.ndarray]:
    """The parts' tensors side by side along the output axis: AWQ's bits unchanged,
    GPTQ's values repacked (``_gptq_as_ours``); scales unchanged."""
    gptq = [_gptq_as_ours(ckpt, h, form) for h in hf_names] if form.method == "gptq" else None
    out: dict[str, np.ndarray] = {}
    for part in PART_NAMES:
        if gptq is not None and part != "scales":
            arrays = [layer[part] for layer in gptq]
        else:
            arrays = [ckpt.load(_packed_names(h)[part]) for h in hf_names]
        joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
        del arrays
        out[part] = np.ascontiguousarray(joined, dtype=dtype if part == "scales" else np.int32)
    return out


def convert_int4_weights(
    model_dir: Path,
    out_dir: Path,
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    scheme: WeightScheme,
    packed: PrequantizedFormat | None,
    progress: bool = True,
    allow_non_finite: bool = False,
    pieces: Mapping[str, TablePiece] | None = None,
) -> dict[str, Any]:
    """``mlc_edge.convert.weights.convert_weights`` for a 4-bit scheme."""
    layout = scheme.int4_layout
    if packed is not None:
        check_scheme(packed, scheme)
    assert layout is not None
    parts, bases = _int4_parts(expected, mapping, pieces or {}, layout)
    plain = [e for e in expected if e[0] not in parts]
    with Checkpoint.open(Path(model_dir)) as ckpt:
        full, rows = _piece_rows(ckpt, plain, mapping, pieces or {})
        planned = {p.name: p for p in _plan(ckpt, plain, full, scheme, rows)}
        linears = {
            b: _plan_int4(ckpt, b, shapes, mapping[f"{b}.weight"], layout, packed)
            for b, shapes in bases.items()
        }
        _requantized_notice(ckpt, linears, scheme.name)
        if packed is not None and scheme.int4_head:
            print(
                f"note: the {packed.label} checkpoint's output layer is in float; {scheme.name} "
                f"quantizes it round-to-nearest, so the logits are no longer exactly the "
                f"checkpoint's; --quantization {scheme.name}-hf keeps it",
                file=sys.stderr,
            )
        total = sum(p.source_bytes for p in planned.values())
        total += sum(q.source_bytes for q in linears.values())
        # The tensors of the 4-bit layer(s) being written, until their last part is: one
        # layer at a time, as the parts of a layer (and the pieces of a split output
        # layer) follow one another in the load order.
        held: dict[str, dict[str, np.ndarray]] = {}
        unwritten = Counter(stored.base for stored in parts.values())
        reader = PlannedReader(ckpt, scheme, allow_non_finite)
        with converting(Path(out_dir), total, progress) as (writer, bar):
            for name, shape, dtype in expected:
                stored = parts.get(name)
                if stored is not None:
                    lin = linears[stored.base]
                    if stored.base not in held:
                        held[stored.base] = _int4_layer(
                            ckpt, lin, layout, scheme.dtype, allow_non_finite
                        )
                        bar.update(lin.source_bytes)
                    tensor = _columns(held[stored.base][stored.part], stored.part, stored.columns)
                    if stored.part == "qweight" and len(shape) == 3:  # the CPU's tiles
                        tensor = tile_qweight(tensor, layout.group_size)
                    unwritten[stored.base] -= 1
                    if not unwritten[stored.base]:
                        del held[stored.base]
                    if tuple(tensor.shape) != tuple(shape) or str(tensor.dtype) != dtype:
                        raise ValueError(f"{name} converted to {tensor.dtype}{tensor.shape}")
                    writer.add(name, tensor, params=model_parameters(stored.part, tensor.shape))
                    continue
                p = planned[name]
                writer.add(name, reader.convert(p))
                bar.update(p.source_bytes)
            return writer.finish()


def _int4_layer(
    ckpt: Checkpoint, lin: _Int4Linear, layout: Int4Layout, dtype: str, allow_non_finite: bool
) -> dict[str, np.ndarray]:
    """The three stored tensors of one 4-bit layer."""
    if lin.prequantized is not None:
        out = _load_prequantized(ckpt, lin.hf_names, lin.prequantized, dtype)
        check_finite(f"{lin.base}.scales", lin.hf_names, out["scales"], allow_non_finite)
        return out
    if lin.gguf_q4_0:
        out = _load_gguf_q4_0(ckpt, lin.hf_names, dtype)
        check_finite(f"{lin.base}.scales", lin.hf_names, out["scales"], allow_non_finite)
        return out
    weight = _load_fused(ckpt, lin.hf_names)  # [out, in]
    check_finite(f"{lin.base}.weight", lin.hf_names, weight, allow_non_finite)
    with np.errstate(over="ignore", invalid="ignore"):
        out = quantize_rtn(weight.T, layout.group_size, dtype)
    del weight
    check_finite(f"{lin.base}.scales", lin.hf_names, out["scales"], allow_non_finite)
    return out
