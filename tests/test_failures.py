"""What a user who gets something wrong sees: one ``error:`` line, an exit code, nothing
of theirs lost or left behind. The ids of ``test_failure`` are the rows of
``docs/failures.md``; the rows backed by other tests name them there.

Every case runs the CLI in-process on a copy of one tiny Llama checkpoint and of its CPU
bundle, and checks: the exit code, exactly one ``error:`` line (or the ``warning:``
line), the checkpoint and the existing bundle byte for byte unchanged, no new output
folder and no staging folder left behind. The kill -9 test runs real processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import compile_bundle
from tiny_models import make_llama

from mlc_edge.cli import main


@dataclass
class Case:
    args: list[str]
    expect: str  # in the error: line (or in the warning: line when code is 0)
    code: int = 1
    output: Path | None = None  # a new -o that must not appear
    warning: bool = False


@dataclass
class Env:
    tmp: Path
    hf: Path  # a fresh copy of the checkpoint
    bundle: Path  # a fresh copy of the compiled CPU bundle
    mounts: list[Path] = field(default_factory=list)
    restore: list[tuple] = field(default_factory=list)  # (module, name, value) to put back
    keep: list[Path] = field(default_factory=list)  # more of the user's folders to compare
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards
    made: list[Path] = field(default_factory=list)  # a success's complete output

    def mount_tmpfs(self, name: str, size: str, read_only: bool = False) -> Path:
        where = self.tmp / name
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'})")
        self.mounts.append(where)
        return where


def _config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _edit_weight(hf: Path, name: str, edit: Callable[[np.ndarray], None]) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(hf / "model.safetensors")
    edit(tensors[name])
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})


def _shard(bundle: Path) -> Path:
    return bundle / "params_shard_0.bin"


def _cache(bundle: Path) -> dict:
    return json.loads((bundle / "tensor-cache.json").read_text())


WEIGHT = "model.layers.1.mlp.down_proj.weight"
CASES: dict[str, Callable[[Env], Case]] = {}


def case(name: str):
    def register(func: Callable[[Env], Case]) -> Callable[[Env], Case]:
        CASES[name] = func
        return func

    return register


# -- a bundle's weights ------------------------------------------------------------------


@case("shard-byte-flipped")
def _(env: Env) -> Case:
    data = bytearray(_shard(env.bundle).read_bytes())
    data[len(data) // 2] ^= 0x01
    _shard(env.bundle).write_bytes(data)
    return Case(["verify", str(env.bundle)], "params_shard_0.bin is corrupt: its md5")


@case("shard-truncated-run")
def _(env: Env) -> Case:
    os.truncate(_shard(env.bundle), 300_000)
    return Case(
        ["run", str(env.bundle), "hi", "--max-tokens", "2"],
        "params_shard_0.bin is truncated: 300,000 bytes, but tensor-cache.json says",
    )


@case("shard-truncated-bench")
def _(env: Env) -> Case:
    os.truncate(_shard(env.bundle), 1000)
    return Case(
        ["bench", str(env.bundle), "-r", "1", "-p", "16", "-n", "0"],
        "params_shard_0.bin is truncated: 1,000 bytes",
    )


@case("shard-truncated-verify")
def _(env: Env) -> Case:
    os.truncate(_shard(env.bundle), 0)
    return Case(["verify", str(env.bundle)], "params_shard_0.bin is truncated: 0 bytes")


@case("shard-longer-than-recorded")
def _(env: Env) -> Case:
    with open(_shard(env.bundle), "ab") as f:
        f.write(b"\0" * 16)
    return Case(["run", str(env.bundle), "hi"], "is longer than recorded")


@case("shard-missing")
def _(env: Env) -> Case:
    _shard(env.bundle).unlink()
    return Case(["run", str(env.bundle), "hi"], "params_shard_0.bin (tensors model.embed_tokens")


@case("tensor-cache-json-garbled")
def _(env: Env) -> Case:
    (env.bundle / "tensor-cache.json").write_text("{not json")
    return Case(["run", str(env.bundle), "hi"], "tensor-cache.json cannot be read")


@case("tensor-cache-json-missing")
def _(env: Env) -> Case:
    (env.bundle / "tensor-cache.json").unlink()
    return Case(["run", str(env.bundle), "hi"], "tensor-cache.json is missing")


@case("shard-path-outside-bundle")
def _(env: Env) -> Case:
    cache = _cache(env.bundle)
    cache["records"][0]["dataPath"] = "../../etc/passwd"
    (env.bundle / "tensor-cache.json").write_text(json.dumps(cache))
    return Case(["verify", str(env.bundle)], "not a file name in the bundle")


@case("verify-cpu-bundle")
def _(env: Env) -> Case:
    # Not a failure: the weights are checked, and verify says what it cannot check.
    return Case(["verify", str(env.bundle)], "verify runs OpenCL kernels only", code=0)


# -- writing a bundle --------------------------------------------------------------------


@case("disk-full-up-front")
def _(env: Env) -> Case:
    small = env.mount_tmpfs("small", "120k")
    out = small / "bundle"
    return Case(
        ["convert", str(env.hf), "-o", str(out)], "no space left on the device for", output=out
    )


@case("disk-full-while-writing")
def _(env: Env) -> Case:
    # The up-front check passes (it is told the weights are tiny); the kernel's ENOSPC
    # then comes from a real write.
    small = env.mount_tmpfs("small", "200k")
    import mlc_edge.bundle.steps as steps

    env.restore.append((steps, "weight_bytes", steps.weight_bytes))
    steps.weight_bytes = lambda spec: 1
    out = small / "bundle"
    return Case(
        ["convert", str(env.hf), "-o", str(out)], "params_shard_0.bin (staged as", output=out
    )


@case("disk-full-simulated")
def _(env: Env) -> Case:
    # Runs everywhere: the shard writer's write fails as a full disk's would.
    import mlc_edge.convert.tensor_cache as tc

    real_open = open

    class FullFile:
        def __init__(self, path, mode):
            self._f = real_open(path, mode)
            self.name = str(path)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self._f.close()

    env.restore.append((tc, "open", None))
    tc.open = FullFile
    return Case(
        ["convert", str(env.hf), "-o", str(env.bundle)],
        "no space left on the device; the bundle needs 0.3 MiB",
    )


@case("output-under-proc")
def _(env: Env) -> Case:
    return Case(
        ["convert", str(env.hf), "-o", "/proc/mlc-edge-test/bundle"],
        "cannot create /proc/mlc-edge-test",
    )


@case("output-read-only")
def _(env: Env) -> Case:
    ro = env.mount_tmpfs("ro", "1m", read_only=True)
    return Case(
        ["convert", str(env.hf), "-o", str(ro / "bundle")], "read-only", output=ro / "bundle"
    )


@case("output-under-a-file")
def _(env: Env) -> Case:
    out = env.hf / "config.json" / "bundle"
    return Case(["gen-config", str(env.hf), "-o", str(out)], "config.json is a file, not a folder")


@case("output-users-folder")
def _(env: Env) -> Case:
    mine = env.tmp / "my-documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    env.keep.append(mine)
    return Case(["convert", str(env.hf), "-o", str(mine)], "is not empty and is not a bundle")


# -- the checkpoint ----------------------------------------------------------------------


@case("weight-nan")
def _(env: Env) -> Case:
    _edit_weight(env.hf, WEIGHT, lambda w: w.__setitem__((3, 5), np.nan))
    return Case(
        ["convert", str(env.hf), "-o", str(env.tmp / "out")],
        f"weight {WEIGHT} holds 1 NaN and 0 Inf values",
        output=env.tmp / "out",
    )


@case("weight-inf")
def _(env: Env) -> Case:
    _edit_weight(env.hf, "lm_head.weight", lambda w: w.__setitem__((0, 0), -np.inf))
    return Case(
        ["convert", str(env.hf), "-o", str(env.tmp / "out")],
        "weight lm_head.weight holds 0 NaN and 1 Inf values",
        output=env.tmp / "out",
    )


@case("weight-beyond-fp16")
def _(env: Env) -> Case:
    _edit_weight(env.hf, WEIGHT, lambda w: w.__setitem__((0, 1), 1e6))
    return Case(
        ["convert", str(env.hf), "-o", str(env.tmp / "out")],
        "holds 0 NaN and 1 Inf values (first at [1, 0]",
        output=env.tmp / "out",
    )


@case("weight-nan-allowed")
def _(env: Env) -> Case:
    _edit_weight(env.hf, WEIGHT, lambda w: w.__setitem__((3, 5), np.nan))
    env.made.append(env.tmp / "out")
    return Case(
        ["convert", str(env.hf), "-o", str(env.tmp / "out"), "--allow-non-finite", "--json"],
        f"weight {WEIGHT} holds 1 NaN",
        code=0,
        warning=True,
    )


@case("pickle-that-runs-code")
def _(env: Env) -> Case:
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {env.tmp / 'PWNED'}",))

    (env.hf / "model.safetensors").unlink()
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2), "x": Evil()}, env.hf / "pytorch_model.bin"
    )
    env.absent.append(env.tmp / "PWNED")
    return Case(
        ["convert", str(env.hf), "-o", str(env.tmp / "out")],
        "holds Python objects other than tensors (posix.system)",
        output=env.tmp / "out",
    )


@case("config-not-json")
def _(env: Env) -> Case:
    (env.hf / "config.json").write_text('{"hidden_size": 64,')
    return Case(
        ["gen-config", str(env.hf), "-o", str(env.tmp / "out")],
        "config.json is not valid JSON",
        output=env.tmp / "out",
    )


@case("config-hidden-size-1e9")
def _(env: Env) -> Case:
    _config(env.hf, hidden_size=10**9)
    return Case(
        ["compile", str(env.hf), "-o", str(env.tmp / "out")],
        "hidden_size = 1000000000: it must be a whole number from 1 to 65,536",
        output=env.tmp / "out",
    )


@case("config-zero-heads")
def _(env: Env) -> Case:
    _config(env.hf, num_attention_heads=0)
    return Case(
        ["convert", str(env.hf), "-o", str(env.tmp / "out")],
        "num_attention_heads = 0",
        output=env.tmp / "out",
    )


@case("config-negative-vocab")
def _(env: Env) -> Case:
    _config(env.hf, vocab_size=-5)
    return Case(
        ["gen-config", str(env.hf), "-o", str(env.tmp / "out")],
        "vocab_size = -5",
        output=env.tmp / "out",
    )


@case("config-size-as-text")
def _(env: Env) -> Case:
    _config(env.hf, intermediate_size="160")
    return Case(
        ["gen-config", str(env.hf), "-o", str(env.tmp / "out")],
        "intermediate_size = '160'",
        output=env.tmp / "out",
    )


@case("config-heads-not-grouped")
def _(env: Env) -> Case:
    _config(env.hf, num_key_value_heads=3)
    return Case(
        ["gen-config", str(env.hf), "-o", str(env.tmp / "out")],
        "not a multiple of num_key_value_heads = 3",
        output=env.tmp / "out",
    )


@case("context-window-1e9")
def _(env: Env) -> Case:
    return Case(
        [
            "gen-config",
            str(env.hf),
            "-o",
            str(env.tmp / "out"),
            "--context-window-size",
            "1000000000",
        ],
        "context_window_size 1,000,000,000 is larger than mlc-edge allows",
        output=env.tmp / "out",
    )


@case("context-window-beyond-training")
def _(env: Env) -> Case:
    env.made.append(env.tmp / "out")
    return Case(
        ["gen-config", str(env.hf), "-o", str(env.tmp / "out"), "--context-window-size", "100000"],
        "exceeds the model's max_position_embeddings 512",
        code=0,
        warning=True,
    )


# -- the runner --------------------------------------------------------------------------


def _snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    make_llama(root / "hf")
    compile_bundle(root / "hf", root / "bundle")
    return root


@pytest.fixture
def env(pristine, tmp_path):
    e = Env(tmp_path, tmp_path / "hf", tmp_path / "bundle")
    shutil.copytree(pristine / "hf", e.hf)
    shutil.copytree(pristine / "bundle", e.bundle)
    yield e
    for module, name, value in e.restore:
        if value is None:
            delattr(module, name)
        else:
            setattr(module, name, value)
    for where in reversed(e.mounts):
        subprocess.run(["umount", str(where)], check=False)


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", CASES)
def test_failure(name, env, capsys):
    c = CASES[name](env)
    before = _snapshot(env.hf, env.bundle, *env.keep)
    code, out, err = run_cli(capsys, c.args)
    assert code == c.code, (out, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if c.code:
        assert len(errors) == 1, err
        assert c.expect in errors[0], errors[0]
        # the error line is the last thing said (after a progress bar, if any)
        assert err.rstrip().splitlines()[-1] == errors[0]
    else:
        assert not errors, err
        if c.warning:
            assert len(warnings) == 1 and c.expect in warnings[0], err
        else:
            assert c.expect in out + err
    # nothing of the user's lost: checkpoint, bundle and their folders as they were
    after = _snapshot(env.hf, env.bundle, *env.keep)
    assert after == before
    if c.output is not None:
        assert not c.output.exists()
    for path in env.absent:
        assert not path.exists(), f"{path} was created"
    for made in env.made:  # a success: the output is complete
        assert made.is_dir()
    # nothing left behind: no staging folder anywhere the command could write
    parents = {env.tmp, *(m for m in env.mounts)}
    if c.output is not None and c.output.parent.exists():
        parents.add(c.output.parent)
    stale = [p for d in parents for p in d.iterdir() if ".partial-" in p.name]
    assert stale == []


# -- kill -9 during a conversion ---------------------------------------------------------


def _convert_process(hf: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlc_edge", "convert", str(hf), "-o", str(out), "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_kill_9_during_conversion_keeps_the_old_bundle(pristine, tmp_path):
    """Kill real conversions into an existing bundle at random points; the bundle stays
    whole and loadable, and the next run removes the staging folders they left."""
    from mlc_edge.runtime import Engine, Sampler

    bundle = tmp_path / "bundle"
    shutil.copytree(pristine / "bundle", bundle)
    hf = pristine / "hf"
    before = _snapshot(bundle)
    rng = random.Random(int(os.environ.get("MLC_EDGE_KILL_SEED", time.time_ns() % 2**32)))
    # One whole run first: how long its staging folder lives (reading, converting,
    # writing shards, the swap, removing the old one).
    proc = _convert_process(hf, bundle)
    stage, appeared, gone = tmp_path / f".bundle.partial-{proc.pid}", None, None
    while proc.poll() is None or (appeared and not gone and stage.exists()):
        now = time.monotonic()
        if stage.exists():
            appeared = appeared or now
        elif appeared and not gone:
            gone = now
        time.sleep(0.001)
    assert proc.returncode == 0 and appeared is not None
    lifetime = (gone or time.monotonic()) - appeared
    assert _snapshot(bundle) == before
    mid_stage = 0
    for _attempt in range(8):
        proc = _convert_process(hf, bundle)
        stage = tmp_path / f".bundle.partial-{proc.pid}"
        start = time.monotonic()
        while proc.poll() is None and not stage.exists() and time.monotonic() - start < 120:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, lifetime))  # a random point of the staging folder's life
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_stage += stage.exists()
        assert _snapshot(bundle) == before  # the old bundle, whole, after every kill
        if mid_stage >= 2 and _attempt >= 2:  # several kills, two inside the staging
            break
    print(
        f"staging folder lives {lifetime * 1000:.0f} ms; {_attempt + 1} kills, "
        f"{mid_stage} while it existed"
    )
    assert mid_stage >= 1, "no kill landed while a staging folder existed"
    stale = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # The next run removes them (their processes are gone) and completes.
    proc = _convert_process(hf, bundle)
    assert proc.wait(timeout=300) == 0
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == [], stale
    assert _snapshot(bundle) == before  # the same weights, converted again
    engine = Engine(bundle)
    result = engine.generate([2, 3, 4], 3, Sampler(0.0, 1.0, 0))
    assert len(result.token_ids) == 3


def test_a_live_runs_staging_folder_is_left_alone(tmp_path):
    from mlc_edge.bundle.output import remove_stale_stages

    live = tmp_path / f".bundle.partial-{os.getppid()}"
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its PID is free
    dead_pid = gone.pid
    dead = tmp_path / f".bundle.partial-{dead_pid}"
    live.mkdir()
    dead.mkdir()
    (tmp_path / "user.partial-1").mkdir()  # not ours: no leading dot
    removed = remove_stale_stages(tmp_path)
    assert removed == [dead]
    assert live.is_dir() and (tmp_path / "user.partial-1").is_dir()


def test_output_on_a_mount_point_or_through_a_symlink(env, capsys):
    """The atomic swap cannot move a mount point or should not replace a link: both
    still get the new weights, and old shards go."""
    mount = env.mount_tmpfs("mnt", "4m")
    link = env.tmp / "link"
    link.symlink_to(env.bundle)
    shutil.copytree(env.bundle, mount, dirs_exist_ok=True)
    for out in (mount, link):
        (out / "params_shard_7.bin").write_bytes(b"old")
        code, _, err = run_cli(capsys, ["convert", str(env.hf), "-o", str(out), "--json"])
        assert code == 0, err
        assert not (out / "params_shard_7.bin").exists()
        assert run_cli(capsys, ["verify", str(out)])[0] == 0
    assert link.is_symlink()
    assert [p for p in env.tmp.iterdir() if ".partial-" in p.name] == []
