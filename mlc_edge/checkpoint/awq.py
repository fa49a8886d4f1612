"""Which pre-quantized checkpoints mlc-edge takes as they are: AutoAWQ's GEMM format.

A checkpoint quantized by AutoAWQ says so in ``config.json``::

    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                            "zero_point": true, "version": "gemm"}

Its linear layers are ``X.qweight`` int32 ``[in, out/8]``, ``X.qzeros`` int32
``[in/g, out/8]`` and ``X.scales`` fp16 ``[in/g, out]`` in exactly the layout of our
4-bit schemes (``mlc_edge.quantization.int4``), so they are copied bit for bit. Every
other kind of pre-quantized checkpoint is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..quantization import WeightScheme


@dataclass(frozen=True)
class AWQFormat:
    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()


def read_quantization(hf_config: dict[str, Any]) -> AWQFormat | None:
    """The checkpoint's AWQ format; None for a checkpoint that is not pre-quantized.

    Raises UserError for a quantized checkpoint we cannot take as it is.
    """
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise UserError("config.json's quantization_config is not a JSON object; fix it")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        act_order = " with act-order (desc_act)" if qc.get("desc_act") else ""
        raise UserError(
            f"GPTQ checkpoints{act_order} are not supported (only AutoAWQ's GEMM format is "
            "taken as it is); convert the original fp16/bf16 checkpoint with --quantization "
            "q4f16t"
        )
    if method != "awq":
        raise UserError(
            f"quantization_config.quant_method '{method or '?'}' is not supported (only "
            "'awq', GEMM version); convert the original fp16/bf16 checkpoint instead"
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
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise UserError(
            f"AWQ group_size {group!r} is not supported (a positive group size along the "
            "input dimension is required; -1, one group per column, is not)"
        )
    skip = tuple(str(m) for m in qc.get("modules_to_not_convert") or ())
    return AWQFormat(group_size=group, modules_to_not_convert=skip)


def read_checkpoint_quantization(model_dir: Path) -> AWQFormat | None:
    """``read_quantization`` of the ``config.json`` in ``model_dir``; None without one."""
    path = Path(model_dir) / "config.json"
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # reading the config is the model spec's job; it reports it
    return read_quantization(hf_config) if isinstance(hf_config, dict) else None


def require_scheme_for(hf_config: dict[str, Any], scheme: WeightScheme) -> AWQFormat | None:
    """The checkpoint's AWQ format, after checking that ``scheme`` can store it as it is:
    one line naming the scheme to use otherwise. Called when the model spec is made, so
    ``gen-config``/``convert``/``compile`` refuse before any work."""
    awq = read_quantization(hf_config)
    if awq is not None:
        check_scheme(awq, scheme)
    return awq


def check_scheme(awq: AWQFormat, scheme: WeightScheme) -> None:
    """One line unless ``scheme`` stores ``awq``'s tensors as they are."""
    fits = {32: "q4f16t", 128: "q4f16t-g128"}.get(awq.group_size)
    layout = scheme.int4_layout
    if layout is None:
        use = f"use --quantization {fits}" if fits else "no scheme of ours has its group size"
        raise UserError(
            f"the checkpoint is AWQ-quantized (4-bit, groups of {awq.group_size}) and cannot "
            f"be stored as {scheme.name}: {use}"
        )
    if layout.group_size != awq.group_size:
        hint = f"use --quantization {fits}" if fits else "no 4-bit scheme of ours has it"
        raise UserError(
            f"the AWQ checkpoint's group size is {awq.group_size} but {scheme.name} uses "
            f"{layout.group_size}; {hint}"
        )
