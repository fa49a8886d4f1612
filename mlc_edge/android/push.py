"""``mlc-edge push DIST``: install the APK of ``mlc-edge package`` and push each model's
weights with adb into the app's files folder (``android_app/app.json``).

Weights are never in the APK. Each model's files go first to ``/data/local/tmp/<model_id>``
and are then moved into ``files/<model_id>/`` (as MLC's ``bundle_weight.py`` does). The app
prefers an ``mlc-app-config.json`` left in ``files/`` by an earlier install over the one in
the new APK, so that file is removed.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..bundle.app_config import APP_CONFIG
from ..bundle.layout import LIB_DIR, TENSOR_CACHE, has_weights
from ..errors import UserError
from .package import PACKAGE_RECORD
from .pins import app_layout

# What the app reads from a model folder; the library is in the APK, the bundle's own app
# entry is merged into the APK's app config.
NOT_PUSHED = {LIB_DIR, APP_CONFIG}


def weight_files(bundle: Path) -> list[Path]:
    return sorted(p for p in bundle.iterdir() if p.name not in NOT_PUSHED and p.is_file())


def push_commands(
    dist: Path, adb: str, serial: str | None = None, install: bool = True
) -> list[list[str]]:
    """Every adb command, in order."""
    record_path = dist / PACKAGE_RECORD
    if not record_path.is_file():
        raise UserError(
            f"{dist} is not an output of mlc-edge package (no {PACKAGE_RECORD}): "
            f"give the -o folder of mlc-edge package"
        )
    record = json.loads(record_path.read_text())
    layout = app_layout()
    files_dir, tmp_dir = layout["device_files_dir"], layout["device_staging_dir"]
    base = [adb, *(["-s", serial] if serial else [])]
    commands = []
    if install:
        apk = Path(record["apk"])
        if not apk.is_file():
            raise UserError(f"{apk} is missing: run mlc-edge package again")
        commands.append([*base, "install", "-r", str(apk)])
    commands.append([*base, "shell", "mkdir", "-p", files_dir])
    commands.append([*base, "shell", "rm", "-f", f"{files_dir}/{APP_CONFIG}"])
    for model in record["models"]:
        bundle, model_id = Path(model["bundle"]), model["model_id"]
        if not has_weights(bundle):
            raise UserError(
                f"bundle {bundle} of {model_id} has no {TENSOR_CACHE}: convert "
                f"its weights (mlc-edge convert) or package again"
            )
        staging, final = f"{tmp_dir}/{model_id}", f"{files_dir}/{model_id}"
        commands.append([*base, "shell", "rm", "-rf", staging])
        commands.append([*base, "shell", "mkdir", "-p", staging])
        commands.append([*base, "push", *(str(p) for p in weight_files(bundle)), staging + "/"])
        commands.append([*base, "shell", "rm", "-rf", final])
        commands.append([*base, "shell", "mv", staging, final])
    return commands


def find_adb(env: Mapping[str, str]) -> str:
    from .toolchain import find_adb as locate

    tool = locate(env, Path(env["ANDROID_HOME"]) if env.get("ANDROID_HOME") else None)
    if tool.path is None:
        raise UserError(tool.problem or "adb not found")
    return str(tool.path)


def push(
    dist: Path,
    env: Mapping[str, str],
    serial: str | None = None,
    install: bool = True,
    dry_run: bool = False,
) -> dict[str, Any]:
    adb = find_adb(env) if not dry_run else (shutil.which("adb", path=env.get("PATH")) or "adb")
    commands = push_commands(Path(dist), adb, serial, install)
    summary: dict[str, Any] = {"dist": str(dist), "commands": [shlex.join(c) for c in commands]}
    if dry_run:
        return summary
    state = subprocess.run(
        [adb, *(["-s", serial] if serial else []), "get-state"],
        capture_output=True,
        text=True,
        env=dict(env),
    )
    if state.returncode != 0 or state.stdout.strip() != "device":
        reason = (state.stderr.strip().splitlines() or [state.stdout.strip() or "no device"])[0]
        raise UserError(
            f"no phone for adb ({reason}): connect one with USB debugging on "
            f"(adb devices lists it), or give --serial"
        )
    for i, command in enumerate(commands, 1):
        print(f"[{i}/{len(commands)}] {shlex.join(command[1:])}", file=sys.stderr, flush=True)
        res = subprocess.run(command, capture_output=True, text=True, env=dict(env))
        # Older adb exits 0 from a failed install and says so on stdout.
        if res.returncode == 0 and command[-3] == "install" and "Failure" in res.stdout:
            res.returncode = 1
        if res.returncode != 0:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
            raise UserError(
                f"adb failed (exit {res.returncode}) on {shlex.join(command[1:])}: {tail[0]}"
            )
    return summary
