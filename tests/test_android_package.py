"""From bundle to phone: patches/, the preflight, packing, the app config, the build's
steps and `push`. No NDK, SDK, Gradle or phone here: the tools are fake folders and
scripts, except llvm-ar/llvm-nm (Debian's LLVM 14, as the NDK's) which pack a real .tar.

MLC_LLM_SOURCE_DIR (an mlc-llm checkout) adds `git apply --check` of the patches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import compile_bundle, one_error_line
from tiny_models import make_llama

from mlc_edge.android import package as package_mod
from mlc_edge.android.model_libs import (
    LIBRARY_SYMBOL_SUFFIX,
    check_library_symbols,
    check_unique,
    merged_app_config,
    pack,
    read_phone_bundle,
)
from mlc_edge.android.pins import patch_targets, patches_dir, pins, read_series
from mlc_edge.android.sources import (
    TVM_BUILD_FILES,
    apply_patches,
    check_mlc_llm,
    check_tvm_source,
    patch_states,
    wheel_root,
    wheel_runtime_sources,
)
from mlc_edge.android.toolchain import NDK_HOST, find_toolchain
from mlc_edge.cli import main
from mlc_edge.errors import UserError

LIB = "tiny"  # TVM 0.27 mishandles system-library prefixes of 8+ characters
LLVM_AR, LLVM_NM = Path("/usr/bin/llvm-ar-14"), Path("/usr/bin/llvm-nm-14")
NDK = pins()["android"]["ndk"]
URL = "https://huggingface.co/me/tiny-MLC"


def llvm_missing() -> str | None:
    """Why llvm-ar/llvm-nm 14 are missing; CI installs them and sets MLC_EDGE_REQUIRE_LLVM=1,
    where their absence is an error, not a skip."""
    if LLVM_AR.is_file() and LLVM_NM.is_file():
        return None
    if os.environ.get("MLC_EDGE_REQUIRE_LLVM") == "1":
        raise RuntimeError("MLC_EDGE_REQUIRE_LLVM=1 but /usr/bin/llvm-ar-14 is missing")
    return "no /usr/bin/llvm-ar-14 (apt-get install llvm-14, as .ci/run does)"


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def phone_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phone")
    make_llama(root / "hf")
    return compile_bundle(
        root / "hf",
        root / "tiny-phone",
        "--target",
        "android-opencl",
        "--model-lib",
        LIB,
        "--model-url",
        URL,
    )


# -- patches/ ---------------------------------------------------------------------------------


def _hunks_are_consistent(text: str) -> bool:
    """Each hunk's line counts match its header (a hand-edited patch breaks this)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", lines[i])
        i += 1
        if not m:
            continue
        old, new = int(m.group(1) or 1), int(m.group(2) or 1)
        while old > 0 or new > 0:
            line = lines[i]
            i += 1
            if line.startswith("-"):
                old -= 1
            elif line.startswith("+"):
                new -= 1
            elif line.startswith(" ") or line == "":
                old, new = old - 1, new - 1
            elif line.startswith("\\"):
                continue
            else:
                return False
        if old or new:
            return False
    return True


def test_patches_are_well_formed_and_agree_with_series_and_pins():
    series = read_series()
    on_disk = sorted(p.name for p in patches_dir().glob("*.patch"))
    assert sorted(e.name for e in series.entries) == on_disk and on_disk
    for entry in series.entries:
        text = entry.path.read_text()
        targets = patch_targets(entry.path)
        assert targets and sorted(entry.files) == sorted(targets), entry.name  # series names them
        assert all(f"diff --git a/{t} b/{t}" in text for t in targets)
        assert _hunks_are_consistent(text), entry.name
    # The series' base commit is the pinned one; the pins name the wheel's own TVM/tvm-ffi.
    assert pins()["mlc_llm"]["commit"].startswith(series.base_commit)
    import tvm_ffi
    from tvm import _version as tvm_version

    assert tvm_version.commit_id.lstrip("g").startswith(pins()["tvm"]["commit"])
    assert pins()["tvm"]["wheel"] == f"apache-tvm=={tvm_version.version}"
    assert tvm_ffi._version.commit_id.lstrip("g").startswith(pins()["tvm_ffi"]["commit"])
    assert NDK == "27.0.11718014" and pins()["android"]["jdk"] == 17
    # What the patches do, in the words of the series: the floor and the runtime list.
    floor, runtime = (e.path.read_text() for e in series.entries)
    assert "+#define MLC_OPENCL_MIN_GLOBAL_MEMORY_GB 16" in floor
    assert "set(MLC_OPENCL_MIN_GLOBAL_MEMORY_GB 16 CACHE" in floor
    assert "+#include <ffi/init_once.cc>" in runtime
    assert "-#include <runtime/opencl/opencl_module.cc>" in runtime
    assert "+#include <backend/opencl/runtime/opencl_module.cc>" in runtime
    assert "-  throw InternalError(" in runtime


