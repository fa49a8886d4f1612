"""The two source trees of the build: TVM (must be the wheel's own commit) and mlc-llm (at
the pinned commit, with our patches).

The runtime in the APK runs libraries compiled by the installed ``apache-tvm`` wheel, so it
must be built from the same TVM source: an older runtime fails on the VM bytecode, the
attention kernels or ``TVMFFIHandleInitOnce`` ("expects N arguments" on the phone). The
wheel ships its runtime sources (``tvm/src/runtime``, ``tvm/include``); a TVM tree whose
copies of those files hash the same is the right one.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .pins import SeriesEntry, app_layout, pins, read_series

# Files of a TVM tree that the mlc4j build compiles or includes beyond the wheel's runtime
# sources: the OpenCL runtime, tvm-ffi (a submodule), the JNI glue, the OpenCL headers.
TVM_BUILD_FILES = (
    "src/backend/opencl/runtime/opencl_module.cc",
    "3rdparty/tvm-ffi/src/ffi/init_once.cc",
    "3rdparty/tvm-ffi/3rdparty/dlpack/include/dlpack/dlpack.h",
    "3rdparty/OpenCL-Headers/CL/cl.h",
    "jvm/native/src/main/native/org_apache_tvm_native_c_api.cc",
)


def wheel_root() -> Path:
    import tvm

    return Path(tvm.__file__).parent


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wheel_runtime_sources(root: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of the runtime sources the wheel ships."""
    root = root or wheel_root()
    return {
        str(p.relative_to(root)): _sha256(p)
        for sub in ("src", "include")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file() and p.suffix in (".cc", ".h")
    }


def check_tvm_source(tree: Path | None, reference: dict[str, str] | None = None) -> list[str]:
    """Problems with ``tree`` as the TVM source of the runtime (empty: it is the wheel's)."""
    commit = pins()["tvm"]["commit"]
    get = (
        f"git clone https://github.com/apache/tvm && git checkout {commit} && "
        "git submodule update --init --recursive"
    )
    if tree is None:
        return [
            f"no TVM source tree: set TVM_SOURCE_DIR or --tvm-source to a checkout of TVM "
            f"{commit} (the installed wheel's commit; {get})"
        ]
    if not (tree / "src" / "runtime").is_dir():
        return [f"TVM source {tree} has no src/runtime: point it at a TVM checkout ({get})"]
    reference = wheel_runtime_sources() if reference is None else reference
    differ = [
        rel
        for rel, digest in reference.items()
        if not (tree / rel).is_file() or _sha256(tree / rel) != digest
    ]
    problems = []
    if differ:
        problems.append(
            f"TVM source {tree} is not the installed wheel's TVM ({commit}): {len(differ)} of "
            f"{len(reference)} runtime files differ or are missing (e.g. {differ[0]}); "
            f"check out {commit} there"
        )
    missing = [rel for rel in TVM_BUILD_FILES if not (tree / rel).is_file()]
    if missing:
        problems.append(
            f"TVM source {tree} lacks {', '.join(missing)}: run git submodule "
            f"update --init --recursive there"
        )
    return problems


def git(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=120
    )


@dataclass(frozen=True)
class PatchState:
    entry: SeriesEntry
    state: str  # "applies", "applied" or "conflicts"
    detail: str = ""


def patch_states(tree: Path) -> list[PatchState]:
    """Whether each patch of the series applies to ``tree``, is already applied, or neither."""
    states = []
    for entry in read_series().entries:
        forward = git(tree, "apply", "--check", str(entry.path))
        if forward.returncode == 0:
            states.append(PatchState(entry, "applies"))
            continue
        reverse = git(tree, "apply", "--check", "--reverse", str(entry.path))
        if reverse.returncode == 0:
            states.append(PatchState(entry, "applied"))
        else:
            first = (forward.stderr.strip().splitlines() or ["git apply failed"])[0]
            states.append(PatchState(entry, "conflicts", first))
    return states


def check_mlc_llm(tree: Path | None) -> list[str]:
    """Problems with ``tree`` as the mlc-llm checkout: the pinned commit, the submodules
    the build uses, the app sources, and our patches applying (or applied)."""
    commit = pins()["mlc_llm"]["commit"]
    get = (
        f"git clone https://github.com/mlc-ai/mlc-llm && git checkout {commit[:8]} && "
        "git submodule update --init --recursive 3rdparty/tokenizers-cpp 3rdparty/xgrammar "
        "3rdparty/argparse 3rdparty/stb"
    )
    if tree is None:
        return [f"no mlc-llm checkout: set MLC_LLM_SOURCE_DIR or --mlc-llm-source ({get})"]
    if not (tree / "android" / "mlc4j" / "CMakeLists.txt").is_file():
        return [f"{tree} is not an mlc-llm checkout (no android/mlc4j/CMakeLists.txt): {get}"]
    problems = []
    head = git(tree, "rev-parse", "HEAD")
    if head.returncode != 0:
        problems.append(f"{tree} is not a git checkout: the patches need one ({get})")
        return problems
    if head.stdout.strip() != commit:
        problems.append(
            f"mlc-llm checkout {tree} is at {head.stdout.strip()[:12]}, the "
            f"patches are for {commit[:12]}: git -C {tree} checkout {commit[:8]}"
        )
    layout = app_layout()
    for rel in (layout["app_source"] + "/gradlew", layout["app_source"] + "/settings.gradle"):
        if not (tree / rel).is_file():
            problems.append(f"mlc-llm checkout {tree} lacks {rel}: check out {commit[:8]} again")
    wanted = [*pins()["mlc_llm"]["submodules"], *pins()["mlc_llm"]["nested_submodules"]]
    empty: set[str] = set()
    for sub in wanted:
        top = "/".join(sub.split("/")[:2])
        if sub in pins()["mlc_llm"]["not_needed"] or top in empty:
            continue  # one line for a submodule and the ones nested in it
        if not (tree / sub).is_dir() or not any((tree / sub).iterdir()):
            empty.add(top)
            problems.append(
                f"mlc-llm submodule {sub} is empty: git -C {tree} submodule "
                f"update --init --recursive {top}"
            )
    for state in patch_states(tree):
        if state.state == "conflicts":
            problems.append(
                f"patch {state.entry.name} does not apply to {tree} "
                f"({state.detail}): start from a clean checkout of {commit[:8]}"
            )
    return problems


def apply_patches(tree: Path) -> list[str]:
    """Apply the patches not yet applied (idempotent); returns the names applied now."""
    applied = []
    for state in patch_states(tree):
        if state.state == "applied":
            continue
        res = git(tree, "apply", str(state.entry.path))
        if res.returncode != 0:
            from ..errors import UserError

            raise UserError(
                f"patch {state.entry.name} failed on {tree}: "
                f"{(res.stderr.strip().splitlines() or ['git apply failed'])[0]}"
            )
        applied.append(state.entry.name)
    return applied
