"""``mlc-edge package BUNDLE... -o DIST``: phone bundles → an installable MLCChat APK.

1. preflight: every tool and source tree, the bundles' libraries, each model's memory
   verdict; all problems at once, one line each, before anything is written;
2. apply our patches to the mlc-llm checkout (those not yet applied);
3. pack the bundles' ``.tar`` libraries into ``libmodel_android.a`` (the NDK's llvm-ar) and
   check each library's registration symbol (llvm-nm);
4. build ``mlc4j`` (TVM runtime + OpenCL + mlc-llm + tokenizers + the archive) with CMake,
   driven directly: ``prepare_libs.py`` imports the ``mlc_llm`` Python package, and
   ``TVM_SOURCE_DIR`` reaches mlc4j's CMake scope only as ``-D`` on the command line (from the
   environment or config.cmake the shipped runtime silently comes from mlc-llm's own
   3rdparty/tvm);
5. stage MLCChat with that library and the merged ``mlc-app-config.json``
   (``android_app/app.json``), and run Gradle;
6. move the APK, the app config, the archive and mlc4j's outputs into DIST.

The work happens in a build folder beside DIST (``DIST.build``, kept for the next run and
holding the logs); DIST is written from a staging folder only once everything succeeded.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .model_libs import (
    PhoneModel,
    check_library_symbols,
    check_unique,
    merged_app_config,
    pack_commands,
    read_phone_bundle,
)
from .pins import app_layout, pins, read_series
from .sources import check_mlc_llm, check_tvm_source, patch_states
from .toolchain import Toolchain, find_toolchain

PACKAGE_RECORD = "package.json"  # DIST's summary; `mlc-edge push DIST` reads it
GiB = 1 << 30


class PreflightError(UserError):
    """Several problems, one line each; the CLI prints each as an ``error:`` line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\nerror: ".join(problems))


@dataclass
class PackageOptions:
    bundles: list[Path]
    dist: Path
    mlc_llm_source: Path | None = None
    tvm_source: Path | None = None
    build_dir: Path | None = None
    release: bool = False
    keystore: Path | None = None
    key_alias: str | None = None
    memory_floor_gb: int = 16
    reported_memory: int | None = None
    jobs: int = os.cpu_count() or 4
    env: dict[str, str] | None = None

    @property
    def build(self) -> Path:
        return (self.build_dir or self.dist.with_name(self.dist.name + ".build")).absolute()


@dataclass
class Preflight:
    toolchain: Toolchain
    models: list[PhoneModel]
    memory: list[dict[str, Any]]
    patches: dict[str, str]  # patch name -> applies / applied / conflicts
    problems: list[str] = field(default_factory=list)


# -- 1. preflight ---------------------------------------------------------------------------


def memory_verdict(model: PhoneModel, floor_bytes: int, reported: int | None) -> dict[str, Any]:
    """``mlc-edge memory``'s prediction of the engine's load check for this model, with
    upstream's 5 GiB floor and the floor this build compiles in."""
    from ..bundle.layout import read_chat_config
    from ..config import ModelSpec
    from ..memory.plan import UPSTREAM_FLOOR_BYTES
    from ..memory.sources import compiled_metadata, plan_for, tensor_cache_records

    spec = ModelSpec.from_chat_config(read_chat_config(model.bundle))
    metadata = model.metadata
    if metadata is None:  # a library compiled before build records held _metadata
        print(
            f"memory plan of {model.model_id}: compiling its _metadata for {model.target} ...",
            file=sys.stderr,
            flush=True,
        )
        metadata = compiled_metadata(spec, model.target)
    plan = plan_for(
        metadata,
        model.model_id,
        model.target,
        spec.scheme.dtype,
        reported,
        None,
        tensor_cache_records(model.bundle),
        floors=(UPSTREAM_FLOOR_BYTES, floor_bytes),
    )
    upstream, ours = plan.loads
    return {
        "model_id": model.model_id,
        "target": model.target,
        "reported_memory_bytes": plan.reported_memory_bytes,
        "total_bytes": plan.total_bytes,
        "loads_with_upstream_floor": upstream.loads,
        "floor_bytes": ours.floor_bytes,
        "loads": ours.loads,
        "kv_capacity_tokens": ours.kv_capacity_tokens,
        "context_fits": ours.context_fits,
        "context_window_size": plan.context_window_size,
    }


