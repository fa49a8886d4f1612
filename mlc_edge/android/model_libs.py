"""Phone bundles → the app's model libraries: one ``libmodel_android.a`` holding every
bundle's ``lib/<model_lib>.tar``, checked for each library's registration symbol, and the
merged ``mlc-app-config.json``.

A system library registers itself under its prefix with the symbol
``<model_lib>___tvm_ffi__library_bin`` (the app loads ``system://<model_lib>``); MLC's
``mlc_llm package`` checks the same symbol in the archive it makes.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import layout
from ..bundle.app_config import APP_CONFIG, placeholder_model_url
from ..errors import UserError

LIBRARY_SYMBOL_SUFFIX = "___tvm_ffi__library_bin"
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def library_symbol(model_lib: str) -> str:
    return f"{model_lib}{LIBRARY_SYMBOL_SUFFIX}"


@dataclass(frozen=True)
class PhoneModel:
    bundle: Path
    model_id: str
    model_lib: str
    library: Path  # lib/<model_lib>.tar
    target: str
    entry: dict[str, Any]  # the bundle's mlc-app-config.json entry
    metadata: dict[str, Any] | None  # the library's _metadata, when its build record has it


def read_phone_bundle(bundle: Path) -> tuple[PhoneModel | None, list[str]]:
    """A bundle compiled for a phone, or the one-line problems that make it unusable."""
    bundle = Path(bundle)
    if not layout.is_bundle(bundle):
        return None, [f"{bundle} is not a bundle (no {layout.CHAT_CONFIG})"]
    if not (bundle / APP_CONFIG).is_file():
        return None, [
            f"{bundle} has no {APP_CONFIG}: compile it for the phone (mlc-edge "
            f"compile {bundle} --target android-opencl)"
        ]
    try:
        entries = json.loads((bundle / APP_CONFIG).read_text())["model_list"]
        entry = entries[0]
        model_id, model_lib = str(entry["model_id"]), str(entry["model_lib"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None, [
            f"{bundle / APP_CONFIG} is not an app config with one model_list entry: "
            f"compile the bundle again"
        ]
    problems = []
    if not _PREFIX.fullmatch(model_lib):
        problems.append(
            f"{bundle}: model_lib '{model_lib}' is not a C identifier, so it "
            f"cannot prefix a system library: compile with --model-lib NAME"
        )
    library = layout.library_path(bundle, model_lib, layout.SYSTEM_LIBRARY)
    if not library.is_file():
        problems.append(
            f"{bundle} has no lib/{model_lib}.tar: compile it with --target android-opencl"
        )
    record = layout.read_library(library).record
    target = str(record.get("target", ""))
    if library.is_file() and not target.startswith("android-"):
        problems.append(
            f"{bundle}: lib/{model_lib}.tar was not compiled for a phone "
            f"(target '{target or 'unknown'}'): compile with --target android-opencl"
        )
    if problems:
        return None, problems
    model = PhoneModel(
        bundle.absolute(),
        model_id,
        model_lib,
        library.absolute(),
        target,
        entry,
        record.get("metadata"),
    )
    return model, []


def check_unique(models: list[PhoneModel]) -> list[str]:
    """Two libraries in one app need distinct prefixes (and the app distinct ids)."""
    problems = []
    seen_lib: dict[str, Path] = {}
    seen_id: dict[str, Path] = {}
    for m in models:
        if m.model_lib in seen_lib:
            problems.append(
                f"{m.bundle} and {seen_lib[m.model_lib]} have the same model_lib "
                f"'{m.model_lib}': compile one again with another --model-lib"
            )
        else:
            for other, where in seen_lib.items():
                a, b = sorted((other, m.model_lib), key=len)
                if b.startswith(a + "_"):
                    problems.append(
                        f"model_lib '{a}' ({where if a == other else m.bundle}) is a prefix of "
                        f"'{b}': their symbols could collide; compile one with another "
                        f"--model-lib"
                    )
            seen_lib[m.model_lib] = m.bundle
        if m.model_id in seen_id:
            problems.append(
                f"{m.bundle} and {seen_id[m.model_id]} have the same model_id "
                f"'{m.model_id}': rename one bundle folder and compile it again"
            )
        else:
            seen_id[m.model_id] = m.bundle
    return problems


def pack_commands(
    models: list[PhoneModel], objects_dir: Path, archive: Path, llvm_ar: Path
) -> tuple[list[tuple[Path, str, Path]], list[str]]:
    """What packing does: each tar member extracted as ``<model_lib>_<member>`` (every tar
    has a ``lib0.o``), then one ``llvm-ar`` over all. Returns (extractions, ar argv)."""
    extractions = []
    for m in models:
        with tarfile.open(m.library) as tf:
            for name in tf.getnames():
                if name.endswith(".o"):
                    extractions.append((m.library, name, objects_dir / f"{m.model_lib}_{name}"))
    argv = [str(llvm_ar), "rcs", str(archive), *(str(dst) for *_, dst in extractions)]
    return extractions, argv


def pack(
    models: list[PhoneModel], archive: Path, llvm_ar: Path, llvm_nm: Path, work: Path
) -> list[str]:
    """Write ``archive`` (``libmodel_android.a``) from the models' tars and check that each
    library's symbol is defined in it; returns the symbols found."""
    objects = work / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    extractions, argv = pack_commands(models, objects, archive, llvm_ar)
    for tar, member, dst in extractions:
        with tarfile.open(tar) as tf:
            source = tf.extractfile(member)
            assert source is not None
            dst.write_bytes(source.read())
    archive.unlink(missing_ok=True)  # "r" would add to an old archive
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"{llvm_ar} failed: {(res.stderr.strip().splitlines() or ['?'])[0]}")
    return check_library_symbols(archive, [m.model_lib for m in models], llvm_nm)


