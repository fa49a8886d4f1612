"""The Android app's entry for a bundle: ``mlc-app-config.json``.

MLC's Android app lists its models in ``assets/mlc-app-config.json``
(``{"model_list": [{model_id, model_lib, model_url, estimated_vram_bytes}]}``, see
mlc-runtime-abi.md). A phone bundle carries its own entry, ready to be merged into that
list; ``model_url`` is left out: the weights are pushed to the phone with adb, into
``files/<model_id>/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

APP_CONFIG = "mlc-app-config.json"


def weights_bytes(bundle: Path, metadata: dict[str, Any]) -> int:
    """Bytes of all weights: the tensor cache's ``nbytes``, or (a bundle without weights
    yet) the same sum from ``_metadata.params``."""
    cache = Path(bundle) / "tensor-cache.json"
    if cache.is_file():
        records = json.loads(cache.read_text())["records"]
        return sum(int(r["nbytes"]) for shard in records for r in shard["records"])
    return sum(
        int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize
        for p in metadata["params"]
    )


def kv_cache_bytes(metadata: dict[str, Any], kv_dtype: str) -> int:
    """The KV cache for one full context window, as the runtime allocates it at batch 1."""
    kv = metadata["kv_cache"]
    return (
        kv["num_hidden_layers"]
        * kv["num_key_value_heads"]
        * kv["head_dim"]
        * metadata["context_window_size"]
        * 2  # keys and values
        * np.dtype(kv_dtype).itemsize
    )


def estimated_vram_bytes(bundle: Path, metadata: dict[str, Any], kv_dtype: str) -> int:
    """What the model needs on the GPU:

        weights    sum of the tensor cache's nbytes (every weight is loaded)
      + KV cache   layers x kv_heads x head_dim x context_window x 2 (k, v) x dtype bytes
      + temps      max(_metadata.memory_usage): one function runs at a time, and each
                   reserves its statically planned temporaries

    The runtime's own workspaces (sampling, ~tens of MiB) are not counted.
    """
    temps = max(metadata.get("memory_usage", {}).values(), default=0)
    return weights_bytes(bundle, metadata) + kv_cache_bytes(metadata, kv_dtype) + int(temps)


def app_config_entry(
    bundle: Path, model_id: str, model_lib: str, metadata: dict[str, Any], kv_dtype: str
) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "model_lib": model_lib,
        "estimated_vram_bytes": estimated_vram_bytes(bundle, metadata, kv_dtype),
    }


def write_app_config(
    out: Path,
    model_id: str,
    model_lib: str,
    metadata: dict[str, Any],
    kv_dtype: str,
    weights_dir: Path | None = None,
) -> dict[str, Any]:
    """Write ``mlc-app-config.json`` into ``out`` with this bundle's one entry; returns it.

    ``weights_dir`` holds the bundle's tensor-cache.json when it is not ``out`` (a library
    staged beside an existing bundle).
    """
    entry = app_config_entry(weights_dir or out, model_id, model_lib, metadata, kv_dtype)
    config = {"model_list": [entry]}
    (Path(out) / APP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config
