"""A bundle's layout, for every command that reads one (and the writers' file names).

A bundle is a folder holding::

    mlc-chat-config.json        the model config, runtime sizes, conversation template
    tokenizer.json ...          the tokenizer files
    tensor-cache.json           the weights' records; params_shard_N.bin hold the bytes
    lib/<model_lib>.so          a library this machine loads (cpu, cuda), or
    lib/<model_lib>.tar         a system library for the phone (android-opencl)
    lib/<model_lib>.json        ours only: the build record (target, device, _metadata)

``docs/runtime-contract.md`` says which of these MLC's runtime reads. A path given to
``memory`` or ``verify`` is a bundle (it has ``mlc-chat-config.json``), a Hugging Face
model folder (it has ``config.json``) or a ``config.json`` itself.

Reading only: importing this loads neither TVM nor the bundle's writers, so the runner
(``mlc_edge.runtime``) uses it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

CHAT_CONFIG = "mlc-chat-config.json"
TENSOR_CACHE = "tensor-cache.json"
TOKENIZER = "tokenizer.json"
HF_CONFIG = "config.json"
LIB_DIR = "lib"
# The two kinds of library ``compile`` writes (``TargetSpec.lib_suffix``).
SHARED_LIBRARY = ".so"  # loaded with dlopen: runs on this machine
SYSTEM_LIBRARY = ".tar"  # objects linked into the phone app
LIBRARY_SUFFIXES = (SHARED_LIBRARY, SYSTEM_LIBRARY)
# What a library without a build record (compiled before records existed) is taken to be.
_UNRECORDED = {
    SHARED_LIBRARY: {"target": "cpu", "device": "cpu"},
    SYSTEM_LIBRARY: {"target": "android-opencl", "device": "opencl"},
}


def shard_file_name(index: int) -> str:
    """The weights' ``index``-th shard file (its records are in ``tensor-cache.json``)."""
    return f"params_shard_{index}.bin"


def is_shard_file(name: str) -> bool:
    return re.fullmatch(r"params_shard_\d+\.bin", name) is not None


def is_bundle(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CHAT_CONFIG).is_file()


def has_weights(bundle: Path) -> bool:
    return (Path(bundle) / TENSOR_CACHE).is_file()


def read_json_file(path: Path) -> Any:
    """A JSON file, or one line saying why it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


# -- mlc-chat-config.json ------------------------------------------------------------------


def read_chat_config(bundle: Path) -> dict[str, Any]:
    """The bundle's ``mlc-chat-config.json``; one line when ``bundle`` is not a bundle."""
    path = Path(bundle) / CHAT_CONFIG
    if not path.is_file():
        raise UserError(f"{bundle} is not a bundle: it has no {CHAT_CONFIG}")
    return read_json_file(path)


# -- a bundle, a model folder or a config.json ------------------------------------------------


def read_config_json(path: Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` at ``path``, or in the model folder ``path``."""
    path = Path(path)
    file = path / HF_CONFIG if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"{path}: give a bundle (with {CHAT_CONFIG}), a Hugging Face model "
            f"folder or a {HF_CONFIG}"
        )
    return read_json_file(file)


def read_model_config(path: Path) -> dict[str, Any]:
    """The Hugging Face config of a bundle (its ``model_config``), a model folder or a
    ``config.json``."""
    if is_bundle(path):
        return dict(read_chat_config(path)["model_config"])
    return read_config_json(path)


# -- tensor-cache.json ----------------------------------------------------------------------


def read_tensor_cache(bundle: Path) -> dict[str, Any]:
    """The parsed ``tensor-cache.json`` of a bundle (its format and shards:
    ``mlc_edge.convert.tensor_cache``)."""
    path = Path(bundle) / TENSOR_CACHE
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} is missing; {bundle} is not a converted bundle: convert the model first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} cannot be read ({err}); convert the model again") from None
    if not isinstance(cache, dict) or not isinstance(cache.get("records"), list):
        raise UserError(f"{path} has no records list; convert the model again")
    return cache


def tensor_records(bundle: Path) -> list[dict[str, Any]]:
    """Every tensor's record (name, shape, dtype, nbytes, ...), shard after shard."""
    return [r for shard in read_tensor_cache(bundle)["records"] for r in shard["records"]]


def weight_totals(bundle: Path) -> tuple[int, int]:
    """(parameters, bytes) of the bundle's weights, as ``convert`` recorded them."""
    meta = read_tensor_cache(bundle)["metadata"]
    return int(meta["ParamSize"]), int(meta["ParamBytes"])


# -- lib/ -------------------------------------------------------------------------------------


def library_path(bundle: Path, model_lib: str, suffix: str) -> Path:
    """Where ``compile`` writes the library ``model_lib`` (``suffix``: .so or .tar)."""
    return Path(bundle) / LIB_DIR / f"{model_lib}{suffix}"


def build_record_path(library: Path) -> Path:
    """``lib/<model_lib>.json``, the build record beside a library."""
    return Path(library).with_suffix(".json")


@dataclass(frozen=True)
class Library:
    """A library of a bundle and what its build record says of it."""

    path: Path
    record: dict[str, Any]  # lib/<model_lib>.json; {} when the library has none

    @property
    def model_lib(self) -> str:
        return self.path.stem

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_record(self) -> bool:
        return bool(self.record)

    @property
    def target(self) -> str:
        """The target it was compiled for (``cpu``, ``cuda``, ``android-opencl:...``)."""
        return str(self.record.get("target") or _UNRECORDED[self.path.suffix]["target"])

    @property
    def device(self) -> str:
        """TVM's device name of that target (``cpu``, ``cuda``, ``opencl``)."""
        return str(self.record.get("device") or _UNRECORDED[self.path.suffix]["device"])

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The library's ``_metadata``, kept in the build record (a phone library does
        not load here)."""
        return self.record.get("metadata")


def read_library(path: Path) -> Library:
    record = build_record_path(path)
    return Library(Path(path), read_json_file(record) if record.is_file() else {})


def libraries(bundle: Path, suffix: str | None = None) -> list[Library]:
    """The bundle's libraries (``lib/*.so``, ``lib/*.tar``; only ``suffix`` when given),
    by name. A bundle compiled for two targets holds one of each."""
    folder = Path(bundle) / LIB_DIR
    if not folder.is_dir():
        return []
    suffixes = (suffix,) if suffix else LIBRARY_SUFFIXES
    paths = sorted(p for s in suffixes for p in folder.glob(f"*{s}"))
    return [read_library(p) for p in paths]


def runnable_library(bundle: Path) -> Library:
    """The one library of ``bundle`` this machine can load (``.so``), or one line
    saying why there is none."""
    bundle = Path(bundle)
    found = libraries(bundle, SHARED_LIBRARY)
    if not found:
        phone = libraries(bundle, SYSTEM_LIBRARY)
        if phone:
            raise UserError(
                f"{bundle} was compiled for a phone ({phone[0].name}); compile it with "
                "--target cpu to run it here"
            )
        raise UserError(f"no compiled library in {bundle}/{LIB_DIR}: run `mlc-edge compile` first")
    if len(found) > 1:
        raise UserError(
            f"several libraries in {bundle}/{LIB_DIR}: keep one of {[lib.name for lib in found]}"
        )
    return found[0]