def test_runtime_list_names_files_of_the_wheels_tvm():
    """Every TVM runtime file the patched tvm_runtime.h adds is one the wheel ships (those
    it ships), and every file it removes is gone from the wheel."""
    text = (patches_dir() / "0002-mlc4j-tvm-0.27-runtime.patch").read_text()
    shipped = set(wheel_runtime_sources())
    added = re.findall(r"^\+#include <(runtime/\S+\.cc)>", text, re.MULTILINE)
    removed = re.findall(r"^-#include <(runtime/\S+\.cc)>", text, re.MULTILINE)
    assert added and removed
    assert all(f"src/{f}" in shipped for f in added), added
    assert not any(f"src/{f}" in shipped for f in removed), removed
    import tvm_ffi

    ffi_src = Path(tvm_ffi.__file__).parent / "src"
    for f in re.findall(r"^\+#include <(ffi/\S+\.cc)>", text, re.MULTILINE):
        assert (ffi_src / f).is_file(), f


@pytest.fixture
def mlc_llm_source() -> Path:
    source = os.environ.get("MLC_LLM_SOURCE_DIR")
    if not source:
        pytest.skip("MLC_LLM_SOURCE_DIR is not set: git apply --check needs an mlc-llm checkout")
    return Path(source)


def test_patches_apply_to_the_mlc_llm_checkout(mlc_llm_source):
    states = {s.entry.name: s.state for s in patch_states(mlc_llm_source)}
    assert set(states.values()) in ({"applies"}, {"applied"}), states


def test_patch_application_is_idempotent(mlc_llm_source, tmp_path):
    """The patched files, copied from the checkout into a fresh repository: the first run
    applies both, the second none; a changed file is refused in one line."""
    tree = tmp_path / "mlc"
    for entry in read_series().entries:
        for rel in entry.files:
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mlc_llm_source / rel, tree / rel)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    if {s.state for s in patch_states(tree)} == {"applied"}:  # a checkout already patched
        for entry in reversed(read_series().entries):
            subprocess.run(["git", "-C", str(tree), "apply", "-R", str(entry.path)], check=True)
    assert apply_patches(tree) == [e.name for e in read_series().entries]
    assert "MLC_OPENCL_MIN_GLOBAL_MEMORY_GB" in (tree / "cpp/serve/config.cc").read_text()
    assert apply_patches(tree) == []
    (tree / "cpp/serve/config.cc").write_text("changed\n")
    (state,) = [s for s in patch_states(tree) if s.state == "conflicts"]
    assert state.entry.name.startswith("0001") and "\n" not in state.detail


# -- preflight with fake tools -----------------------------------------------------------------


