"""Tunable values of the KN rules, with one source of defaults: ``tuning.json`` here.

A rule set takes the defaults and changes only what it must: an Adreno GPU its work-group
cap (its device description) and any values tuned for it (``schedules/adreno/``), CUDA
its vector width (``schedules/cuda/``). The sections and their keys are those of
``tuning.json``; a value it does not know is refused::

    {"max_threads": 256, "local_memory_bytes": 32768,
     "gemv": {"vector": 8, "threads_n": 16, "threads_k": 8, "unroll_k": 4},
     "prefill": {"rows": 16, "vector": 8, "threads": 64, "unroll_k": 2},
     "gemv_nk": {"vector": 8, "threads_k": 8, "rows": 32, "unroll_k": 4},
     "gemv_int4": {"threads_n": 32, "threads_k": 4, "unroll_k": 4}}

Work-groups never exceed ``max_threads`` threads nor use more than ``local_memory_bytes``
of local memory (the rules also keep to the target's ``max_num_threads`` and
``max_shared_memory_per_block`` when they are applied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

# Unroll factors above this are refused: large unrolled kernels failed clBuildProgram on
# Adreno 740 with CL_OUT_OF_HOST_MEMORY (docs/devices.md).
MAX_UNROLL = 16

# The rule set's defaults' name (``KNTuning.gpu``) where no GPU is named.
DEFAULT_GPU = "default"


@dataclass(frozen=True)
class GemvTuning:
    """Decode GEMV ``[b, 1, K] x [K, N]``: one work-group reduces a tile of columns.

    ``vector`` halves of N per thread (one vector load per weight row), ``threads_n`` x
    ``threads_k`` threads per work-group (K split across ``threads_k``, at most
    ``vector``: the final sum then gives each thread whole columns), ``unroll_k`` weight
    rows per unrolled step of a thread's part of K.
    """

    vector: int
    threads_n: int
    threads_k: int
    unroll_k: int


@dataclass(frozen=True)
class GemvInt4Tuning:
    """Decode GEMV of fused 4-bit weights (``gemv_int4.py``): each thread owns the 8
    columns of one 32-bit word; ``threads_n`` x ``threads_k`` threads per work-group (each
    group of rows split across ``threads_k``, at most 8), ``unroll_k`` words per unrolled
    step."""

    threads_n: int
    threads_k: int
    unroll_k: int


@dataclass(frozen=True)
class GemvNKTuning:
    """GEMV with the weight ``[N, K]`` (the tied lm_head): ``threads_k`` threads share
    one weight row, each reading ``vector`` halves of it per load; ``rows`` weight rows
    per work-group; ``unroll_k`` loads per unrolled step of a thread."""

    vector: int
    threads_k: int
    rows: int
    unroll_k: int


@dataclass(frozen=True)
class PrefillTuning:
    """Prefill matmul ``[1, seq_len, K] x [K, N]``: each thread keeps ``rows`` x ``vector``
    fp32 accumulators in registers (all rows of a chunk), ``threads`` threads per
    work-group along N, ``unroll_k`` weight rows per unrolled step."""

    rows: int
    vector: int
    threads: int
    unroll_k: int


SECTIONS: dict[str, type] = {
    "gemv": GemvTuning,
    "prefill": PrefillTuning,
    "gemv_nk": GemvNKTuning,
    "gemv_int4": GemvInt4Tuning,
}


def default_values() -> dict[str, Any]:
    """``tuning.json``: every tunable's default."""
    text = resources.files(__package__).joinpath("tuning.json").read_text()
    return {k: v for k, v in json.loads(text).items() if k != "notes"}


@dataclass(frozen=True)
class KNTuning:
    gpu: str  # whose values these are (a device description's name, or "default")
    max_threads: int  # the work-group cap
    local_memory_bytes: int  # the local memory one work-group may use
    gemv: GemvTuning
    prefill: PrefillTuning
    gemv_nk: GemvNKTuning
    gemv_int4: GemvInt4Tuning

    @classmethod
    def from_dict(
        cls,
        gpu: str,
        values: dict[str, Any],
        max_threads: int | None = None,
        local_memory_bytes: int | None = None,
    ) -> KNTuning:
        """The defaults with ``values`` (``{"gemv": {"threads_n": 32}}``, ...) over them;
        ``max_threads`` and ``local_memory_bytes`` (a device's) replace the defaults."""
        default = default_values()
        unknown = set(values) - set(SECTIONS)
        if unknown:
            raise ValueError(f"{gpu}: unknown tuning sections {sorted(unknown)}")
        parts = {
            part: _section(kind, {**default[part], **values.get(part, {})}, gpu, part)
            for part, kind in SECTIONS.items()
        }
        threads = default["max_threads"] if max_threads is None else max_threads
        local = default["local_memory_bytes"] if local_memory_bytes is None else local_memory_bytes
        return cls(gpu=gpu, max_threads=int(threads), local_memory_bytes=int(local), **parts)


def _section(kind: type, values: dict[str, Any], gpu: str, part: str) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{gpu} tuning {part}: unknown keys {sorted(unknown)}")
    out = kind(**{k: int(v) for k, v in values.items()})
    for name in known:
        value = getattr(out, name)
        if value < 1:
            raise ValueError(f"{gpu} tuning {part}.{name} must be >= 1, not {value}")
        if name.startswith("unroll") and value > MAX_UNROLL:
            raise ValueError(
                f"{gpu} tuning {part}.{name} = {value}: keep unrolling "
                f"<= {MAX_UNROLL} (large unrolled kernels fail to build on Adreno)"
            )
    return out
