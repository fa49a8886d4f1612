"""Tunable values of the Adreno schedule rules, read from ``schedules/adreno/<gpu>.json``.

Each GPU's JSON file holds its device limits (``DeviceLimits``) and a ``"schedule"``
section with the tiles, vector widths, work-group shapes and unroll factors of our rules::

    "schedule": {
      "gemv": {"vector": 8, "threads_n": 16, "threads_k": 16, "unroll_k": 4},
      "prefill": {"rows": 16, "vector": 8, "threads": 64, "unroll_k": 2},
      "gemv_nk": {"vector": 8, "threads_k": 8, "rows": 32, "unroll_k": 4}
    }

A GPU without a file, or a file without some value, takes ``default.json``'s. Work-groups
never exceed ``schedule_threads`` nor ``max_work_group_size`` of the same file (the rules
also cap them at the target's ``max_num_threads`` when they are applied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

PACKAGE = "mlc_edge.schedules.adreno"
DEFAULT_GPU = "default"

# Unroll factors above this are refused: large unrolled kernels failed clBuildProgram on
# Adreno 740 with CL_OUT_OF_HOST_MEMORY (docs/devices.md).
MAX_UNROLL = 16


@dataclass(frozen=True)
class GemvTuning:
    """Decode GEMV ``[b, 1, K] x [K, N]``: one work-group reduces a tile of columns.

    ``vector`` halves of N per thread (one vector load per weight row), ``threads_n`` x
    ``threads_k`` threads per work-group (K split across ``threads_k``, at most
    ``vector``: the final sum then gives each thread whole columns), ``unroll_k`` weight
    rows per unrolled step of a thread's part of K.
    """

    vector: int = 8
    threads_n: int = 16
    threads_k: int = 16
    unroll_k: int = 4


@dataclass(frozen=True)
class GemvNKTuning:
    """GEMV with the weight ``[N, K]`` (the tied lm_head): ``threads_k`` threads share
    one weight row, each reading ``vector`` halves of it per load; ``rows`` weight rows
    per work-group; ``unroll_k`` loads per unrolled step of a thread."""

    vector: int = 8
    threads_k: int = 8
    rows: int = 32
    unroll_k: int = 4


@dataclass(frozen=True)
class PrefillTuning:
    """Prefill matmul ``[1, seq_len, K] x [K, N]``: each thread keeps ``rows`` x ``vector``
    fp32 accumulators in registers (all rows of a chunk), ``threads`` threads per
    work-group along N, ``unroll_k`` weight rows per unrolled step."""

    rows: int = 16
    vector: int = 8
    threads: int = 64
    unroll_k: int = 2


@dataclass(frozen=True)
class AdrenoTuning:
    gpu: str
    max_threads: int  # min(schedule_threads, max_work_group_size)
    gemv: GemvTuning
    prefill: PrefillTuning
    gemv_nk: GemvNKTuning = GemvNKTuning()

    @classmethod
    def from_dict(cls, gpu: str, data: dict[str, Any],
                  default: dict[str, Any] | None = None) -> AdrenoTuning:
        """Tunables from one JSON document; missing values from ``default``."""
        default = default or {}
        merged = {**default, **data}
        sched = {**default.get("schedule", {}), **data.get("schedule", {})}
        for part in ("gemv", "prefill", "gemv_nk"):
            sched[part] = {**default.get("schedule", {}).get(part, {}),
                           **data.get("schedule", {}).get(part, {})}
        gemv = _section(GemvTuning, sched["gemv"], gpu, "gemv")
        prefill = _section(PrefillTuning, sched["prefill"], gpu, "prefill")
        gemv_nk = _section(GemvNKTuning, sched["gemv_nk"], gpu, "gemv_nk")
        threads = min(int(merged.get("schedule_threads", 256)),
                      int(merged.get("max_work_group_size", 256)))
        return cls(gpu=gpu, max_threads=threads, gemv=gemv, prefill=prefill,
                   gemv_nk=gemv_nk)

    @classmethod
    def load(cls, gpu: str = DEFAULT_GPU) -> AdrenoTuning:
        """The tunables of ``gpu`` (e.g. ``adreno-750``); an unknown GPU gets the defaults."""
        default = _read(DEFAULT_GPU)
        assert default is not None, "default.json ships with mlc_edge.schedules.adreno"
        data = _read(gpu)
        if data is None:
            return cls.from_dict(DEFAULT_GPU, default)
        return cls.from_dict(gpu, data, default)


def _read(gpu: str) -> dict[str, Any] | None:
    path = resources.files(PACKAGE).joinpath(f"{gpu}.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _section(kind: type, values: dict[str, Any], gpu: str, part: str) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{gpu}.json schedule.{part}: unknown keys {sorted(unknown)}")
    out = kind(**{k: int(v) for k, v in values.items()})
    for name in known:
        value = getattr(out, name)
        if value < 1:
            raise ValueError(f"{gpu}.json schedule.{part}.{name} must be >= 1, not {value}")
        if name.startswith("unroll") and value > MAX_UNROLL:
            raise ValueError(f"{gpu}.json schedule.{part}.{name} = {value}: keep unrolling "
                             f"<= {MAX_UNROLL} (large unrolled kernels fail to build on Adreno)")
    return out