def run_preflight(opts: PackageOptions) -> Preflight:
    env = dict(os.environ if opts.env is None else opts.env)
    toolchain = find_toolchain(env)
    problems = [t.problem for t in toolchain.build_tools() if t.problem]
    mlc = opts.mlc_llm_source
    problems += check_mlc_llm(mlc)
    states: dict[str, str] = {}
    if mlc is not None and (mlc / ".git").exists():
        states = {s.entry.name: s.state for s in patch_states(mlc)}
    problems += check_tvm_source(opts.tvm_source)

    models: list[PhoneModel] = []
    if not opts.bundles:
        problems.append(
            "no bundles: give one or more phone bundles (mlc-edge compile ... "
            "--target android-opencl)"
        )
    for bundle in opts.bundles:
        model, bundle_problems = read_phone_bundle(bundle)
        problems += bundle_problems
        if model is not None:
            models.append(model)
    problems += check_unique(models)
    if opts.release and (opts.keystore is None or opts.key_alias is None):
        problems.append(
            "--release needs --keystore FILE and --key-alias NAME (passwords in "
            "MLC_EDGE_KEYSTORE_PASSWORD and MLC_EDGE_KEY_PASSWORD)"
        )
    if opts.release and opts.keystore is not None and not opts.keystore.is_file():
        problems.append(f"keystore {opts.keystore} does not exist")
    if opts.release and not env.get("MLC_EDGE_KEYSTORE_PASSWORD"):
        problems.append(
            "--release: set MLC_EDGE_KEYSTORE_PASSWORD (and MLC_EDGE_KEY_PASSWORD "
            "when the key's differs)"
        )
    problems += _check_dist(opts.dist)

    memory = []
    for model in models:
        verdict = memory_verdict(model, opts.memory_floor_gb * GiB, opts.reported_memory)
        memory.append(verdict)
        if not verdict["loads"]:
            problems.append(
                f"{model.model_id} does not load on {model.target} even with the "
                f"{opts.memory_floor_gb} GiB floor (KV capacity {verdict['kv_capacity_tokens']} "
                f"tokens; mlc-edge memory {model.bundle}): use a smaller model or context"
            )
    return Preflight(toolchain, models, memory, states, problems)


def _check_dist(dist: Path) -> list[str]:
    if dist.exists() and not dist.is_dir():
        return [f"{dist} exists and is not a folder: choose another -o"]
    if dist.is_dir() and any(dist.iterdir()) and not (dist / PACKAGE_RECORD).is_file():
        return [f"{dist} is not empty and not an earlier package: choose a new or empty -o"]
    return []


# -- the steps ------------------------------------------------------------------------------


@dataclass
class Step:
    """One thing the build does: an external command, or work done here (``action``) that
    ``describe`` spells out as the equivalent shell lines for --dry-run."""

    title: str
    argv: list[str] | None = None
    cwd: Path | None = None
    long: bool = False  # streamed to a log file, with progress lines
    action: Callable[[], None] | None = None
    describe: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.argv is not None:
            cmd = shlex.join(self.argv)
            return [f"(cd {shlex.quote(str(self.cwd))} && {cmd})" if self.cwd else cmd]
        return self.describe


def build_env(toolchain: Toolchain, opts: PackageOptions) -> dict[str, str]:
    env = dict(toolchain.env)
    assert toolchain.ndk.path and toolchain.sdk.path and toolchain.jdk.path
    java_home = toolchain.jdk.path.parent.parent
    env.update(
        {
            "ANDROID_NDK": str(toolchain.ndk.path),
            "ANDROID_HOME": str(toolchain.sdk.path),
            "JAVA_HOME": str(java_home),
            "TVM_SOURCE_DIR": str(opts.tvm_source),
            "MLC_LLM_SOURCE_DIR": str(opts.mlc_llm_source),
            "PATH": os.pathsep.join([str(java_home / "bin"), env.get("PATH", "")]),
        }
    )
    if opts.release:
        # Gradle reads ORG_GRADLE_PROJECT_<name> as project properties: the passwords stay
        # off the command line. android.injected.signing.* signs a release without editing
        # the app's build.gradle.
        store_pw = env.get("MLC_EDGE_KEYSTORE_PASSWORD", "")
        env["ORG_GRADLE_PROJECT_android.injected.signing.store.password"] = store_pw
        env["ORG_GRADLE_PROJECT_android.injected.signing.key.password"] = env.get(
            "MLC_EDGE_KEY_PASSWORD", store_pw
        )
    return env


