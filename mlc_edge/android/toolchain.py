"""The Android build's tools on this machine: where they are, their versions, and one line
per problem saying what to install or set (versions from ``patches/pins.json``).

Every lookup reads the environment it is given (``ANDROID_NDK``, ``ANDROID_HOME``,
``JAVA_HOME``, ``PATH``), so a test can point it at fake tool folders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .pins import pins

NDK_HOST = "linux-x86_64"  # the NDK's prebuilt toolchain folder on a Linux machine


@dataclass
class Tool:
    name: str
    path: Path | None = None
    version: str | None = None
    problem: str | None = None  # one line: what is wrong and what to do

    def as_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "version": self.version,
            "problem": self.problem,
        }


@dataclass
class Toolchain:
    ndk: Tool
    sdk: Tool
    jdk: Tool
    cmake: Tool
    ninja: Tool
    rust: Tool
    adb: Tool
    env: dict[str, str] = field(default_factory=dict)

    def build_tools(self) -> list[Tool]:
        """What ``mlc-edge package`` needs (adb is for ``push``)."""
        return [self.ndk, self.sdk, self.jdk, self.cmake, self.ninja, self.rust]

    def all(self) -> list[Tool]:
        return [*self.build_tools(), self.adb]

    @property
    def llvm_bin(self) -> Path:
        assert self.ndk.path is not None
        return self.ndk.path / "toolchains" / "llvm" / "prebuilt" / NDK_HOST / "bin"

    @property
    def toolchain_file(self) -> Path:
        assert self.ndk.path is not None
        return self.ndk.path / "build" / "cmake" / "android.toolchain.cmake"


def _which(name: str, env: Mapping[str, str]) -> Path | None:
    found = shutil.which(name, path=env.get("PATH", ""))
    return Path(found) if found else None


def _output(argv: list[str], env: Mapping[str, str]) -> str | None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (res.stdout + res.stderr) if res.returncode == 0 else None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _ask_version(
    tool: Tool, path: Path, flag: str, pattern: str, env: Mapping[str, str], fix: str
) -> tuple[int, ...] | None:
    """Run ``path flag``; the version ``pattern`` captures goes into ``tool`` and comes back
    as numbers. None, and the problem ending in ``fix`` set, when it cannot be read."""
    tool.path = path
    match = re.search(pattern, _output([str(path), flag], env) or "")
    if match is None:
        tool.problem = f"{path} {flag} failed: {fix}"
        return None
    tool.version = match.group(1)
    return _version_tuple(tool.version)


def find_sdk(env: Mapping[str, str]) -> Tool:
    tool = Tool("Android SDK")
    var = next((v for v in ("ANDROID_HOME", "ANDROID_SDK_ROOT") if env.get(v)), None)
    if var is None:
        tool.problem = (
            "Android SDK not found: install it (Android Studio or the command-line "
            "tools) and set ANDROID_HOME"
        )
        return tool
    sdk = Path(env[var])
    if not sdk.is_dir():
        tool.problem = f"{var}={sdk} is not a folder: set it to the Android SDK"
        return tool
    tool.path = sdk
    wanted = pins()["android"]["sdk_platforms"]
    missing = [p for p in wanted if not (sdk / "platforms" / p / "android.jar").is_file()]
    tool.version = " ".join(p for p in wanted if p not in missing) or None
    if missing:
        install = " ".join(f'"platforms;{p}"' for p in missing)
        tool.problem = (
            f"Android SDK platform {', '.join(missing)} missing in {sdk}: sdkmanager {install}"
        )
    return tool


def find_ndk(env: Mapping[str, str], sdk: Path | None) -> Tool:
    wanted = pins()["android"]["ndk"]
    tool = Tool("Android NDK")
    var = next((v for v in ("ANDROID_NDK", "ANDROID_NDK_HOME") if env.get(v)), None)
    if var is not None:
        ndk = Path(env[var])
    elif sdk is not None and (sdk / "ndk" / wanted).is_dir():
        ndk = sdk / "ndk" / wanted
    else:
        tool.problem = (
            f'Android NDK {wanted} not found: sdkmanager "ndk;{wanted}" and '
            f"set ANDROID_NDK to its folder"
        )
        return tool
    props = ndk / "source.properties"
    if not props.is_file():
        tool.problem = (
            f"{ndk} is not an Android NDK (no source.properties): set ANDROID_NDK to NDK {wanted}"
        )
        return tool
    match = re.search(r"Pkg\.Revision\s*=\s*(\S+)", props.read_text())
    tool.path, tool.version = ndk, match.group(1) if match else "unknown"
    if tool.version != wanted:
        tool.problem = (
            f"ANDROID_NDK is NDK {tool.version}, the build needs {wanted}: "
            f'sdkmanager "ndk;{wanted}" and point ANDROID_NDK at it'
        )
    elif not (ndk / "build" / "cmake" / "android.toolchain.cmake").is_file():
        tool.problem = f"NDK {ndk} has no build/cmake/android.toolchain.cmake: reinstall it"
    elif not (ndk / "toolchains" / "llvm" / "prebuilt" / NDK_HOST / "bin" / "llvm-ar").is_file():
        tool.problem = f"NDK {ndk} has no {NDK_HOST} llvm-ar: install the NDK for Linux x86-64"
    return tool


def find_jdk(env: Mapping[str, str]) -> Tool:
    wanted = int(pins()["android"]["jdk"])
    tool = Tool("JDK")
    if env.get("JAVA_HOME"):
        java, javac = (Path(env["JAVA_HOME"]) / "bin" / n for n in ("java", "javac"))
        where = f"JAVA_HOME={env['JAVA_HOME']}"
        if not java.is_file():
            tool.problem = f"{where} has no bin/java: set JAVA_HOME to a JDK {wanted}"
            return tool
    else:
        java, javac = _which("java", env), _which("javac", env)
        where = "java on PATH"
        if java is None:
            tool.problem = (
                f"JDK {wanted} not found: install it (e.g. openjdk-{wanted}-jdk or "
                f"Android Studio's jbr) and set JAVA_HOME"
            )
            return tool
    parts = _ask_version(
        tool, java, "-version", r'version "([^"]+)"', env, f"set JAVA_HOME to a JDK {wanted}"
    )
    if parts is None:
        return tool
    major = parts[1] if parts[:1] == (1,) else parts[0]
    if major < wanted:
        tool.problem = (
            f"{where} is Java {tool.version}; the app build (Gradle plugin "
            f"{pins()['android']['android_gradle_plugin']}) needs JDK {wanted} or "
            f"newer: set JAVA_HOME"
        )
    elif javac is None or not Path(javac).is_file():
        tool.problem = f"{where} is a JRE without javac: set JAVA_HOME to a JDK {wanted}"
    return tool


def _sdk_cmake_bin(sdk: Path | None, name: str) -> Path | None:
    """The SDK's own CMake/Ninja (``cmake/<version>/bin``), newest first."""
    if sdk is None:
        return None
    for folder in sorted(
        (sdk / "cmake").glob("*"), key=lambda p: _version_tuple(p.name), reverse=True
    ):
        if (folder / "bin" / name).is_file():
            return folder / "bin" / name
    return None


