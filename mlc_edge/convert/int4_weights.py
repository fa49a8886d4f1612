"""Converting a checkpoint for a 4-bit scheme (``q4f16t``, ``q4f16t-g128``, ``q4f32t``).

Every linear layer's bundle parameters are ``X.qweight``, ``X.qzeros`` and ``X.scales``
(``mlc_edge.quantization.int4``) where the family's weight map names one ``X.weight``:

- from an fp16/bf16/fp32 checkpoint, the weight (its fused parts) is read, quantized
  round-to-nearest and its three tensors written, one layer at a time: peak memory stays
  near one source tensor, as for the other schemes;
- from an AutoAWQ GEMM checkpoint (``mlc_edge.checkpoint.awq``) the parts' own
  ``qweight``/``qzeros``/``scales`` are concatenated along the output axis and written
  with their bits unchanged (the scales widened to fp32 for ``q4f32t``, exactly).

Every other parameter (embedding, norms, biases, the output layer, which stays in the
scheme's float dtype) goes through the same planning and checks as
``mlc_edge.convert.weights``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..checkpoint.awq import AWQFormat, check_scheme
from ..checkpoint.reader import Checkpoint
from ..errors import UserError
from ..models.base import ParamSource
from ..models.parameters import TablePiece
from ..quantization import WeightScheme
from ..quantization.int4 import PART_NAMES, Int4Layout, model_parameters, quantize_rtn
from .tensor_cache import TensorCacheWriter
from .weights import (
    _describe,
    _fmt,
    _fused_shape,
    _load_fused,
    _piece_rows,
    _plan,
    check_finite,
)


@dataclass(frozen=True)
class _Int4Linear:
    base: str  # bundle prefix: base + ".qweight" etc.
    hf_names: tuple[str, ...]  # the checkpoint's weights (".weight"), fused along out
    awq: bool  # the checkpoint holds them as AWQ qweight/qzeros/scales
    shapes: dict[str, tuple[int, ...]]
    source_bytes: int


def _awq_names(hf_weight: str) -> dict[str, str]:
    stem = hf_weight.removesuffix(".weight")
    return {part: f"{stem}.{part}" for part in PART_NAMES}


def _int4_bases(
    expected: list[tuple[str, tuple[int, ...], str]], mapping: dict[str, ParamSource]
) -> dict[str, dict[str, tuple[int, ...]]]:
    """Bundle prefixes of the 4-bit linear layers, with the three parts' shapes."""
    bases: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape, _ in expected:
        base, _, part = name.rpartition(".")
        source = mapping.get(f"{base}.weight")
        if part in PART_NAMES and source is not None and source.is_linear_weight:
            bases.setdefault(base, {})[part] = tuple(shape)
    return bases