def cmake_configure_argv(toolchain: Toolchain, opts: PackageOptions, build: Path) -> list[str]:
    """mlc4j's configure, as prepare_libs.py does it, less its traps: TVM_SOURCE_DIR on the
    command line; no USE_CUSTOM_LOGGING (configure fails with TVM >= 0.24; mlc4j's
    tvm_runtime.h does the custom logging itself); no USE_OPENCL_ENABLE_HOST_PTR (it never
    reaches the target that ships)."""
    assert opts.mlc_llm_source is not None and opts.tvm_source is not None
    android = pins()["android"]
    platform = f"android-{android['native_api_level']}"
    return [
        str(toolchain.cmake.path),
        "-S",
        str(opts.mlc_llm_source / "android" / "mlc4j"),
        "-B",
        str(build),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={toolchain.ninja.path}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_TOOLCHAIN_FILE={toolchain.toolchain_file}",
        f"-DCMAKE_INSTALL_PREFIX={build}",  # install() writes output/ here
        "-DCMAKE_CXX_FLAGS=-O3",
        f"-DANDROID_ABI={android['abi']}",
        f"-DANDROID_NATIVE_API_LEVEL={platform}",
        f"-DANDROID_PLATFORM={platform}",
        "-DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=ON",
        "-DANDROID_STL=c++_static",
        "-DUSE_HEXAGON_SDK=OFF",
        "-DMLC_LLM_INSTALL_STATIC_LIB=ON",
        "-DCMAKE_SKIP_INSTALL_ALL_DEPENDENCY=ON",
        "-DUSE_OPENCL=ON",
        "-DTVM_FFI_USE_LIBBACKTRACE=OFF",
        "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=OFF",
        f"-DTVM_SOURCE_DIR={opts.tvm_source}",
        f"-DMLC_OPENCL_MIN_GLOBAL_MEMORY_GB={opts.memory_floor_gb}",
    ]