def defined_symbols(archive: Path, llvm_nm: Path) -> set[str]:
    res = subprocess.run(
        [str(llvm_nm), "--defined-only", "-g", str(archive)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise UserError(
            f"{llvm_nm} failed on {archive}: {(res.stderr.strip().splitlines() or ['?'])[0]}"
        )
    return {line.split()[-1] for line in res.stdout.splitlines() if len(line.split()) >= 3}


def check_library_symbols(archive: Path, model_libs: list[str], llvm_nm: Path) -> list[str]:
    """Every model library's registration symbol, as MLC's packager checks it."""
    symbols = defined_symbols(archive, llvm_nm)
    found = {s.removeprefix("_") for s in symbols if s.endswith(LIBRARY_SYMBOL_SUFFIX)}
    missing = [lib for lib in model_libs if library_symbol(lib) not in found]
    if missing:
        have = sorted(s.removesuffix(LIBRARY_SYMBOL_SUFFIX) for s in found)
        raise UserError(
            f"{archive.name} lacks {library_symbol(missing[0])} (libraries in it: "
            f"{', '.join(have) or 'none'}): compile that bundle again"
        )
    return sorted(library_symbol(lib) for lib in model_libs)


def merged_app_config(
    models: list[PhoneModel], model_urls: dict[str, str] | None = None
) -> dict[str, Any]:
    """The app's ``mlc-app-config.json``: one entry per model with every field MLCChat's
    ``ModelRecord`` reads (``model_id``, ``model_lib``, ``model_url``, ``estimated_vram_bytes``).
    """
    model_urls = model_urls or {}
    entries = []
    for m in models:
        url = (
            model_urls.get(m.model_id)
            or m.entry.get("model_url")
            or placeholder_model_url(m.model_id)
        )
        entries.append(
            {
                "model_id": m.model_id,
                "model_lib": m.model_lib,
                "model_url": url,
                "estimated_vram_bytes": int(m.entry["estimated_vram_bytes"]),
            }
        )
    ids = [e["model_id"] for e in entries]
    if len(set(ids)) != len(ids):  # the app aborts on a repeated id (require in addModelConfig)
        raise UserError(f"model ids repeat in the app config: {ids}")
    return {"model_list": entries}
