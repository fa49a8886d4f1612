"""Schedule rule sets, one folder each, named by the targets that use them.

    cpu/      LLVM on this machine: our KN/NK matmuls, parallel loops
    gpu/      any GPU: our KN matmul rules (and NK GEMV), then TVM's stock dlight rules
    adreno/   the GPU rules with an Adreno's tunables (its configs/devices/ description)
    cuda/     TVM's stock rules, our NK GEMV, no tensor cores

``kn_pattern.py`` finds the matmuls the CPU and GPU rules schedule.
"""

from __future__ import annotations

from typing import Any

RULE_SETS = ("cpu", "gpu", "adreno", "cuda")


def rule_set(name: str, device: str | None = None) -> list[Any]:
    """The rules of the set ``name`` for ``device`` (a device description's name; the
    set's defaults when None or when the set has no per-device tunables)."""
    if name == "cpu":
        from .cpu import cpu_rules

        return cpu_rules()
    if name == "gpu":
        from .gpu import gpu_rules

        return gpu_rules()
    if name == "adreno":
        from .adreno import adreno_rules

        return adreno_rules(device or "default")
    if name == "cuda":
        from .cuda import cuda_rules

        return cuda_rules()
    raise ValueError(f"unknown rule set '{name}': one of {', '.join(RULE_SETS)}")
