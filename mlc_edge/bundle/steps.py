"""The three parts of a bundle, each written into a (staging) folder.

``mlc-edge gen-config``, ``convert`` and ``compile`` call these one at a time; the
all-in-one ``compile MODEL_DIR`` calls all three into one staging folder.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ModelSpec, load_preset, read_hf_config
from ..config.presets import PRESET_KEYS
from ..errors import UserError
from . import layout
from .chat_config import generate_chat_config


def resolve_spec(
    model_dir: Path, quantization: str, preset: str, overrides: dict[str, int | None]
) -> ModelSpec:
    """HF config + preset + per-value flags → what gets built."""
    sizes = load_preset(preset)
    sizes.update({k: v for k, v in overrides.items() if v is not None and k in PRESET_KEYS})
    spec = ModelSpec.create(read_hf_config(model_dir), quantization, sizes)
    warn_context_window(spec)
    return spec


def warn_context_window(spec: ModelSpec) -> None:
    """A context window longer than the positions the model was trained on works (RoPE
    has a value for every position) but the answers degrade past them: say so, once."""
    trained = spec.model_config.get("max_position_embeddings")
    window = spec.runtime_sizes["context_window_size"]
    if isinstance(trained, int) and window > trained:
        print(
            f"warning: context_window_size {window:,} exceeds the model's "
            f"max_position_embeddings {trained:,} (config.json): positions past "
            f"{trained:,} were never trained and output degrades there; use "
            f"--context-window-size {trained} or less unless the model is known to extend",
            file=sys.stderr,
            flush=True,
        )


def default_model_lib(model_dir: Path, spec: ModelSpec, target_name: str) -> str:
    """A C-identifier name: it prefixes the symbols of a system library."""
    raw = f"{Path(model_dir).absolute().name}_{spec.scheme.name}_{target_name}"
    return re.sub(r"[^0-9A-Za-z_]", "_", raw)


def write_chat_config(
    model_dir: Path, spec: ModelSpec, out: Path, conv_template: str | None
) -> dict[str, Any]:
    return generate_chat_config(model_dir, spec, out, conv_template)


def write_weights(
    model_dir: Path, spec: ModelSpec, out: Path, progress: bool, allow_non_finite: bool = False
) -> dict[str, Any]:
    from ..convert.weights import convert_weights
    from ..models.parameters import parameter_list, table_pieces, weight_sources

    mapping = weight_sources(spec)
    return convert_weights(
        Path(model_dir),
        out,
        parameter_list(spec),
        mapping,
        spec.scheme,
        progress=progress,
        allow_non_finite=allow_non_finite,
        pieces=table_pieces(spec),
    )


def weight_bytes(spec: ModelSpec) -> int:
    """Bytes of the bundle's converted weights, known before any is written."""
    import math

    import numpy as np

    from ..models.parameters import parameter_list

    return sum(
        math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in parameter_list(spec)
    )


def write_library(
    spec: ModelSpec, target_name: str, out: Path, model_lib: str, progress: bool
) -> tuple[Path, dict[str, Any]]:
    """Compile and export ``lib/<model_lib><suffix>``; returns its path and ``_metadata``."""
    from ..compiler.build import compile_model, export
    from ..compiler.targets import get_target

    target = get_target(target_name)
    start = time.perf_counter()
    if progress:
        print(f"compiling {model_lib} for {target.name} ...", file=sys.stderr, flush=True)
    executable, metadata = compile_model(spec, target, model_lib)
    path = layout.library_path(out, model_lib, target.lib_suffix)
    export(executable, path)
    target.check_library(path)
    write_build_record(path, target.name, target.device, str(target.tvm_target()), metadata)
    if progress:
        print(
            f"compiled in {time.perf_counter() - start:.1f} s: {path.relative_to(out)}",
            file=sys.stderr,
            flush=True,
        )
    return path, metadata


def write_build_record(
    library: Path, target: str, device: str, tvm_target: str, metadata: dict[str, Any] | None = None
) -> None:
    """``lib/<model_lib>.json`` beside the library: the target it was compiled for, so
    ``run``/``bench`` pick its device and refuse a library this machine cannot run, and its
    ``_metadata`` (read back by ``mlc-edge package``: a phone's library does not load here)."""
    record = {
        "model_lib": library.stem,
        "library": library.name,
        "target": target,
        "device": device,
        "tvm_target": tvm_target,
    }
    if metadata is not None:
        record["metadata"] = metadata
    layout.build_record_path(library).write_text(json.dumps(record, indent=2) + "\n")


def require_weights_match(spec: ModelSpec, out: Path) -> None:
    """A library compiled into a bundle must fit the weights already there."""
    from ..models.parameters import parameter_list
    from ..models.vocab import split_parameter

    if not layout.has_weights(out):
        return
    have = {r["name"]: (tuple(r["shape"]), r["dtype"]) for r in layout.tensor_records(out)}
    for name, shape, dtype in parameter_list(spec):
        if name not in have and split_parameter(name) is not None:
            raise UserError(
                f"the bundle's embedding/output layer are whole, but this target's largest "
                f"buffer ({spec.scheme.max_alloc_bytes:,} bytes) needs them in pieces "
                f"({name}): make the bundle for this target with `mlc-edge compile "
                f"MODEL_DIR --target ... -o BUNDLE`"
            )
        if have.get(name) != (shape, dtype):
            raise UserError(
                f"the bundle's weights do not fit this model ({name}: "
                f"{have.get(name)} vs {(shape, dtype)}); run `mlc-edge convert` again"
            )
