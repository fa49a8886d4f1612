"""Check a bundle's weight shards against ``tensor-cache.json`` before anything uses them.

``convert`` records each shard's size and md5 (``mlc_edge.convert.tensor_cache``). A shard
cut short by a copy or a download, or one with a flipped byte, would otherwise reach
TVM's loader (a C++ traceback) or run and generate from wrong weights. ``run`` and
``bench`` check the sizes (one ``stat`` per shard); ``verify`` also checks every md5.
Each failure is one line naming the shard and the tensors it holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import layout
from .layout import TENSOR_CACHE

_READ_BYTES = 1 << 20
_NAMES_SHOWN = 3

REDO = "copy the bundle again or run `mlc-edge convert` again"


@dataclass
class WeightCheck:
    """What was checked: the shards, their bytes, and whether their md5 sums were read."""

    shards: int
    nbytes: int
    md5_checked: bool

    def line(self) -> str:
        what = "size and md5" if self.md5_checked else "size"
        return (
            f"weights: {self.shards} shards, {self.nbytes:,} bytes; every shard's {what} "
            f"matches {TENSOR_CACHE}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "bytes": self.nbytes,
            "md5_checked": self.md5_checked,
            "passed": True,
        }


def _tensors(shard: dict[str, Any]) -> str:
    names = [str(r.get("name")) for r in shard.get("records", []) if isinstance(r, dict)]
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return f"tensors {shown}{more}" if names else "no tensors"


def _shard_path(bundle: Path, shard: Any) -> tuple[Path, int]:
    """The shard's file (inside the bundle: a ``dataPath`` of ``../x`` is refused) and
    its recorded size."""
    cache = bundle / TENSOR_CACHE
    if not isinstance(shard, dict):
        raise UserError(
            f"{cache} has a shard entry that is not an object; run `mlc-edge convert` again"
        )
    name, nbytes = shard.get("dataPath"), shard.get("nbytes")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise UserError(
            f"{cache} names shard {name!r}, not a file name in the bundle; "
            "run `mlc-edge convert` again"
        )
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise UserError(
            f"{cache} gives shard {name} the size {nbytes!r}; run `mlc-edge convert` again"
        )
    return bundle / name, nbytes


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def check_weights(bundle: Path, md5: bool = True) -> WeightCheck:
    """Every shard of ``bundle`` exists with its recorded size (and md5, when ``md5``).

    Raises ``UserError`` naming the first bad shard and its tensors.
    """
    bundle = Path(bundle)
    shards = layout.read_tensor_cache(bundle)["records"]
    total = 0
    for shard in shards:
        path, want = _shard_path(bundle, shard)
        try:
            have = path.stat().st_size
        except OSError as err:
            raise UserError(
                f"shard {path} ({_tensors(shard)}) cannot be read: {err.strerror}; {REDO}"
            ) from None
        if have != want:
            how = "truncated" if have < want else "longer than recorded"
            raise UserError(
                f"shard {path} is {how}: {have:,} bytes, but {TENSOR_CACHE} says "
                f"{want:,} ({_tensors(shard)}); {REDO}"
            )
        if md5:
            recorded = shard.get("md5sum")
            if not recorded:
                raise UserError(
                    f"{TENSOR_CACHE} records no md5 for shard {path}; run `mlc-edge convert` again"
                )
            try:
                actual = _md5(path)
            except OSError as err:
                raise UserError(f"shard {path} cannot be read: {err.strerror}; {REDO}") from None
            if actual != recorded:
                raise UserError(
                    f"shard {path} is corrupt: its md5 is {actual}, "
                    f"{TENSOR_CACHE} says {recorded} ({_tensors(shard)}); {REDO}"
                )
        total += want
    return WeightCheck(len(shards), total, md5)


@dataclass
class BeforeVerify:
    """What ``mlc-edge verify`` learns before compiling any kernel: the bundle's weights
    (checked), and why its library's kernels cannot be checked, if they cannot."""

    weights: WeightCheck | None
    kernels_not_checked: str | None

    def lines(self) -> list[str]:
        out = [self.weights.line()] if self.weights else []
        if self.kernels_not_checked:
            out.append(f"kernels: not checked: {self.kernels_not_checked}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.as_dict() if self.weights else None,
            "kernels": {"checked": False, "reason": self.kernels_not_checked},
            "passed": True,
        }


def before_verify(path: Path, target: str | None) -> BeforeVerify:
    """Check a bundle's weights (size and md5) first, whatever its target; then say
    whether its library is one ``verify`` can check (OpenCL kernels only)."""
    from ..compiler.targets import TARGETS

    path = Path(path)
    if not layout.is_bundle(path):
        return BeforeVerify(None, None)
    weights = check_weights(path) if layout.has_weights(path) else None
    libs = layout.libraries(path, layout.SHARED_LIBRARY)
    if target is None and libs:
        target = libs[0].target
    spec = TARGETS.get(target or "") or TARGETS.get((target or "").split(":")[0])
    if target is not None and (spec is None or spec.codegen != "opencl"):
        what = f"{layout.LIB_DIR}/{libs[0].name} is a {target} library" if libs else f"{target} is"
        return BeforeVerify(
            weights,
            (
                f"{what}, not an OpenCL one, and verify runs OpenCL kernels only; "
                "compile the bundle with --target android-opencl to check a phone's kernels"
            ),
        )
    return BeforeVerify(weights, None)
