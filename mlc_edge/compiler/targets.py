"""The targets ``mlc-edge compile --target`` knows, and what each one builds.

A target says how to make the TVM target, which rule set (``schedules/<rules>/``) gives
its functions their loops/threads, how the library is exported, which device runs it and,
for a GPU, its device description: the limits the compile-time guards check
(``DeviceLimits``, ``configs/devices/<name>.json``). A device file with ``"target":
"android-opencl"`` is listed as ``android-opencl:<name>``: adding an Adreno is that file.

    cpu                          this machine (LLVM), a .so that ``mlc-edge run`` loads
    android-opencl[:adreno-NNN]  Adreno GPU through OpenCL, a system library .tar for the app
    vulkan                       listed only: this TVM has no Vulkan code generator
    cuda[:sm_NN]                 NVIDIA GPU (desktop), kernels built by nvcc, a .so
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm.target import Target

from ..config.devices import DEFAULT_DEVICE, DeviceLimits, device_names
from ..errors import UserError

# The phone's CPU runs the host side (the VM, kernel launches): Android on arm64.
ANDROID_HOST: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-android"}


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    name: str
    description: str
    device: str  # the TVM runtime device the library runs on: "cpu", "opencl", ...
    rules: str  # the rule set: schedules/<rules>/ ("cpu", "gpu", "adreno", "cuda")
    lib_suffix: str = ".so"  # ".so" loads on this machine; ".tar" is linked into an app
    system_lib: bool = False
    default_preset: str = "edge-512"
    codegen: str = "llvm"  # the TVM target kind whose code generator builds the kernels
    limits: DeviceLimits | None = None  # the device description (GPU targets)
    # Whether the 4-bit schemes (q4f16t, ...) build here: its rule set fuses the
    # dequantization into the matmuls and its 4-bit kernels have been built and checked
    # (``compiler/int4_targets.py`` refuses the others in one line).
    builds_int4: bool = False

    def tvm_target(self) -> Target:
        raise NotImplementedError

    def schedule_rules(self) -> list[Any]:
        """The rule set's rules, with the tunables of this target's device."""
        from ..schedules import rule_set

        return rule_set(self.rules, self.limits.name if self.limits else None)

    def with_limits(self, limits: DeviceLimits) -> TargetSpec:
        """The same target for a device with other limits (tests, a board of one's own)."""
        return dataclasses.replace(self, limits=limits)

    def build_problem(self) -> str | None:
        """Why this machine's TVM cannot build this target, or None when it can."""
        if tvm.get_global_func(f"target.build.{self.codegen}", allow_missing=True) is None:
            return (
                f"this TVM has no {self.codegen} code generator "
                f"(target.build.{self.codegen} is not registered)"
            )
        return None

    def require_buildable(self) -> None:
        problem = self.build_problem()
        if problem:
            raise UserError(f"target '{self.name}' cannot be built here: {problem}")

    def runs_here(self) -> bool:
        """Whether a bundle for this target can be run by ``mlc-edge run`` on this machine."""
        return tvm.runtime.enabled(self.device) and self.lib_suffix == ".so"

    def reads_int4_tiles(self, scheme: Any) -> bool:
        """Whether ``scheme``'s 4-bit weights are stored in CPU tiles for this target
        (``mlc_edge.quantization.int4``): where its decode kernel reads them fastest so."""
        return False

    def build_scope(self) -> AbstractContextManager[Any]:
        """Entered around ``relax.build`` (CUDA: compile the kernels with nvcc)."""
        return nullcontext()

    def check_library(self, path: Path) -> None:
        """Called on the exported library; raises when it is not what the target needs."""

    def describe(self) -> dict[str, Any]:
        """What ``mlc-edge targets --json`` prints for this target."""
        problem = self.build_problem()
        return {
            "name": self.name,
            "description": self.description,
            "device": self.device,
            "default_preset": self.default_preset,
            "library": f"lib/<model_lib>{self.lib_suffix}"
            + (" (system library)" if self.system_lib else ""),
            "can_build": problem is None,
            "builds_int4": self.builds_int4,
            "build_problem": problem,
            "runs_here": self.runs_here(),
            "limits": self.limits.as_dict() if self.limits else None,
        }


@dataclass(frozen=True, kw_only=True)
class CpuTarget(TargetSpec):
    device: str = "cpu"
    rules: str = "cpu"
    builds_int4: bool = True  # schedules/cpu/int4.py

    def tvm_target(self) -> Target:
        # The machine's own CPU, so LLVM uses its vector units (AVX-512 / NEON).
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})

    def reads_int4_tiles(self, scheme: Any) -> bool:
        from ..schedules.cpu.int4_gemv_avx2 import reads_tiles

        layout = scheme.int4_layout
        return layout is not None and reads_tiles(
            self.tvm_target(), layout.group_size, scheme.dtype
        )


@dataclass(frozen=True, kw_only=True)
class AndroidTarget(TargetSpec):
    """A phone GPU: a system library .tar that MLC's Android app links, an arm64 host."""

    lib_suffix: str = ".tar"
    system_lib: bool = True