def plan_steps(pre: Preflight, opts: PackageOptions, stage: Path) -> list[Step]:
    """Every step, in order; ``stage`` is DIST's staging folder."""
    tc, mlc, build = pre.toolchain, opts.mlc_llm_source, opts.build
    assert mlc is not None
    layout = app_layout()
    cmake_build = build / "mlc4j"
    archive = cmake_build / "lib" / "libmodel_android.a"
    app = build / "MLCChat"
    mlc4j_in_app = app / layout["mlc4j_in_app"]
    variant = "release" if opts.release else "debug"
    apk_name = f"mlc-chat-{variant}.apk"
    steps: list[Step] = []

    for entry in read_series().entries:
        state = pre.patches.get(entry.name, "applies")
        if state == "applied":
            steps.append(
                Step(
                    f"patch {entry.name}: already applied",
                    action=lambda: None,
                    describe=[f"# {entry.name} is already applied to {mlc}"],
                )
            )
        else:
            steps.append(
                Step(f"apply {entry.name}", ["git", "-C", str(mlc), "apply", str(entry.path)])
            )

    objects = build / "objects"
    extractions, ar_argv = pack_commands(pre.models, objects, archive, tc.llvm_bin / "llvm-ar")

    def extract() -> None:
        shutil.rmtree(objects, ignore_errors=True)
        objects.mkdir(parents=True)
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        for tar, member, dst in extractions:
            with tarfile.open(tar) as tf:
                source = tf.extractfile(member)
                assert source is not None
                dst.write_bytes(source.read())

    steps.append(
        Step(
            "extract the model libraries",
            action=extract,
            describe=[
                f"mkdir -p {shlex.quote(str(objects))} {shlex.quote(str(archive.parent))}",
                *(
                    f"tar -xOf {shlex.quote(str(tar))} {member} > {shlex.quote(str(dst))}"
                    for tar, member, dst in extractions
                ),
            ],
        )
    )
    steps.append(Step("pack libmodel_android.a", ar_argv))
    libs = [m.model_lib for m in pre.models]
    nm = tc.llvm_bin / "llvm-nm"
    steps.append(
        Step(
            "check each library's symbol",
            action=lambda: check_library_symbols(archive, libs, nm),
            describe=[
                f"{shlex.quote(str(nm))} --defined-only -g {shlex.quote(str(archive))}  "
                f"# must define {', '.join(m + '___tvm_ffi__library_bin' for m in libs)}"
            ],
        )
    )

    steps.append(
        Step("configure mlc4j (CMake)", cmake_configure_argv(tc, opts, cmake_build), long=True)
    )
    cmake = str(tc.cmake.path)
    steps.append(
        Step(
            "build mlc4j (TVM runtime, mlc-llm, tokenizers; the longest step)",
            [
                cmake,
                "--build",
                str(cmake_build),
                "--target",
                "tvm4j_runtime_packed",
                "--config",
                "release",
                f"-j{opts.jobs}",
            ],
            long=True,
        )
    )
    steps.append(
        Step(
            "install mlc4j's outputs",
            [
                cmake,
                "--build",
                str(cmake_build),
                "--target",
                "install",
                "--config",
                "release",
                f"-j{opts.jobs}",
            ],
            long=True,
        )
    )

    app_config = merged_app_config(pre.models)
    asset = app / layout["app_config_asset"]

    def stage_app() -> None:
        shutil.rmtree(app, ignore_errors=True)
        shutil.copytree(
            mlc / layout["app_source"],
            app,
            symlinks=True,
            ignore=shutil.ignore_patterns("build", ".gradle", "dist"),
        )
        mlc4j_in_app.mkdir(parents=True, exist_ok=True)
        for name in layout["mlc4j_copied"]:
            src = mlc / layout["mlc4j_source"] / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, mlc4j_in_app / name)
        shutil.copytree(cmake_build / "output", mlc4j_in_app / "output")
        asset.parent.mkdir(parents=True, exist_ok=True)
        asset.write_text(json.dumps(app_config, indent=2) + "\n")
        (app / "local.properties").write_text(f"sdk.dir={tc.sdk.path}\n")

    steps.append(
        Step(
            "stage the app",
            action=stage_app,
            describe=[
                f"cp -r {mlc / layout['app_source']} {app}",
                *(
                    f"cp -r {mlc / layout['mlc4j_source'] / n} {mlc4j_in_app / n}"
                    for n in layout["mlc4j_copied"]
                ),
                f"cp -r {cmake_build / 'output'} {mlc4j_in_app / 'output'}",
                f"# write {asset} (the merged app config, {len(app_config['model_list'])} models)",
                f"# write {app / 'local.properties'}: sdk.dir={tc.sdk.path}",
            ],
        )
    )

    gradle = layout["gradle"][variant]
    gradle_argv = ["./gradlew", "--no-daemon", gradle["task"]]
    if opts.release:
        gradle_argv += [
            f"-Pandroid.injected.signing.store.file={opts.keystore}",
            f"-Pandroid.injected.signing.key.alias={opts.key_alias}",
        ]
    steps.append(Step(f"build the APK (Gradle {gradle['task']})", gradle_argv, cwd=app, long=True))

    def collect() -> None:
        shutil.copy2(app / gradle["apk"], stage / apk_name)
        (stage / "mlc-app-config.json").write_text(json.dumps(app_config, indent=2) + "\n")
        (stage / "lib").mkdir()
        shutil.copy2(archive, stage / "lib" / archive.name)
        shutil.copytree(cmake_build / "output", stage / "mlc4j")

    steps.append(
        Step(
            "collect the outputs",
            action=collect,
            describe=[
                f"cp {app / gradle['apk']} DIST/{apk_name}",
                "# write DIST/mlc-app-config.json",
                f"cp {archive} DIST/lib/",
                f"cp -r {cmake_build / 'output'} DIST/mlc4j",
            ],
        )
    )
    return steps


