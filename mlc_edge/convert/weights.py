"""Convert a Hugging Face checkpoint into a bundle's tensor cache, one parameter at a time.

Every name and shape is checked against what config.json implies before any tensor is
read, so a wrong checkpoint fails in a second instead of halfway through a 10 GB
conversion. Then each bundle parameter is loaded (its fused parts written into one
preallocated array), converted by the weight scheme and streamed to disk, so peak memory
stays near one source tensor whatever the model size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..checkpoint.reader import Checkpoint
from ..errors import UserError
from ..models.base import ParamSource
from ..quantization.schemes import WeightScheme
from .tensor_cache import TensorCacheWriter


@dataclass(frozen=True)
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: str
    source: ParamSource
    source_bytes: int


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class _Layout:
    """How a scheme maps an HF tensor's shape to the stored one, learned from a probe.

    Schemes only expose conversion functions; converting a tiny array tells us whether
    they keep or transpose the shape, and the dtype they produce, without touching weights.
    """

    def __init__(self, scheme: WeightScheme) -> None:
        probe = np.zeros((2, 3), dtype=np.float32)
        linear = scheme.convert_linear_weight(probe)
        plain = scheme.convert_plain(probe)
        self.linear_transposes = linear.shape == (3, 2)
        self.linear_keeps = linear.shape == (2, 3)
        self.plain_keeps = plain.shape == (2, 3)
        self.linear_dtype = str(linear.dtype)
        self.plain_dtype = str(plain.dtype)

    def hf_shape(self, expected: tuple[int, ...], is_linear: bool) -> tuple[int, ...] | None:
        """The checkpoint shape a stored shape implies, or None if we cannot tell."""
        if not is_linear:
            return expected if self.plain_keeps else None
        if self.linear_transposes:
            return tuple(reversed(expected))
        return expected if self.linear_keeps else None

    def dtype(self, is_linear: bool) -> str:
        return self.linear_dtype if is_linear else self.plain_dtype


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


def _plan(
    ckpt: Checkpoint,
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    layout: _Layout,
) -> list[_Planned]:
    """Check every name and shape from the headers alone; no tensor data is read."""
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
        want = layout.hf_shape(shape, is_linear)
        if want is not None and _fused_shape(ckpt, source.hf_names) != want:
            raise UserError(
                f"{_describe(ckpt, source.hf_names)} but config.json implies {_fmt(want)}; "
                f"the checkpoint does not match its config.json"
            )
        if layout.dtype(is_linear) != dtype:
            # The model and the scheme disagree: a bug in mlc-edge, not in the input.
            raise ValueError(
                f"parameter {name} is declared {dtype} but scheme produces "
                f"{layout.dtype(is_linear)}"
            )
        nbytes = sum(ckpt.nbytes(n) for n in source.hf_names)
        plan.append(_Planned(name, shape, dtype, source, nbytes))
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


def convert_weights(
    model_dir: Path,
    out_dir: Path,
    expected: list[tuple[str, tuple[int, ...], str]],
    mapping: dict[str, ParamSource],
    scheme: WeightScheme,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``tensor-cache.json`` and shards for ``expected`` into ``out_dir``.

    ``expected`` lists (bundle name, shape, dtype) in the order the runtime loads them;
    ``mapping`` says which checkpoint tensors make each one. Returns the json written.
    """
    layout = _Layout(scheme)
    with Checkpoint.open(Path(model_dir)) as ckpt:
        plan = _plan(ckpt, expected, mapping, layout)
        total = sum(p.source_bytes for p in plan)
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
            for p in plan:
                src = p.source
                tensor = _load_fused(ckpt, src.hf_names)
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
                if str(tensor.dtype) != p.dtype:
                    raise ValueError(
                        f"parameter {p.name} converted to {tensor.dtype}, expected {p.dtype}"
                    )
                writer.add(p.name, tensor)
                del tensor
                bar.update(p.source_bytes)
            return writer.finish()
