"""The Android app's entry for a bundle: ``mlc-app-config.json``.

MLC's Android app lists its models in ``assets/mlc-app-config.json``
(``{"model_list": [{model_id, model_lib, model_url, estimated_vram_bytes}]}``, see
docs/runtime-contract.md). A phone bundle carries its own entry, ready to be merged into that
list. ``model_url`` is where the app downloads the weights from when they are not on the
phone; without a user-given URL it is a placeholder that parses and never resolves
(android_app/README.md): the weights are pushed with ``mlc-edge push`` into
``files/<model_id>/``. MLCChat crashes at start on an entry without ``model_url``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..memory.plan import make_plan
from ..memory.sources import tensor_cache_records

APP_CONFIG = "mlc-app-config.json"


def placeholder_model_url(model_id: str) -> str:
    """The ``model_url`` of an entry without one (``android_app/app.json``)."""
    from ..android.pins import app_layout

    return app_layout()["model_url_placeholder"].format(model_id=model_id)


def estimated_vram_bytes(bundle: Path, metadata: dict[str, Any], kv_dtype: str) -> int:
    """What the model needs on the GPU: the total of its memory plan (``mlc-edge memory``),
    i.e. the tensor cache's weights (or ``_metadata.params`` before conversion), the KV
    cache for the context window (with TVM's extra page), the largest function's planned
    temporaries, the float32 logits and the runtime's fixed overhead."""
    plan = make_plan(
        metadata,
        label="app",
        target="",
        kv_dtype=kv_dtype,
        weight_records=tensor_cache_records(Path(bundle)),
        floors=(),
    )
    return plan.total_bytes


def app_config_entry(
    bundle: Path,
    model_id: str,
    model_lib: str,
    metadata: dict[str, Any],
    kv_dtype: str,
    model_url: str | None = None,
) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "model_lib": model_lib,
        "model_url": model_url or placeholder_model_url(model_id),
        "estimated_vram_bytes": estimated_vram_bytes(bundle, metadata, kv_dtype),
    }


def write_app_config(
    out: Path,
    model_id: str,
    model_lib: str,
    metadata: dict[str, Any],
    kv_dtype: str,
    weights_dir: Path | None = None,
    model_url: str | None = None,
) -> dict[str, Any]:
    """Write ``mlc-app-config.json`` into ``out`` with this bundle's one entry; returns it.

    ``weights_dir`` holds the bundle's tensor-cache.json when it is not ``out`` (a library
    staged beside an existing bundle).
    """
    entry = app_config_entry(weights_dir or out, model_id, model_lib, metadata, kv_dtype, model_url)
    config = {"model_list": [entry]}
    (Path(out) / APP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config
