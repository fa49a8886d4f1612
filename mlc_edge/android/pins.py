"""The versions the Android build needs (``patches/pins.json``), the patch series
(``patches/series``) and the app layout (``android_app/app.json``), as shipped in the package
(``mlc_edge.patches``, ``mlc_edge.android_app``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any


def patches_dir() -> Path:
    return Path(str(resources.files("mlc_edge.patches")))


@cache
def pins() -> dict[str, Any]:
    return json.loads((patches_dir() / "pins.json").read_text())


@cache
def app_layout() -> dict[str, Any]:
    return json.loads(resources.files("mlc_edge.android_app").joinpath("app.json").read_text())


@dataclass(frozen=True)
class SeriesEntry:
    name: str
    files: tuple[str, ...]  # as the series file names them
    path: Path


@dataclass(frozen=True)
class Series:
    base_commit: str
    entries: tuple[SeriesEntry, ...]


_BASE = re.compile(r"^#\s*base:\s*mlc-llm\s+([0-9a-f]{7,40})\s*$")
_FILES = re.compile(r"^#\s*files:\s*(.+)$")


def read_series(directory: Path | None = None) -> Series:
    """``series``: one patch name a line, each followed by ``#   files: ...`` (and what/why)
    comment lines; a ``# base: mlc-llm <commit>`` line names the commit they apply to."""
    directory = directory or patches_dir()
    base = ""
    names: list[str] = []
    files: dict[str, tuple[str, ...]] = {}
    for line in (directory / "series").read_text().splitlines():
        line = line.strip()
        if m := _BASE.match(line):
            base = m.group(1)
        elif (m := _FILES.match(line)) and names:
            files[names[-1]] = tuple(m.group(1).split())
        elif line and not line.startswith("#"):
            names.append(line)
    entries = tuple(SeriesEntry(n, files.get(n, ()), directory / n) for n in names)
    return Series(base, entries)


_DIFF_TARGET = re.compile(r"^\+\+\+ b/(\S+)$", re.MULTILINE)


def patch_targets(patch: Path) -> list[str]:
    """The files a unified diff changes (its ``+++ b/...`` lines)."""
    return _DIFF_TARGET.findall(patch.read_text())
