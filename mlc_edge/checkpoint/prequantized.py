"""Which pre-quantized checkpoints mlc-edge takes as they are: AutoAWQ's GEMM format, and
GPTQ without act-order.

A checkpoint quantized by AutoAWQ says so in ``config.json``::

    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                            "zero_point": true, "version": "gemm"}

Its linear layers are ``X.qweight`` int32 ``[in, out/8]``, ``X.qzeros`` int32
``[in/g, out/8]`` and ``X.scales`` fp16 ``[in/g, out]`` in exactly the layout of our
4-bit schemes (``mlc_edge.quantization.int4``), so they are copied bit for bit.

A GPTQ checkpoint (AutoGPTQ / GPTQModel)::

    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                            "desc_act": false, "sym": true, "checkpoint_format": "gptq"}

has the same three tensors, but ``qweight`` packs 8 *rows* a word, ``[in/8, out]`` (value
of row ``8i + j`` in bits ``4j .. 4j + 3`` of word ``i``), and ``qzeros`` packs 8 columns a
word in plain order (column ``8w + j`` in bits ``4j ..``); format ``gptq`` (v1) stores
each zero point minus one, ``gptq_v2`` stores it as it is. Weight ``(q - z) * s``, as
ours. Its values are repacked into our layout (integers moved, nothing rounded: the same
numbers), scales copied. With act-order the rows of a group are scattered (``g_idx``), so
the groups are not runs of ``in``: refused, as is every other kind, in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..quantization import WeightScheme


@dataclass(frozen=True)
class PrequantizedFormat:
    """A pre-quantized checkpoint's 4-bit format: ``method`` "awq" or "gptq", its group
    size along ``in``, and for GPTQ what to add to a stored zero point (1 in format v1)."""

    method: str
    group_size: int
    zero_offset: int = 0

    @property
    def label(self) -> str:
        return self.method.upper()


def read_quantization(hf_config: dict[str, Any]) -> PrequantizedFormat | None:
    """The checkpoint's 4-bit format; None for a checkpoint that is not pre-quantized.

    Raises UserError for a quantized checkpoint we cannot take as it is.
    """
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise UserError("config.json's quantization_config is not a JSON object; fix it")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _read_gptq(qc)
    if method != "awq":
        raise UserError(
            f"quantization_config.quant_method '{method or '?'}' is not supported (only "
            "'awq', GEMM version, and 'gptq' without act-order); convert the original "
            "fp16/bf16 checkpoint instead"
        )
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise UserError(
            f"AWQ version '{version}' is not supported (only 'gemm': qweight [in, out/8]); "
            "re-export the model with AutoAWQ's GEMM version or convert the original "
            "checkpoint with --quantization q4f16t"
        )
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise UserError(f"AWQ checkpoints with {bits}-bit weights are not supported (only 4)")
    if not qc.get("zero_point", True):
        raise UserError("AWQ checkpoints without zero points (zero_point: false) are not supported")
    # (modules_to_not_convert need no list: conversion takes a layer as packed only where
    # the checkpoint holds its qweight/qzeros/scales, else from its float weight)
    return PrequantizedFormat("awq", _group_size(qc, "AWQ"))


def _read_gptq(qc: dict[str, Any]) -> PrequantizedFormat:
    if qc.get("desc_act"):
        raise UserError(
            "GPTQ checkpoints with act-order (desc_act) are not supported (their groups are "
            "not runs of rows); convert the original fp16/bf16 checkpoint with "
            "--quantization q4f16t"
        )
    bits = qc.get("bits", 4)
    if bits != 4:
        raise UserError(f"GPTQ checkpoints with {bits}-bit weights are not supported (only 4)")
    if qc.get("lm_head"):
        raise UserError(
            "GPTQ checkpoints with a quantized output layer (lm_head: true) are not supported"
        )
    form = str(qc.get("checkpoint_format", "gptq")).lower()
    if qc.get("is_marlin_format") or form not in ("gptq", "gptq_v2"):
        shown = "marlin" if qc.get("is_marlin_format") else form
        raise UserError(
            f"GPTQ checkpoint_format '{shown}' is not supported (only 'gptq' and "
            "'gptq_v2'); re-export it in the gptq format or convert the original checkpoint"
        )
    return PrequantizedFormat(
        "gptq", _group_size(qc, "GPTQ"), zero_offset=1 if form == "gptq" else 0
    )


def _group_size(qc: dict[str, Any], label: str) -> int:
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise UserError(
            f"{label} group_size {group!r} is not supported (a positive group size along the "
            "input dimension is required; -1, one group per column, is not)"
        )
    return group


def read_checkpoint_quantization(model_dir: Path) -> PrequantizedFormat | None:
    """``read_quantization`` of the ``config.json`` in ``model_dir``; None without one."""
    path = Path(model_dir) / "config.json"
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # reading the config is the model spec's job; it reports it
    return read_quantization(hf_config) if isinstance(hf_config, dict) else None


def require_scheme_for(
    hf_config: dict[str, Any], scheme: WeightScheme
) -> PrequantizedFormat | None:
    """The checkpoint's 4-bit format, after checking that ``scheme`` can store it as it
    is: one line naming the scheme to use otherwise. Called when the model spec is made, so
    ``gen-config``/``convert``/``compile`` refuse before any work."""
    form = read_quantization(hf_config)
    if form is not None:
        check_scheme(form, scheme)
    return form


def check_scheme(form: PrequantizedFormat, scheme: WeightScheme) -> None:
    """One line unless ``scheme`` stores ``form``'s tensors as they are."""
    fits = {32: "q4f16t", 128: "q4f16t-g128"}.get(form.group_size)
    layout = scheme.int4_layout
    if layout is None:
        use = f"use --quantization {fits}" if fits else "no scheme of ours has its group size"
        raise UserError(
            f"the checkpoint is {form.label}-quantized (4-bit, groups of {form.group_size}) "
            f"and cannot be stored as {scheme.name}: {use}"
        )
    if layout.group_size != form.group_size:
        hint = f"use --quantization {fits}" if fits else "no 4-bit scheme of ours has it"
        raise UserError(
            f"the {form.label} checkpoint's group size is {form.group_size} but "
            f"{scheme.name} uses {layout.group_size}; {hint}"
        )
