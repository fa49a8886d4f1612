"""Memory plans of a bundle, or of a config.json alone (the library compiled in memory).

A phone library cannot run here, so its ``_metadata`` comes from compiling it again
(seconds for android-opencl, no weights needed); a CPU bundle's library is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bundle import layout
from ..config import ModelSpec, load_preset
from ..config.presets import PRESET_KEYS
from .plan import MemoryPlan, make_plan

MODEL_LIB = "memplan"

# MLC-LLM's own settings when gen_config is given none (mlc_llm/model/llama/llama_model.py
# ``LlamaConfig.__post_init__``: context_window_size = max_position_embeddings,
# prefill_chunk_size = min(context_window_size, 8192); max_batch_size 1, the Android app's
# "interactive" mode). In that mode the engine's KV cache holds min(context, capacity).
MLC_DEFAULT_PREFILL_CHUNK = 8192


def mlc_default_sizes(hf_config: dict[str, Any]) -> dict[str, int]:
    context = int(
        hf_config.get("max_position_embeddings") or hf_config.get("max_sequence_length") or 2048
    )
    return {
        "max_batch_size": 1,
        "prefill_chunk_size": min(context, MLC_DEFAULT_PREFILL_CHUNK),
        "context_window_size": context,
    }


def spec_for(hf_config: dict[str, Any], quantization: str, sizes: dict[str, int]) -> ModelSpec:
    return ModelSpec.create(hf_config, quantization, sizes)


def sizes_for(
    preset: str | None, hf_config: dict[str, Any], overrides: dict[str, int | None]
) -> dict[str, int]:
    """A preset (or ``mlc-default``) with the per-value flags on top."""
    sizes = (
        mlc_default_sizes(hf_config)
        if preset == "mlc-default"
        else load_preset(preset or "edge-512")
    )
    sizes.update({k: v for k, v in overrides.items() if v is not None and k in PRESET_KEYS})
    return sizes


def compiled_metadata(spec: ModelSpec, target_name: str) -> dict[str, Any]:
    from ..compiler.build import compile_model
    from ..compiler.targets import get_target

    return compile_model(spec, get_target(target_name), MODEL_LIB)[1]


def bundle_metadata(bundle: Path) -> dict[str, Any] | None:
    """``_metadata`` of a bundle's library when it loads on this machine, else None."""
    import tvm
    from tvm import relax

    libs = layout.libraries(bundle, layout.SHARED_LIBRARY)
    if not libs:
        return None
    executable = tvm.runtime.load_module(str(libs[0].path))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return json.loads(str(vm["_metadata"]()))


def tensor_cache_records(bundle: Path) -> list[tuple[str, int]] | None:
    """(name, bytes) of each weight of a bundle; None when it has no weights yet."""
    if not layout.has_weights(bundle):
        return None
    return [(r["name"], int(r["nbytes"])) for r in layout.tensor_records(bundle)]


def plan_for(
    metadata: dict[str, Any],
    label: str,
    target_name: str,
    kv_dtype: str,
    reported_memory: int | None,
    budget: int | None,
    weight_records: list[tuple[str, int]] | None = None,
    floors: tuple[int, ...] | None = None,
) -> MemoryPlan:
    from ..compiler.targets import get_target

    limits = get_target(target_name).limits
    # A target without limits (cpu) is planned against the default phone's numbers.
    phone = limits or get_target("android-opencl").limits
    assert phone is not None
    return make_plan(
        metadata,
        label=label,
        target=target_name,
        kv_dtype=kv_dtype,
        weight_records=weight_records,
        max_alloc_bytes=limits.max_mem_alloc_bytes if limits else None,
        reported_memory_bytes=reported_memory
        if reported_memory is not None
        else phone.global_mem_bytes,
        budget_bytes=budget,
        **({"floors": floors} if floors is not None else {}),
    )


def plan_from_config(
    hf_config: dict[str, Any],
    target_name: str,
    preset: str | None,
    quantization: str,
    overrides: dict[str, int | None],
    reported_memory: int | None = None,
    budget: int | None = None,
    label: str | None = None,
) -> MemoryPlan:
    spec = spec_for(hf_config, quantization, sizes_for(preset, hf_config, overrides))
    metadata = compiled_metadata(spec, target_name)
    return plan_for(
        metadata,
        label or preset or "edge-512",
        target_name,
        spec.scheme.dtype,
        reported_memory,
        budget,
    )


def plan_from_bundle(
    bundle: Path,
    target_name: str | None,
    reported_memory: int | None = None,
    budget: int | None = None,
) -> tuple[MemoryPlan, str]:
    """The plan of a bundle: its own library's ``_metadata`` when that loads here (CPU),
    else the library compiled again for ``target_name`` (default android-opencl) from
    its mlc-chat-config.json. Weights from its tensor-cache.json. Returns (plan, target)."""
    spec = ModelSpec.from_chat_config(layout.read_chat_config(bundle))
    metadata = None
    if target_name in (None, "cpu"):
        metadata = bundle_metadata(bundle)
        if metadata is not None:
            target_name = "cpu"
    target_name = target_name or "android-opencl"
    if metadata is None:
        metadata = compiled_metadata(spec, target_name)
    plan = plan_for(
        metadata,
        "bundle",
        target_name,
        spec.scheme.dtype,
        reported_memory,
        budget,
        tensor_cache_records(bundle),
    )
    return plan, target_name