def fake_tools(
    root: Path,
    *,
    ndk: str = NDK,
    platforms: tuple[str, ...] = ("android-34", "android-35"),
    java: str = "17.0.9",
    cmake: str = "3.28.3",
    ninja: bool = True,
    rust_targets: str = "aarch64-linux-android",
) -> dict[str, str]:
    """An NDK, SDK, JDK and PATH made of folders and scripts; returns the environment."""
    ndk_dir = root / "ndk"
    (ndk_dir / "build" / "cmake").mkdir(parents=True)
    (ndk_dir / "source.properties").write_text(f"Pkg.Desc = Android NDK\nPkg.Revision = {ndk}\n")
    (ndk_dir / "build" / "cmake" / "android.toolchain.cmake").write_text("# fake\n")
    llvm = ndk_dir / "toolchains" / "llvm" / "prebuilt" / NDK_HOST / "bin"
    llvm.mkdir(parents=True)
    for name, real in (("llvm-ar", LLVM_AR), ("llvm-nm", LLVM_NM)):
        (llvm / name).symlink_to(real)
    sdk = root / "sdk"
    for p in platforms:
        (sdk / "platforms" / p).mkdir(parents=True)
        (sdk / "platforms" / p / "android.jar").write_text("")
    jdk = root / "jdk"
    script(jdk / "bin" / "java", f"echo 'openjdk version \"{java}\" 2023-10-17' >&2")
    script(jdk / "bin" / "javac", "exit 0")
    bin_dir = root / "bin"
    script(bin_dir / "cmake", f"echo 'cmake version {cmake}'")
    if ninja:
        script(bin_dir / "ninja", "echo 1.11.1")
    script(bin_dir / "rustup", f"echo '{rust_targets}'")
    script(bin_dir / "cargo", "exit 0")
    for tool in ("git", "tar", "mkdir", "test"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {
        "ANDROID_NDK": str(ndk_dir),
        "ANDROID_HOME": str(sdk),
        "JAVA_HOME": str(jdk),
        "PATH": str(bin_dir),
        "HOME": str(root),
    }


def test_preflight_gives_one_line_per_problem(tmp_path):
    good = find_toolchain(fake_tools(tmp_path / "good"))
    assert [t.problem for t in good.build_tools()] == [None] * 6

    bad = find_toolchain(
        fake_tools(
            tmp_path / "bad",
            ndk="26.1.10909125",
            platforms=("android-34",),
            java="11.0.2",
            cmake="4.1.0",
            ninja=False,
            rust_targets="x86_64-unknown-linux-gnu",
        )
    )
    problems = [t.problem for t in bad.build_tools()]
    expected = [
        r"NDK 26\.1\.10909125, the build needs 27\.0\.11718014",
        r"android-35 missing.*sdkmanager \"platforms;android-35\"",
        r"Java 11\.0\.2.*JDK 17",
        r"CMake 4\.1\.0 .*outside",
        r"Ninja not found",
        r"rustup target add aarch64-linux-android",
    ]
    assert len(problems) == len(expected)
    for problem, pattern in zip(problems, expected, strict=True):
        assert problem and "\n" not in problem and re.search(pattern, problem), problem

    nothing = find_toolchain({"PATH": str(tmp_path / "empty")})
    assert all(t.problem and "\n" not in t.problem for t in nothing.all())


def test_package_refuses_with_each_problem_on_one_error_line(
    phone_bundle, tmp_path, monkeypatch, capsys
):
    env = fake_tools(tmp_path / "tools", java="11.0.2", ninja=False)
    for key in ("ANDROID_NDK_HOME", "ANDROID_SDK_ROOT", "MLC_LLM_SOURCE_DIR", "TVM_SOURCE_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist = tmp_path / "dist"
    with pytest.raises(SystemExit) as e:
        main(["package", str(phone_bundle), str(tmp_path / "not-a-bundle"), "-o", str(dist)])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [line for line in lines if "memory plan" not in line and "Warning" not in line]
    for pattern in (
        r"JDK 17",
        r"Ninja",
        r"no mlc-llm checkout.*MLC_LLM_SOURCE_DIR",
        r"no TVM source tree.*TVM_SOURCE_DIR",
        r"not-a-bundle is not a bundle",
    ):
        assert len([x for x in errors if re.search(pattern, x)]) == 1, (pattern, errors)
    assert len(errors) == 5
    assert not dist.exists() and not list(tmp_path.glob(".dist.partial-*"))


def test_mlc_llm_checkout_problems_one_line_each(tmp_path):
    mlc = fake_mlc_llm(tmp_path)
    subprocess.run(["git", "init", "-q", str(mlc)], check=True)
    git = ["git", "-C", str(mlc), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "not the pinned commit"], check=True)
    (mlc / "3rdparty" / "tokenizers-cpp").mkdir(parents=True)  # initialized, but empty
    problems = check_mlc_llm(mlc)
    assert all("\n" not in p for p in problems)
    assert len([p for p in problems if "the patches are for 79d603f085f5" in p]) == 1
    empty = [p for p in problems if "is empty" in p]
    # argparse, stb, tokenizers-cpp (its nested submodules not repeated), xgrammar
    assert len(empty) == 4 and "--recursive 3rdparty/tokenizers-cpp" in " ".join(empty)
    assert len([p for p in problems if "does not apply" in p]) == len(read_series().entries)
    assert "no mlc-llm checkout" in check_mlc_llm(None)[0]
    assert "is not an mlc-llm checkout" in check_mlc_llm(tmp_path / "tools")[0]


# -- the TVM source tree -------------------------------------------------------------------------


def test_tvm_source_check_accepts_the_wheels_sources_and_refuses_others(tmp_path):
    reference = wheel_runtime_sources()
    assert any(p.startswith("src/runtime/vm/") for p in reference)
    tree = tmp_path / "tvm"
    for sub in ("src", "include"):
        shutil.copytree(wheel_root() / sub, tree / sub)
    for rel in TVM_BUILD_FILES:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("")
    assert check_tvm_source(tree, reference) == []

    vm = tree / "src" / "runtime" / "vm" / "vm.cc"
    vm.write_text(vm.read_text() + "// another TVM\n")
    (tree / "3rdparty" / "tvm-ffi" / "src" / "ffi" / "init_once.cc").unlink()
    problems = check_tvm_source(tree, reference)
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert "1 of" in problems[0] and "src/runtime/vm/vm.cc" in problems[0]
    assert "init_once.cc" in problems[1]
    assert "no TVM source tree" in check_tvm_source(None, reference)[0]


# -- the model libraries -----------------------------------------------------------------------


@pytest.mark.skipif(llvm_missing() is not None, reason=str(llvm_missing()))
def test_pack_turns_the_tar_into_an_archive_with_the_library_symbol(phone_bundle, tmp_path):
    model, problems = read_phone_bundle(phone_bundle)
    assert problems == [] and model is not None and model.model_lib == LIB
    archive = tmp_path / "libmodel_android.a"
    assert pack([model], archive, LLVM_AR, LLVM_NM, tmp_path / "work") == [
        f"{LIB}{LIBRARY_SYMBOL_SUFFIX}"
    ]
    members = subprocess.run(
        [str(LLVM_AR), "t", str(archive)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(members) == [f"{LIB}_lib0.o", f"{LIB}_{LIB}_devc.o"]
    nm = subprocess.run(
        [str(LLVM_NM), "--defined-only", "-g", str(archive)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(rf"^\S+ R {LIB}___tvm_ffi__library_bin$", nm, re.MULTILINE)
    # A library whose prefix is not the one the app config names is refused, by name.
    with pytest.raises(UserError, match=r"lacks other___tvm_ffi__library_bin.*tiny"):
        check_library_symbols(archive, ["other"], LLVM_NM)


def test_two_bundles_with_one_prefix_are_refused(phone_bundle, tmp_path):
    twin = shutil.copytree(phone_bundle, tmp_path / "twin")
    models = [read_phone_bundle(b)[0] for b in (phone_bundle, twin)]
    problems = check_unique(models)
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert "same model_lib 'tiny'" in problems[0] and "same model_id" in problems[1]

    # A prefix that begins another ("tiny" / "tiny_x") is refused as well.
    cousin = shutil.copytree(phone_bundle, tmp_path / "cousin")
    (cousin / "lib" / f"{LIB}.tar").rename(cousin / "lib" / "tiny_x.tar")
    (cousin / "lib" / f"{LIB}.json").rename(cousin / "lib" / "tiny_x.json")
    config = json.loads((cousin / "mlc-app-config.json").read_text())
    config["model_list"][0].update(model_lib="tiny_x", model_id="cousin")
    (cousin / "mlc-app-config.json").write_text(json.dumps(config))
    models = [read_phone_bundle(b)[0] for b in (phone_bundle, cousin)]
    (problem,) = check_unique(models)
    assert "'tiny' " in problem and "prefix of 'tiny_x'" in problem

    bad = shutil.copytree(phone_bundle, tmp_path / "bad")
    config["model_list"][0].update(model_lib="9-lives")
    (bad / "mlc-app-config.json").write_text(json.dumps(config))
    _, problems = read_phone_bundle(bad)
    assert any("'9-lives' is not a C identifier" in p for p in problems)


def test_merged_app_config_parses_as_mlcchat_expects(phone_bundle):
    model, _ = read_phone_bundle(phone_bundle)
    assert model is not None
    config = json.loads(json.dumps(merged_app_config([model])))
    (entry,) = config["model_list"]
    # MLCChat's ModelRecord (gson): model_url, model_id, model_lib non-null Strings,
    # estimated_vram_bytes a Long.
    assert set(entry) == {"model_url", "model_id", "model_lib", "estimated_vram_bytes"}
    assert all(
        isinstance(entry[k], str) and entry[k] for k in ("model_url", "model_id", "model_lib")
    )
    assert isinstance(entry["estimated_vram_bytes"], int) and entry["model_lib"] == LIB
    assert entry["model_url"] == URL  # compile --model-url, kept from the bundle's entry
    # ModelConfig, read from the pushed folder: tokenizer_files, context/prefill sizes.
    chat = json.loads((phone_bundle / "mlc-chat-config.json").read_text())
    assert isinstance(chat["tokenizer_files"], list) and chat["tokenizer_files"]
    assert isinstance(chat["context_window_size"], int)
    assert isinstance(chat["prefill_chunk_size"], int)
    # A bundle made before model_url existed gets the placeholder; one given here wins.
    old = dataclasses.replace(
        model, entry={k: v for k, v in model.entry.items() if k != "model_url"}
    )
    (placeholder,) = merged_app_config([old])["model_list"]
    assert (
        placeholder["model_url"].startswith("https://") and ".invalid/" in placeholder["model_url"]
    )
    urls = merged_app_config([old], {model.model_id: "https://example.org/tiny"})
    assert urls["model_list"][0]["model_url"] == "https://example.org/tiny"
    with pytest.raises(UserError, match="model ids repeat"):
        merged_app_config([model, model])


def test_the_bundle_records_model_url_and_metadata(phone_bundle):
    entry = json.loads((phone_bundle / "mlc-app-config.json").read_text())["model_list"][0]
    assert entry["model_url"] == URL
    # The build record keeps _metadata, so package's memory verdict needs no recompile.
    record = json.loads((phone_bundle / "lib" / f"{LIB}.json").read_text())
    assert record["metadata"]["model_type"] == "llama" and record["metadata"]["memory_usage"]


def test_memory_verdict_uses_the_builds_floor(phone_bundle):
    """The tiny model (about 49 MiB) loads with the 16 GiB floor and not with 32 MiB on a
    phone that reports nothing: the verdict follows the floor the build compiles in."""
    model, _ = read_phone_bundle(phone_bundle)
    assert model is not None and model.metadata is not None
    ok = package_mod.memory_verdict(model, 16 << 30, reported=0)
    assert ok["loads"] and ok["floor_bytes"] == 16 << 30 and ok["context_fits"]
    low = package_mod.memory_verdict(model, 32 << 20, reported=0)
    assert not low["loads"] and low["kv_capacity_tokens"] <= 0
    assert low["loads_with_upstream_floor"]  # 5 GiB is plenty for it


# -- the build's steps, with fake CMake and Gradle ------------------------------------------------


def fake_mlc_llm(root: Path) -> Path:
    """The parts of an mlc-llm checkout the steps touch: MLCChat with a gradlew that makes
    an APK, mlc4j's sources."""
    mlc = root / "mlc-llm"
    app = mlc / "android" / "MLCChat"
    script(
        app / "gradlew",
        'echo "gradle $*"; mkdir -p app/build/outputs/apk/debug && '
        "test -f dist/lib/mlc4j/output/arm64-v8a/libtvm4j_runtime_packed.so && "
        "test -f dist/lib/mlc4j/src/main/assets/mlc-app-config.json && "
        "echo apk > app/build/outputs/apk/debug/app-debug.apk",
    )
    (app / "settings.gradle").write_text("include ':app'\n")
    (mlc / "android" / "mlc4j" / "src" / "cpp").mkdir(parents=True)
    (mlc / "android" / "mlc4j" / "build.gradle").write_text("// mlc4j\n")
    (mlc / "android" / "mlc4j" / "CMakeLists.txt").write_text("# mlc4j\n")
    return mlc


def fake_cmake(path: Path, fail_configure: bool = False) -> None:
    """Configure checks the traps' flags; install makes mlc4j's outputs."""
    script(
        path,
        f"""
case "$*" in
  *--version*) echo 'cmake version 3.28.3' ;;
  *"--target install"*) b="$2"; mkdir -p "$b/output/arm64-v8a";
      echo so > "$b/output/arm64-v8a/libtvm4j_runtime_packed.so";
      echo jar > "$b/output/tvm4j_core.jar" ;;
  *--build*) echo building ;;
  *) {'echo "CMake Error: fake failure"; exit 3' if fail_configure else "true"};
     case "$*" in *-DTVM_SOURCE_DIR=*) ;; *) echo "no TVM_SOURCE_DIR"; exit 4 ;; esac;
     case "$*" in *USE_CUSTOM_LOGGING*) echo "custom logging"; exit 5 ;; esac ;;
esac""",
    )


@pytest.fixture
def fake_build(phone_bundle, tmp_path, monkeypatch):
    """package() with preflight passing on fake tools (its checks have their own tests)."""
    if llvm_missing():
        pytest.skip(llvm_missing())
    env = fake_tools(tmp_path / "tools")
    mlc = fake_mlc_llm(tmp_path)
    opts = package_mod.PackageOptions(
        bundles=[phone_bundle],
        dist=tmp_path / "dist",
        mlc_llm_source=mlc,
        tvm_source=tmp_path / "tvm",
        env=env,
    )

    def preflight(o):
        model, _ = read_phone_bundle(phone_bundle)
        states = {e.name: "applied" for e in read_series().entries}
        return package_mod.Preflight(find_toolchain(env), [model], [{"loads": True}], states)

    monkeypatch.setattr(package_mod, "run_preflight", preflight)
    return opts, Path(env["PATH"]) / "cmake"


def test_package_runs_every_step_into_dist(fake_build, capsys):
    opts, cmake = fake_build
    fake_cmake(cmake)
    summary = package_mod.package(opts)
    dist = opts.dist
    assert sorted(p.name for p in dist.iterdir()) == [
        "lib",
        "mlc-app-config.json",
        "mlc-chat-debug.apk",
        "mlc4j",
        "package.json",
    ]
    assert (dist / "mlc4j" / "arm64-v8a" / "libtvm4j_runtime_packed.so").is_file()
    nm = subprocess.run(
        [str(LLVM_NM), "-g", str(dist / "lib" / "libmodel_android.a")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{LIB}___tvm_ffi__library_bin" in nm
    assert json.loads((dist / "package.json").read_text())["apk"] == summary["apk"]
    err = capsys.readouterr().err
    assert "[1/" in err and "build the APK (Gradle assembleDebug)" in err
    assert not list(dist.parent.glob(".dist.partial-*"))


def test_a_failed_step_leaves_no_dist(fake_build):
    opts, cmake = fake_build
    fake_cmake(cmake, fail_configure=True)
    with pytest.raises(UserError) as e:
        package_mod.package(opts)
    message = str(e.value)
    assert "\n" not in message and "configure mlc4j (CMake) failed (exit 3)" in message
    assert "CMake Error: fake failure" in message and "full log:" in message
    assert not opts.dist.exists() and not list(opts.dist.parent.glob(".dist.partial-*"))


def test_dry_run_lists_the_cmake_line_with_tvm_source_dir(
    phone_bundle, tmp_path, monkeypatch, capsys
):
    for key, value in fake_tools(tmp_path / "tools").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):  # the fake mlc-llm/TVM trees are problems: exit 1
        main(
            [
                "package",
                str(phone_bundle),
                "-o",
                str(tmp_path / "dist"),
                "--dry-run",
                "--json",
                "--mlc-llm-source",
                str(fake_mlc_llm(tmp_path)),
                "--tvm-source",
                str(tmp_path / "tvm"),
            ]
        )
    summary = json.loads(capsys.readouterr().out)
    commands = summary["commands"]
    (configure,) = [c for c in commands if " -S " in c]
    assert f"-DTVM_SOURCE_DIR={tmp_path / 'tvm'}" in configure
    assert "-DMLC_OPENCL_MIN_GLOBAL_MEMORY_GB=16" in configure and "-G Ninja" in configure
    assert not any("USE_CUSTOM_LOGGING" in c or "ENABLE_HOST_PTR" in c for c in commands)
    assert any("llvm-ar rcs" in c for c in commands)
    assert any(c.endswith("./gradlew --no-daemon assembleDebug)") for c in commands)
    assert summary["models"][0]["loads"] is True and summary["problems"]
    assert not (tmp_path / "dist").exists()


# -- push ------------------------------------------------------------------------------------------


def fake_dist(root: Path, bundle: Path) -> Path:
    dist = root / "dist"
    dist.mkdir()
    (dist / "mlc-chat-debug.apk").write_text("apk")
    record = {
        "apk": str(dist / "mlc-chat-debug.apk"),
        "models": [{"model_id": "tiny-phone", "model_lib": LIB, "bundle": str(bundle)}],
    }
    (dist / "package.json").write_text(json.dumps(record))
    return dist


def fake_adb(bin_dir: Path, log: Path, state: str = "device") -> None:
    script(
        bin_dir / "adb",
        f'echo "$*" >> {log}\ncase "$*" in *get-state*) echo {state}; [ {state} = device ] ;; esac',
    )


def test_push_issues_the_adb_commands_in_order(phone_bundle, tmp_path, monkeypatch, capsys):
    dist = fake_dist(tmp_path, phone_bundle)
    log = tmp_path / "adb.log"
    fake_adb(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    main(["push", str(dist), "--json"])
    files = "/storage/emulated/0/Android/data/ai.mlc.mlcchat/files"
    weights = sorted(
        p.name for p in phone_bundle.iterdir() if p.is_file() and p.name != "mlc-app-config.json"
    )
    assert "tensor-cache.json" in weights and "params_shard_0.bin" in weights
    pushed = " ".join(str(phone_bundle / w) for w in weights)
    assert log.read_text().splitlines() == [
        "get-state",
        f"install -r {dist / 'mlc-chat-debug.apk'}",
        f"shell mkdir -p {files}",
        f"shell rm -f {files}/mlc-app-config.json",  # the stale app config of an old install
        "shell rm -rf /data/local/tmp/tiny-phone",
        "shell mkdir -p /data/local/tmp/tiny-phone",
        f"push {pushed} /data/local/tmp/tiny-phone/",
        f"shell rm -rf {files}/tiny-phone",
        f"shell mv /data/local/tmp/tiny-phone {files}/tiny-phone",
    ]
    assert len(json.loads(capsys.readouterr().out)["commands"]) == 8


def test_push_without_a_phone_says_so_in_one_line(phone_bundle, tmp_path, monkeypatch, capsys):
    dist = fake_dist(tmp_path, phone_bundle)
    log = tmp_path / "adb.log"
    fake_adb(tmp_path / "bin", log, state="unknown")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as e:
        main(["push", str(dist)])
    assert e.value.code == 1
    assert one_error_line(capsys.readouterr().err).startswith("error: no phone for adb")
    assert log.read_text().splitlines() == ["get-state"]  # nothing else was attempted
    with pytest.raises(SystemExit):
        main(["push", str(tmp_path)])  # not a package output
    assert "no package.json" in capsys.readouterr().err


def test_targets_reports_the_android_build_tools(tmp_path, monkeypatch, capsys):
    for key, value in fake_tools(tmp_path / "tools").items():
        monkeypatch.setenv(key, value)
    main(["targets", "--json"])
    tools = {t["name"]: t for t in json.loads(capsys.readouterr().out)["android_build"]}
    assert set(tools) == {
        "Android NDK",
        "Android SDK",
        "JDK",
        "CMake",
        "Ninja",
        "Rust (aarch64-linux-android)",
        "adb",
    }
    assert tools["Android NDK"]["version"] == NDK and tools["CMake"]["version"] == "3.28.3"
    assert [n for n, t in tools.items() if t["problem"]] == ["adb"]
    main(["targets"])
    text = capsys.readouterr().out
    assert "Android app build (mlc-edge package, push):" in text
    assert re.search(r"^  adb +missing: adb not found", text, re.MULTILINE)


# -- opt-in: the patched runtime list, built for aarch64 Linux, loads our library --------------

SHIM_ANDROID_LOG = """// The NDK's <android/log.h> on aarch64 Linux: logcat lines go to stderr.
#pragma once
#include <cstdio>
enum { ANDROID_LOG_VERBOSE = 2, ANDROID_LOG_DEBUG = 3, ANDROID_LOG_FATAL = 7 };
inline int __android_log_write(int, const char* tag, const char* text) {
  return std::fprintf(stderr, "%s: %s\\n", tag, text);
}
"""

LOADER = """// Loads a system library linked into this program as MLC's engine does
// (cpp/serve/function_table.cc): ffi.SystemLib(prefix) -> vm_load_executable ->
// vm_initialization -> _metadata, and prints the metadata JSON.
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <iostream>
#include <string>

int main(int argc, char** argv) {
  namespace ffi = tvm::ffi;
  std::string prefix = std::string(argv[1]) + "_";
  try {
    ffi::Module lib =
        ffi::Function::GetGlobalRequired("ffi.SystemLib")(prefix).cast<ffi::Module>();
    auto load = lib->GetFunction("vm_load_executable");
    if (!load.has_value()) {
      std::cerr << "no vm_load_executable under prefix " << prefix << std::endl;
      return 2;
    }
    ffi::Module vm = load.value()().cast<ffi::Module>();
    constexpr int kDLCPU = 1, kPooled = 2;
    vm->GetFunction("vm_initialization").value()(kDLCPU, 0, kPooled, kDLCPU, 0, kPooled);
    std::cout << vm->GetFunction("_metadata").value()().cast<ffi::String>() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
"""


def cross_missing() -> str | None:
    for var in ("TVM_SOURCE_DIR", "MLC_LLM_SOURCE_DIR"):
        if not os.environ.get(var):
            return f"{var} is not set: the aarch64 runtime build needs a TVM and an mlc-llm tree"
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install g++-aarch64-linux-gnu qemu-user)"
    return None


@pytest.mark.skipif(cross_missing() is not None, reason=str(cross_missing()))
def test_patched_runtime_loads_our_library_on_aarch64_linux(phone_bundle, tmp_path):
    """mlc4j's tvm_runtime.h with our patch, compiled by Debian's aarch64 g++ against
    TVM_SOURCE_DIR (the NDK's <android/log.h> replaced by a shim), linked with our phone
    library's objects and run under qemu: the system library registers under its prefix,
    the VM loads, and ``_metadata`` comes back."""
    tvm_src, mlc = Path(os.environ["TVM_SOURCE_DIR"]), Path(os.environ["MLC_LLM_SOURCE_DIR"])
    assert check_tvm_source(tvm_src) == [], "TVM_SOURCE_DIR is not the wheel's TVM"
    header_rel = "android/mlc4j/src/cpp/tvm_runtime.h"
    (tmp_path / "mlc" / header_rel).parent.mkdir(parents=True)
    shutil.copy(mlc / header_rel, tmp_path / "mlc" / header_rel)
    patch = patches_dir() / "0002-mlc4j-tvm-0.27-runtime.patch"
    if (
        subprocess.run(
            ["git", "apply", "--check", "--reverse", str(patch)], cwd=tmp_path / "mlc"
        ).returncode
        != 0
    ):  # not yet applied there
        subprocess.run(["git", "apply", str(patch)], cwd=tmp_path / "mlc", check=True)
    (tmp_path / "shim" / "android").mkdir(parents=True)
    (tmp_path / "shim" / "android" / "log.h").write_text(SHIM_ANDROID_LOG)
    (tmp_path / "runtime.cc").write_text('#include "tvm_runtime.h"\n')
    (tmp_path / "loader.cc").write_text(LOADER)
    with tarfile.open(phone_bundle / "lib" / f"{LIB}.tar") as tf:
        tf.extractall(tmp_path / "lib", filter="data")
    # The include folders and definitions of mlc4j's CMakeLists.txt for tvm4j_runtime_packed.
    flags = [
        "-std=c++17",
        "-O1",
        "-fPIC",
        "-DTVM_LOG_CUSTOMIZE=1",
        "-DTVM_FFI_USE_LIBBACKTRACE=0",
        "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0",
        "-DTVM_VM_ENABLE_PROFILER=0",
        f"-I{tmp_path / 'shim'}",
        f"-I{(tmp_path / 'mlc' / header_rel).parent}",
        *(
            f"-I{tvm_src / d}"
            for d in (
                "3rdparty/tvm-ffi/3rdparty/dlpack/include",
                "3rdparty/OpenCL-Headers",
                "include",
                "src",
                "3rdparty/tvm-ffi/include",
                "3rdparty/tvm-ffi/src",
            )
        ),
    ]
    gxx = "aarch64-linux-gnu-g++"
    for name in ("runtime", "loader"):
        res = subprocess.run(
            [gxx, *flags, "-c", f"{name}.cc", "-o", f"{name}.o"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=3000,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    objects = sorted(str(p) for p in (tmp_path / "lib").glob("*.o"))
    res = subprocess.run(
        [gxx, "runtime.o", "loader.o", *objects, "-o", "loader", "-ldl", "-lpthread"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = subprocess.run(
        ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "./loader", LIB],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metadata = json.loads(run.stdout)
    assert metadata["model_type"] == "llama" and metadata["context_window_size"] == 512
    assert metadata["kv_cache"]["num_hidden_layers"] == 3 and metadata["memory_usage"]