def find_cmake(env: Mapping[str, str], sdk: Path | None) -> Tool:
    rng = pins()["android"]["cmake"]
    tool = Tool("CMake")
    cmake = _which("cmake", env) or _sdk_cmake_bin(sdk, "cmake")
    install = (
        f"install CMake >= {rng['min']} and < {rng['below']} "
        f'(sdkmanager "cmake;3.22.1" or pip install "cmake<{rng["below"]}")'
    )
    if cmake is None:
        tool.problem = f"CMake not found: {install}"
        return tool
    version = _ask_version(tool, cmake, "--version", r"cmake version (\S+)", env, install)
    if version is None:
        return tool
    if not _version_tuple(rng["min"]) <= version < _version_tuple(rng["below"]):
        tool.problem = f"CMake {tool.version} at {cmake} is outside the build's range: {install}"
    return tool


def find_ninja(env: Mapping[str, str], sdk: Path | None) -> Tool:
    tool = Tool("Ninja")
    tool.path = _which("ninja", env) or _sdk_cmake_bin(sdk, "ninja")
    if tool.path is None:
        tool.problem = (
            "Ninja not found: install it (apt-get install ninja-build, or pip install ninja)"
        )
    else:
        tool.version = (_output([str(tool.path), "--version"], env) or "").strip() or None
    return tool


def find_rust(env: Mapping[str, str]) -> Tool:
    target = pins()["android"]["rust_target"]
    tool = Tool(f"Rust ({target})")
    rustup, cargo = _which("rustup", env), _which("cargo", env)
    if rustup is None or cargo is None:
        tool.problem = (
            "Rust not found (rustup and cargo on PATH build the tokenizers): "
            f"install it from rustup.rs, then rustup target add {target}"
        )
        return tool
    tool.path = rustup
    installed = _output([str(rustup), "target", "list", "--installed"], env)
    if installed is None:
        tool.problem = f"{rustup} target list --installed failed: check the Rust install"
    elif target not in installed.split():
        tool.problem = f"Rust target {target} not installed: rustup target add {target}"
    else:
        tool.version = target
    return tool


def find_adb(env: Mapping[str, str], sdk: Path | None) -> Tool:
    tool = Tool("adb")
    adb = _which("adb", env)
    if adb is None and sdk is not None and (sdk / "platform-tools" / "adb").is_file():
        adb = sdk / "platform-tools" / "adb"
    tool.path = adb
    if adb is None:
        tool.problem = (
            "adb not found: install the SDK's platform-tools (sdkmanager "
            "platform-tools) or apt-get install adb"
        )
    return tool


def find_toolchain(env: Mapping[str, str] | None = None) -> Toolchain:
    env = dict(os.environ if env is None else env)
    sdk = find_sdk(env)
    return Toolchain(
        ndk=find_ndk(env, sdk.path),
        sdk=sdk,
        jdk=find_jdk(env),
        cmake=find_cmake(env, sdk.path),
        ninja=find_ninja(env, sdk.path),
        rust=find_rust(env),
        adb=find_adb(env, sdk.path),
        env=env,
    )
