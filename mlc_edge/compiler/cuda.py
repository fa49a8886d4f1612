"""CUDA kernels compiled to machine code at build time, with ``nvcc``.

TVM's CUDA code generator hands the kernels' source to ``tvm_callback_cuda_compile``
(only while its CUDA runtime is loaded, see ``runtime/cuda.py``). TVM's own callback
defaults to NVRTC, and its nvcc mode builds for one architecture only; ours asks nvcc for
one fatbin holding SASS for each listed GPU generation and PTX for the oldest, which the
driver compiles for newer GPUs when the library loads. The library then holds no CUDA
source, so a runtime-only TVM (no compiler, no Python callback) can load it.

    sm_80 (default)  SASS sm_80 (A100, and RTX 30/40 by binary compatibility) + sm_90
                     (H100/H200), PTX compute_80 for anything newer (e.g. Blackwell)
    sm_NN            SASS sm_NN + PTX compute_NN
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import tvm
import tvm_ffi

# The magic number nvcc's fatbin files start with (0xBA55ED50, little endian).
FATBIN_MAGIC = b"\x50\xed\x55\xba"
# Text only CUDA source has: a library whose kernels are source cannot run without TVM's
# compiler library (it compiles them when loaded).
SOURCE_MARKERS = (b'extern "C" __global__', b"__launch_bounds__")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def gencode_flags(arch: str) -> list[str]:
    """nvcc's ``-gencode`` list for the target's ``arch`` (``sm_NN``)."""
    number = arch.removeprefix("sm_")
    sass = [number] + (["90"] if number == "80" else [])
    flags: list[str] = []
    for n in sass:
        flags += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    return flags + ["-gencode", f"arch=compute_{number},code=compute_{number}"]


@contextmanager
def _cuda_compile_callback(compile_kernels: Callable[..., bytearray]) -> Iterator[None]:
    """TVM's CUDA code generator hands each module's source to the global
    ``tvm_callback_cuda_compile``: ``compile_kernels`` is it while inside."""
    previous = tvm.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_kernels, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


@contextmanager
def nvcc_kernels(arch: str) -> Iterator[None]:
    """While inside, CUDA builds compile their kernels with nvcc into a fatbin."""
    from tvm.support import nvcc as tvm_nvcc

    nvcc = find_nvcc()
    assert nvcc is not None, "CudaTarget.build_problem checks for nvcc"
    flags = gencode_flags(arch)
    path = os.environ.get("PATH", "")

    def compile_kernels(code: str, *_: object) -> bytearray:
        # TVM's helper runs "nvcc" from PATH.
        os.environ["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{path}"
        try:
            return tvm_nvcc.compile_cuda(code, target_format="fatbin", arch=flags, compiler="nvcc")
        finally:
            os.environ["PATH"] = path

    with _cuda_compile_callback(compile_kernels):
        yield


@contextmanager
def source_kernels() -> Iterator[None]:
    """While inside, CUDA builds keep their kernels as the CUDA source TVM writes, compiled
    by nothing: to read them (``kernel_sources``) where there is no nvcc. Such a library
    does not run. Without TVM's CUDA runtime loaded the code generator keeps the source
    by itself; with it loaded it hands the source to this callback, which keeps it."""

    def keep_source(code: str, *_: object) -> bytearray:
        return bytearray(code.encode())

    with _cuda_compile_callback(keep_source):
        yield


@contextmanager
def cuda_build(arch: str, nvcc: bool = True) -> Iterator[None]:
    """What a CUDA build runs inside: nvcc for the kernels (``nvcc`` False: the kernels
    stay source, ``source_kernels``), and TIR's common-subexpression elimination off.
    With it on, TVM 0.27 fails to lower its KV cache's ``batch_tree_attn`` kernel for
    CUDA at Llama-3.2-1B's sizes ("variable cse_v.. has been used before definition");
    nvcc -O3 eliminates common subexpressions itself."""
    current = tvm.transform.PassContext.current()
    config = {**current.config, "tirx.disable_cse_tir": True}
    with (
        tvm.transform.PassContext(
            opt_level=current.opt_level,
            config=config,
            disabled_pass=current.disabled_pass,
            required_pass=current.required_pass,
        ),
        nvcc_kernels(arch) if nvcc else source_kernels(),
    ):
        yield


def kernel_format(library: Path) -> str:
    """What a CUDA model library holds: "fatbin" (machine code) or "source"."""
    data = Path(library).read_bytes()
    if any(marker in data for marker in SOURCE_MARKERS):
        return "source"
    if FATBIN_MAGIC in data:
        return "fatbin"
    return "none"


def kernel_sources(executable: tvm.runtime.Module) -> dict[str, str]:
    """The CUDA C++ of each kernel of a built model (``compile_model``'s executable), by
    kernel name: what TVM's code generator handed to nvcc, kept beside the fatbin until
    the library is exported. Empty when the executable holds no CUDA module."""
    found: list[str] = []

    def walk(module: tvm.runtime.Module) -> None:
        if module.kind == "cuda":
            found.append(module.inspect_source())
        for imported in module.imports:
            walk(imported)

    walk(getattr(executable, "mod", executable))
    kernels: dict[str, str] = {}
    for source in found:
        for part in source.split('extern "C" __global__')[1:]:
            head, brace, body = part.partition("{")
            if not brace or ";" in head:  # a declaration, not the definition
                continue
            name = re.findall(r"(\w+)\(", head)[-1]  # after __launch_bounds__(N), if any
            body = body.split("\n}")[0]  # up to the kernel's closing brace, at column 0
            kernels[name] = f'extern "C" __global__{head}{{{body}\n}}'
    return kernels