@dataclass(frozen=True, kw_only=True)
class AndroidOpenCLTarget(AndroidTarget):
    """Through OpenCL: kernels as OpenCL C source inside the library; its device
    description says which GPU (today Adreno's, the Adreno rules)."""

    device: str = "opencl"
    rules: str = "adreno"
    codegen: str = "opencl"
    builds_int4: bool = True  # schedules/gpu/gemv_int4.py, prefill_int4.py; verify on PoCL

    def tvm_target(self) -> Target:
        assert self.limits is not None
        threads = self.limits.schedule_threads
        # device "adreno" (the family) sends dlight down its Adreno branches;
        # max_num_threads caps the work-groups the schedules (and the KV cache's kernels)
        # choose.
        return Target(
            {
                "kind": "opencl",
                "device": self.limits.family,
                "max_num_threads": threads,
                "max_threads_per_block": threads,
            },
            host=ANDROID_HOST,
        )


@dataclass(frozen=True, kw_only=True)
class VulkanTarget(AndroidTarget):
    """Listed so users find it, refused at compile time: the PyPI TVM has no Vulkan codegen.
    Any Android GPU: the GPU rule set with its default tunables. Not ``builds_int4``: its
    4-bit kernels have never been built."""

    device: str = "vulkan"
    rules: str = "gpu"
    codegen: str = "vulkan"

    def tvm_target(self) -> Target:
        return Target({"kind": "vulkan"}, host=ANDROID_HOST)

    def build_problem(self) -> str | None:
        problem = super().build_problem()
        if problem:
            return (
                f"{problem[:-1]}: the apache-tvm wheel is built without USE_VULKAN); "
                "use --target android-opencl, or a TVM built with USE_VULKAN=ON"
            )
        return None


@dataclass(frozen=True, kw_only=True)
class CudaTarget(TargetSpec):
    """An NVIDIA GPU on a desktop: TVM's stock GPU schedules (``schedules/cuda/``),
    kernels compiled by nvcc into the library (see ``compiler/cuda.py``), a generic x86-64
    host."""

    device: str = "cuda"
    rules: str = "cuda"
    codegen: str = "cuda"
    builds_int4: bool = True  # the GPU 4-bit rules (schedules/cuda/int4.py)
    arch: str = "sm_80"
    # False: the kernels stay CUDA source, no nvcc needed, a library that does not run:
    # to read the kernels where nvcc is missing (tests; ``compiler/cuda.py``).
    nvcc: bool = True

    def tvm_target(self) -> Target:
        # 48 KiB: the static shared memory every CUDA GPU gives a block (stated, or the
        # KV cache's kernels warn and assume it).
        return Target(
            {"kind": "cuda", "arch": self.arch, "max_shared_memory_per_block": 49152},
            host={"kind": "llvm"},
        )

    def build_problem(self) -> str | None:
        from ..runtime.cuda import load_cuda_runtime
        from .cuda import find_nvcc

        problem = super().build_problem()
        if problem or not self.nvcc:
            return problem
        if find_nvcc() is None:
            problem = "nvcc (the CUDA toolkit's compiler) is not on PATH or in CUDA_HOME/bin"
        return problem or load_cuda_runtime(build=True)

    def run_problem(self) -> str | None:
        from ..runtime.cuda import cuda_problem

        return cuda_problem()

    def runs_here(self) -> bool:
        return self.run_problem() is None

    def build_scope(self) -> AbstractContextManager[Any]:
        from .cuda import cuda_build

        return cuda_build(self.arch, self.nvcc)

    def check_library(self, path: Path) -> None:
        from .cuda import kernel_format

        found, expected = kernel_format(path), "fatbin" if self.nvcc else "source"
        if found != expected:
            raise RuntimeError(f"{path} holds CUDA kernels as {found}, not as {expected}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "arch": self.arch, "run_problem": self.run_problem()}


def _cuda(arch: str | None) -> CudaTarget:
    what = {
        None: "NVIDIA GPUs sm_80+ (SASS sm_80/sm_90, PTX for newer)",
        "sm_89": "NVIDIA Ada GPUs (RTX 40, L4, L40)",
        "sm_90": "NVIDIA Hopper GPUs (H100, H200)",
    }[arch]
    return CudaTarget(
        name="cuda" + (f":{arch}" if arch else ""),
        description=f"{what} through CUDA, on a desktop: a .so with the kernels built by nvcc",
        arch=arch or "sm_80",
    )


def _android_opencl(gpu: str | None) -> AndroidOpenCLTarget:
    limits = DeviceLimits.load(gpu or DEFAULT_DEVICE)
    what = f"{limits.gpu} ({limits.soc})" if gpu else "any Adreno 7xx/8xx phone GPU"
    return AndroidOpenCLTarget(
        name="android-opencl" + (f":{gpu}" if gpu else ""),
        description=f"{what} through OpenCL: a system library .tar for MLC's Android app",
        limits=limits,
    )


def known_targets() -> dict[str, TargetSpec]:
    """Every target, by name: the fixed ones and one per Adreno device description."""
    targets = (
        CpuTarget(
            name="cpu",
            description="this machine's CPU (LLVM), to test a model before it goes on a phone",
        ),
        _android_opencl(None),
        # One per device description of an Adreno (configs/devices/adreno-NNN.json).
        *(_android_opencl(gpu) for gpu in device_names("android-opencl")),
        VulkanTarget(
            name="vulkan",
            description="Android GPU through Vulkan (not buildable with this TVM)",
        ),
        _cuda(None),
        _cuda("sm_89"),
        _cuda("sm_90"),
    )
    return {t.name: t for t in targets}


TARGETS: dict[str, TargetSpec] = known_targets()


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(
            f"unknown target '{name}': choose one of {', '.join(TARGETS)} "
            "(`mlc-edge targets` lists them)"
        ) from None