def _plan_int4(
    ckpt: Checkpoint,
    base: str,
    shapes: dict[str, tuple[int, ...]],
    source: ParamSource,
    layout: Int4Layout,
    awq: AWQFormat | None,
) -> _Int4Linear:
    k, n = shapes["qweight"][0], shapes["scales"][1]
    hf_names = source.hf_names
    as_awq = [all(p in ckpt for p in _awq_names(h).values()) for h in hf_names]
    if awq is not None and any(as_awq):
        if not all(as_awq):
            raise UserError(
                f"{' + '.join(hf_names)} are fused into one layer but only some are AWQ "
                "qweight/qzeros/scales in the checkpoint; it cannot be stored in 4 bits as "
                "it is"
            )
        outs = 0
        nbytes = 0
        for h in hf_names:
            names = _awq_names(h)
            qw, qz, sc = (ckpt.shape(names[p]) for p in PART_NAMES)
            part_n = sc[1] if len(sc) == 2 else -1
            want = {
                "qweight": (k, part_n // 8),
                "qzeros": (k // layout.group_size, part_n // 8),
                "scales": (k // layout.group_size, part_n),
            }
            for part, have in zip(PART_NAMES, (qw, qz, sc), strict=True):
                if tuple(have) != want[part] or part_n % 8:
                    raise UserError(
                        f"AWQ tensor {names[part]} has shape {_fmt(tuple(have))} but "
                        f"config.json and group size {layout.group_size} imply "
                        f"{_fmt(want[part])}; the checkpoint does not match its config.json"
                    )
                if part != "scales" and ckpt.dtype(names[part]) != "int32":
                    raise UserError(
                        f"AWQ tensor {names[part]} is {ckpt.dtype(names[part])}, not int32; "
                        "it is not in AutoAWQ's GEMM format"
                    )
            outs += part_n
            nbytes += sum(ckpt.nbytes(names[p]) for p in PART_NAMES)
        if outs != n:
            raise UserError(
                f"AWQ layers {' + '.join(hf_names)} have {outs} outputs together but "
                f"config.json implies {n}; the checkpoint does not match its config.json"
            )
        return _Int4Linear(base, hf_names, True, shapes, nbytes)
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
    return _Int4Linear(base, hf_names, False, shapes, sum(ckpt.nbytes(h) for h in hf_names))


def _load_awq(ckpt: Checkpoint, hf_names: tuple[str, ...], dtype: str) -> dict[str, np.ndarray]:
    """The parts' AWQ tensors side by side along the output axis, bits unchanged."""
    out: dict[str, np.ndarray] = {}
    for part in PART_NAMES:
        arrays = [ckpt.load(_awq_names(h)[part]) for h in hf_names]
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
    awq: AWQFormat | None,
    progress: bool = True,
    allow_non_finite: bool = False,
    pieces: Mapping[str, TablePiece] | None = None,
) -> dict[str, Any]:
    """``mlc_edge.convert.weights.convert_weights`` for a 4-bit scheme."""
    layout = scheme.int4_layout
    if awq is not None:
        check_scheme(awq, scheme)
    assert layout is not None
    bases = _int4_bases(expected, mapping)
    parts = {f"{b}.{p}" for b in bases for p in PART_NAMES}
    plain = [e for e in expected if e[0] not in parts]
    with Checkpoint.open(Path(model_dir)) as ckpt:
        full, rows = _piece_rows(ckpt, plain, mapping, pieces or {})
        planned = {p.name: p for p in _plan(ckpt, plain, full, scheme, rows)}
        linears = {
            b: _plan_int4(ckpt, b, shapes, mapping[f"{b}.weight"], layout, awq)
            for b, shapes in bases.items()
        }
        total = sum(p.source_bytes for p in planned.values())
        total += sum(q.source_bytes for q in linears.values())
        held: dict[str, np.ndarray] = {}  # the parts of the current 4-bit layer
        table: tuple[tuple[str, ...], np.ndarray] | None = None  # a split table's tensor
        with (
            TensorCacheWriter(Path(out_dir)) as writer,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="converting weights",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for name, _, dtype in expected:
                if name in parts:
                    base, _, part = name.rpartition(".")
                    lin = linears[base]
                    if not held:
                        held = _int4_layer(ckpt, lin, layout, scheme.dtype, allow_non_finite)
                        bar.update(lin.source_bytes)
                    tensor = held.pop(part)
                    if tuple(tensor.shape) != lin.shapes[part] or str(tensor.dtype) != dtype:
                        raise ValueError(f"{name} converted to {tensor.dtype}{tensor.shape}")
                    writer.add(name, tensor, params=model_parameters(part, tensor.shape))
                    continue
                p = planned[name]
                src = p.source
                if p.rows is None:
                    table = None
                    tensor = _load_fused(ckpt, src.hf_names)
                else:
                    if table is None or table[0] != src.hf_names:
                        table = None
                        table = (src.hf_names, _load_fused(ckpt, src.hf_names))
                    tensor = table[1][p.rows[0] : p.rows[1]]
                with np.errstate(over="ignore"):
                    if src.is_linear_weight:
                        tensor = scheme.convert_linear_weight(tensor)
                    else:
                        tensor = scheme.convert_plain(tensor)
                if tuple(tensor.shape) != p.shape:
                    raise UserError(
                        f"{_describe(ckpt, src.hf_names)}, which converts to "
                        f"{_fmt(tuple(tensor.shape))}, but config.json implies "
                        f"{_fmt(p.shape)}; the checkpoint does not match its config.json"
                    )
                check_finite(p.name, src.hf_names, tensor, allow_non_finite)
                writer.add(p.name, tensor)
                del tensor
                bar.update(p.source_bytes)
            return writer.finish()


def _int4_layer(
    ckpt: Checkpoint, lin: _Int4Linear, layout: Int4Layout, dtype: str, allow_non_finite: bool
) -> dict[str, np.ndarray]:
    """The three stored tensors of one 4-bit layer."""
    if lin.awq:
        out = _load_awq(ckpt, lin.hf_names, dtype)
        check_finite(f"{lin.base}.scales", lin.hf_names, out["scales"], allow_non_finite)
        return out
    weight = _load_fused(ckpt, lin.hf_names)  # [out, in]
    check_finite(f"{lin.base}.weight", lin.hf_names, weight, allow_non_finite)
    with np.errstate(over="ignore", invalid="ignore"):
        out = quantize_rtn(weight.T, layout.group_size, dtype)
    del weight
    check_finite(f"{lin.base}.scales", lin.hf_names, out["scales"], allow_non_finite)
    return out