def run_step(step: Step, env: dict[str, str], logs: Path, index: int, total: int) -> None:
    start = time.perf_counter()
    print(f"[{index}/{total}] {step.title} ...", file=sys.stderr, flush=True)
    if step.action is not None:
        step.action()
    else:
        assert step.argv is not None
        log = logs / f"{index:02d}-{step.argv[0].rsplit('/', 1)[-1]}.log"
        with open(log, "w") as out:
            out.write("$ " + " ".join(step.lines()) + "\n")
            out.flush()
            try:
                proc = subprocess.Popen(
                    step.argv, cwd=step.cwd, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            except OSError as e:
                raise UserError(f"{step.title}: cannot run {step.argv[0]} ({e.strerror})") from None
            while proc.poll() is None:  # a line a minute on the long steps
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    print(
                        f"      ... {step.title}: {time.perf_counter() - start:.0f} s (log: {log})",
                        file=sys.stderr,
                        flush=True,
                    )
        if proc.returncode != 0:
            tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
            raise UserError(
                f"{step.title} failed (exit {proc.returncode}): "
                f"{tail[0].strip() if tail else ''} (full log: {log})"
            )
    if step.long:
        print(f"      done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def package(opts: PackageOptions, dry_run: bool = False) -> dict[str, Any]:
    """Run (or, with ``dry_run``, list) the whole build; returns the summary."""
    opts.dist = opts.dist.absolute()
    pre = run_preflight(opts)
    summary: dict[str, Any] = {
        "dist": str(opts.dist),
        "build_dir": str(opts.build),
        "variant": "release" if opts.release else "debug",
        "models": [
            {
                "model_id": m.model_id,
                "model_lib": m.model_lib,
                "bundle": str(m.bundle),
                "target": m.target,
                **{k: v for k, v in mem.items() if k != "model_id"},
            }
            for m, mem in zip(pre.models, pre.memory, strict=True)
        ],
        "patches": pre.patches,
        "memory_floor_gb": opts.memory_floor_gb,
        "mlc_llm_commit": pins()["mlc_llm"]["commit"],
        "tvm_commit": pins()["tvm"]["commit"],
        "problems": pre.problems,
    }
    if dry_run:
        summary["commands"] = _dry_run_lines(pre, opts)
        return summary
    if pre.problems:
        raise PreflightError(pre.problems)

    env = build_env(pre.toolchain, opts)
    logs = opts.build / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stage = opts.dist.parent / f".{opts.dist.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        steps = plan_steps(pre, opts, stage)
        for i, step in enumerate(steps, 1):
            run_step(step, env, logs, i, len(steps))
        summary["apk"] = str(opts.dist / f"mlc-chat-{summary['variant']}.apk")
        summary["app_config"] = str(opts.dist / "mlc-app-config.json")
        (stage / PACKAGE_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
        if opts.dist.exists():
            shutil.rmtree(opts.dist)
        os.replace(stage, opts.dist)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _dry_run_lines(pre: Preflight, opts: PackageOptions) -> list[str]:
    """The commands, with what preflight could not find shown as <...>."""
    tc = pre.toolchain
    missing = {
        "ndk": "<ANDROID_NDK>",
        "sdk": "<ANDROID_HOME>",
        "jdk": "<JAVA_HOME>/bin/java",
        "cmake": "<cmake>",
        "ninja": "<ninja>",
    }
    for name, placeholder in missing.items():
        tool = getattr(tc, name)
        if tool.path is None:
            tool.path = Path(placeholder)
    if opts.mlc_llm_source is None:
        opts.mlc_llm_source = Path("<MLC_LLM_SOURCE_DIR>")
    if opts.tvm_source is None:
        opts.tvm_source = Path("<TVM_SOURCE_DIR>")
    lines = []
    for step in plan_steps(pre, opts, opts.dist):
        lines.append(f"# {step.title}")
        lines += step.lines()
    return lines
