"""Pack a runtime-only TVM: enough to run a bundle compiled elsewhere (``Engine``), small
enough to carry to a GPU machine.

The apache-tvm wheel is ~305 MB, of which ``lib/libtvm_compiler.so`` (259 MB) and
``3rdparty/`` (26 MB) only compile. Without the compiler library ``import tvm`` falls back
to runtime-only mode (as ``TVM_USE_RUNTIME_LIB=1``): the VM, the KV cache, the weight
loader and, through ``runtime/cuda.py``, the CUDA runtime still work. ``tvm_ffi`` has a
compiled Python extension: take it from the wheel for the target machine's Python
(``pip download apache-tvm-ffi==<version> --python-version 3.12 --only-binary=:all:``).

    out/tvm/       the tvm package without the compiler (and libcudart.so.13 if found)
    out/tvm_ffi/   from the installed package or the given wheel
Use it with ``PYTHONPATH=out``; numpy, ml_dtypes and typing_extensions must be installed.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

from ..errors import UserError

# Not needed to run: the compiler, its third-party sources, C++ headers and sources.
_TVM_SKIP = {"3rdparty", "include", "src", "web", "cmake", "__pycache__"}
_COMPILER = "libtvm_compiler.so"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _copy_tvm(dest: Path) -> None:
    src = Path(tvm.__file__).parent

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(folder) == src:
            skip |= _TVM_SKIP & set(names)
        if Path(folder) == src / "lib":
            skip.add(_COMPILER)
        return skip

    shutil.copytree(src, dest, ignore=ignore)


def _copy_tvm_ffi(dest: Path, wheel: Path | None) -> str:
    if wheel is None:
        src = Path(tvm_ffi.__file__).parent
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return f"installed ({src})"
    if not wheel.is_file():
        raise UserError(f"{wheel} does not exist: download it with pip download")
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith("tvm_ffi/")]
        if not members:
            raise UserError(f"{wheel} is not an apache-tvm-ffi wheel (no tvm_ffi/ in it)")
        z.extractall(dest.parent, members)
    # Keep the extension's execute bits as the wheel had them.
    for lib in dest.rglob("*.so"):
        lib.chmod(0o755)
    return wheel.name


def _cudart() -> Path | None:
    from .cuda import _cudart_candidates

    return next((Path(p) for p in _cudart_candidates() if os.path.isfile(p)), None)


def pack_runtime(
    out: Path, tvm_ffi_wheel: Path | None = None, with_cudart: bool = True, archive: bool = False
) -> dict[str, Any]:
    """Write the runtime-only packages into ``out`` (replaced); returns what went in."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _copy_tvm(out / "tvm")
    ffi = _copy_tvm_ffi(out / "tvm_ffi", tvm_ffi_wheel)
    cudart = _cudart() if with_cudart else None
    if cudart is not None:
        # libtvm_runtime_cuda.so looks beside itself first (RUNPATH $ORIGIN).
        shutil.copy2(cudart, out / "tvm" / "lib" / cudart.name)
    summary: dict[str, Any] = {
        "path": str(out),
        "tvm": tvm.__version__,
        "tvm_ffi": ffi,
        "cudart": str(cudart) if cudart else None,
        "bytes": _size(out),
    }
    if archive:
        tar = out.with_name(out.name + ".tar.gz")
        with tarfile.open(tar, "w:gz") as t:
            t.add(out, arcname=out.name)
        summary["archive"] = str(tar)
        summary["archive_bytes"] = tar.stat().st_size
    return summary
