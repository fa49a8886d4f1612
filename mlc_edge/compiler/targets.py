"""The targets ``mlc-edge compile --target`` knows, and what each one builds.

A target says how to make the TVM target, which schedule rules give its functions
their loops/threads, how the library is exported, and which device runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.target import Target

from ..errors import UserError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    device: str  # the TVM runtime device the library runs on: "cpu", "opencl", ...
    default_preset: str
    lib_suffix: str  # ".so" loads on this machine; ".tar" is linked into an app
    system_lib: bool

    def tvm_target(self) -> Target:
        raise NotImplementedError

    def schedule_rules(self) -> list[Any]:
        raise NotImplementedError

    def runs_here(self) -> bool:
        """Whether a bundle for this target can be run by ``mlc-edge run`` on this machine."""
        return tvm.runtime.enabled(self.device) and self.lib_suffix == ".so"


@dataclass(frozen=True)
class CpuTarget(TargetSpec):
    def tvm_target(self) -> Target:
        # The machine's own CPU, so LLVM uses its vector units (AVX-512 / NEON).
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})

    def schedule_rules(self) -> list[Any]:
        from ..schedules.cpu import cpu_rules

        return cpu_rules()


TARGETS: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        CpuTarget(
            name="cpu",
            description="this machine's CPU (LLVM), to test a model before it goes on a phone",
            device="cpu",
            default_preset="edge-512",
            lib_suffix=".so",
            system_lib=False,
        ),
    )
}


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(
            f"unknown target '{name}': choose one of {', '.join(TARGETS)} "
            "(`mlc-edge targets` lists them)"
        ) from None
