"""Make TVM's CUDA runtime available: the apache-tvm wheel ships it as a separate
library (``tvm/lib/libtvm_runtime_cuda.so``) that ``import tvm`` does not load.

Without it ``tvm.cuda()`` does not exist and a CUDA model library cannot be loaded
("a loader of that name is not registered"). It needs the CUDA runtime
(``libcudart.so.13``) and the driver (``libcuda.so.1``).

Building needs it too: only when the CUDA module factory is registered does TVM's code
generator compile the kernels at build time (``tvm_callback_cuda_compile``); otherwise it
stores CUDA source, which a runtime-only TVM cannot load. A machine without a GPU has no
driver, so for building we load a stub ``libcuda.so.1`` (``build=True``) whose functions
only return an error: the build never launches a kernel. Works with a runtime-only TVM.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tvm

# The driver functions libtvm_runtime_cuda.so imports (TVM 0.27); the stub answers them
# all with CUDA_ERROR_STUB_LIBRARY (34).
_DRIVER_FUNCTIONS = (
    "cuDeviceGetName",
    "cuFuncSetAttribute",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuLaunchKernelEx",
    "cuModuleGetFunction",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)

NO_DRIVER = "no NVIDIA driver (libcuda.so.1) on this machine"

_state: dict[str, object] = {"loaded": False, "stub": False, "problem": None}


def runtime_library() -> Path:
    return Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"


def _cudart_candidates() -> list[str]:
    """Where libcudart.so.13 may be besides the loader's search path: next to TVM's
    libraries (a packed runtime), the CUDA toolkit of ``nvcc``, pip's nvidia packages."""
    dirs = [str(runtime_library().parent)]
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    if nvcc:
        real = Path(nvcc).resolve()
        roots.append(str(real.parent.parent))
        # /usr/local/bin/nvcc may be a wrapper script: look for the toolkits beside it too.
        roots += glob.glob("/usr/local/cuda-*")
    for root in filter(None, roots):
        dirs += [os.path.join(root, "lib64"), os.path.join(root, "lib")]
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu13", "lib"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib"))
    return [os.path.join(d, "libcudart.so.13") for d in dirs]


def _load_global(name_or_path: str) -> bool:
    try:
        ctypes.CDLL(name_or_path, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _build_driver_stub() -> Path | None:
    """A ``libcuda.so.1`` with the driver functions TVM links against, all failing."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = Path(tempfile.gettempdir()) / f"mlc-edge-cuda-stub-{os.getuid()}"
    lib = out / "libcuda.so.1"
    if lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    src = out / "stub.c"
    src.write_text("".join(f"int {f}(void) {{ return 34; }}\n" for f in _DRIVER_FUNCTIONS))
    tmp = out / f"libcuda.so.1.{os.getpid()}"
    done = subprocess.run(
        [cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
        capture_output=True,
    )
    if done.returncode != 0:
        return None
    os.replace(tmp, lib)
    return lib


def load_cuda_runtime(build: bool = False) -> str | None:
    """Load TVM's CUDA runtime once; returns why it cannot be loaded, or None.

    ``build=True`` accepts a stub driver (a machine with no GPU, compiling only)."""
    if _state["loaded"]:
        if _state["stub"] and not build:
            return NO_DRIVER  # this process stands in a stub to compile
        return None
    if not runtime_library().is_file():
        return f"this TVM has no CUDA runtime ({runtime_library().name} is missing)"
    if not _load_global("libcudart.so.13") and not any(
        os.path.isfile(p) and _load_global(p) for p in _cudart_candidates()
    ):
        return (
            "the CUDA 13 runtime libcudart.so.13 was not found (install CUDA 13 or "
            "pip install nvidia-cuda-runtime)"
        )
    stub = False
    if not _load_global("libcuda.so.1"):
        if not build:
            return NO_DRIVER
        lib = _build_driver_stub()
        if lib is None or not _load_global(str(lib)):
            return "no NVIDIA driver (libcuda.so.1) and no C compiler to stand in for it"
        stub = True
    try:
        ctypes.CDLL(str(runtime_library()), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return f"TVM's CUDA runtime did not load: {e}"
    _state.update(loaded=True, stub=stub)
    return None


def cuda_problem() -> str | None:
    """Why a CUDA library cannot run on this machine, or None when a CUDA GPU is there."""
    problem = load_cuda_runtime()
    if problem:
        return problem
    if not tvm.cuda(0).exist:
        return "no CUDA GPU was found (the NVIDIA driver reports none)"
    return None
