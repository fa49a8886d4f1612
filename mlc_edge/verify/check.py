"""Check every OpenCL kernel of a model against the CPU, function by function.

``KernelChecker`` is the reusable part: give it the unscheduled and the scheduled module
(``compiler.build.scheduled_module``) and the TVM target; ``check(name)`` runs one
function's kernels on the OpenCL device for each test case and compares every buffer
with the unscheduled function compiled for LLVM. ``run_function``/``time_function`` run
or time one function's kernels alone (for schedule work and benchmarks).
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tvm_ffi
from tvm import IRModule, tirx
from tvm.target import Target

from .fp16 import FP16_TOLERANCE, NATIVE_FP16_NOTE, fp32_inputs
from .inputs import ArrayPool, NotChecked, Param, Prepared, Recipe, Sizes, params_of
from .lower import LoweredFunction, lower_for_device
from .opencl import LaunchHook, OpenCLRunner
from .reference import build_reference, reference_funcs, run_reference

# Largest error allowed, relative to the largest reference value of the buffer.
# fp32 on both sides: only the summation order differs (~1e-6 seen); an indexing or
# launch bug gives errors of order 1.
TOLERANCE_FLOAT = 1e-3
# Native fp16 (a device with cl_khr_fp16), against an fp32 reference computed from the
# same fp16 inputs: the fp16 error budget of a correct kernel (fp16.py says how it is
# derived). A reduction that accumulates in fp16 exceeds it several times over.
TOLERANCE_FP16 = FP16_TOLERANCE

FP16_NOTE = (
    "fp16 kernels ran with half rewritten to float (this OpenCL device has no "
    "cl_khr_fp16), against an fp32 reference: this checks indexing, launch sizes and "
    "fusion, not fp16 rounding or overflow"
)


@dataclass
class Launch:
    kernel: str
    global_size: list[int]
    local_size: list[int]


@dataclass
class CaseResult:
    """One function run once (one set of sizes): its kernels' launches and the error."""

    function: str
    sizes: dict[str, int]
    launches: list[Launch]
    max_abs_error: float
    max_rel_error: float
    passed: bool
    worst_buffer: str | None = None
    error: str | None = None  # build or launch failure
    seconds: float = 0.0
    known_issue: str | None = None  # a failure with a known cause outside mlc-edge

    @property
    def status(self) -> str:
        if self.passed:
            return "ok"
        return "KNOWN" if self.known_issue else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("max_abs_error", "max_rel_error"):  # JSON has no infinity
            if not np.isfinite(data[key]):
                data[key] = None
        return data


@dataclass
class NotCheckedFunction:
    function: str
    kernels: list[str]
    reason: str


@dataclass
class VerifyReport:
    target: str
    device: str
    as_float: bool
    tolerance: float
    results: list[CaseResult] = field(default_factory=list)
    not_checked: list[NotCheckedFunction] = field(default_factory=list)
    stale_kernels: list[str] | None = None  # kernels whose source differs from the bundle's
    library_note: str | None = None  # how the kernels compare with the bundle's library
    bundle: str | None = None
    source: str | None = None  # the bundle, model folder or config.json verified
    seconds: float = 0.0
    strict: bool = False  # known issues count as failures

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed and (self.strict or not r.known_issue)]

    @property
    def known_issues(self) -> dict[str, str]:
        return {r.function: r.known_issue for r in self.results if not r.passed and r.known_issue}

    @property
    def passed(self) -> bool:
        return not self.failed and not self.stale_kernels

    def checked_functions(self) -> list[str]:
        return list(dict.fromkeys(r.function for r in self.results))

    def checked_kernels(self) -> list[str]:
        return list(dict.fromkeys(k.kernel for r in self.results for k in r.launches))

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "source": self.source,
            "target": self.target,
            "device": self.device,
            "fp16_as_float": self.as_float,
            "note": FP16_NOTE if self.as_float else NATIVE_FP16_NOTE,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "checked_functions": len(self.checked_functions()),
            "checked_kernels": len(self.checked_kernels()),
            "cases": len(self.results),
            "failed": len(self.failed),
            "known_issues": self.known_issues,
            "not_checked_functions": len(self.not_checked),
            "stale_kernels": self.stale_kernels,
            "library_note": self.library_note,
            "seconds": round(self.seconds, 1),
            "results": [{**r.as_dict(), "status": r.status} for r in self.results],
            "not_checked": [asdict(n) for n in self.not_checked],
        }

    def lines(self) -> list[str]:
        what = self.bundle or self.source
        out = [f"verify {what + ' ' if what else ''}for {self.target} on {self.device}"]
        out.append(f"note: {FP16_NOTE if self.as_float else NATIVE_FP16_NOTE}")
        out.append(
            f"pass: max rel error <= {self.tolerance:g} (relative to the largest "
            "reference value of each buffer; integer buffers exact)"
        )
        out.append(
            f"{'kernel':<44} {'global':<16} {'local':<10} {'max abs':>9} "
            f"{'max rel':>9}  {'result':<6} sizes"
        )
        for r in self.results:
            sizes = " ".join(f"{k}={v}" for k, v in r.sizes.items())
            verdict = r.status
            why = f"  <- {r.error or r.worst_buffer}" if not r.passed else ""
            launches = r.launches or [Launch(r.function, [], [])]
            for i, k in enumerate(launches):
                # A function's kernels are checked together, on the buffers the last
                # one leaves: the earlier ones (a padded copy, ...) feed it.
                if i < len(launches) - 1:
                    errs = f"{'':>9} {'':>9}  {'(feeds next)':<6}"
                else:
                    errs = f"{r.max_abs_error:>9.2e} {r.max_rel_error:>9.2e}  {verdict:<6}"
                out.append(
                    f"{k.kernel:<44} {_dims(k.global_size):<16} "
                    f"{_dims(k.local_size):<10} {errs} {sizes}{why}"
                )
        if self.not_checked:
            out.append("not checked:")
            for n in self.not_checked:
                out.append(f"  {n.function} ({', '.join(n.kernels) or 'no kernel'}): {n.reason}")
        for function, why in self.known_issues.items():
            out.append(
                f"known issue ({'counted' if self.strict else 'not counted'} as a "
                f"failure): {function}: {why}"
            )
        if self.library_note:
            out.append(f"library: {self.library_note}")
        if self.stale_kernels:
            out.append(
                f"kernels that differ from the bundle's library (recompile it): "
                f"{', '.join(self.stale_kernels)}"
            )
        out.append(
            f"{len(self.checked_functions())} functions ({len(self.checked_kernels())} kernels) "
            f"checked in {len(self.results)} runs: "
            + ("all passed" if not self.failed else f"{len(self.failed)} FAILED")
            + f"; {len(self.not_checked)} functions not checked; {self.seconds:.0f} s"
        )
        return out


def _dims(dims: list[int]) -> str:
    return "x".join(str(d) for d in dims) if dims else "-"


def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / largest |reference|); inf where one side has a
    NaN or infinity the other has not. Integer buffers: any difference is inf."""
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    if ref.dtype.kind in "iub":
        diff = np.count_nonzero(got != ref)
        return (0.0, 0.0) if diff == 0 else (float("inf"), float("inf"))
    g = got.astype(np.float64, copy=False)
    r = ref.astype(np.float64, copy=False)
    finite = np.isfinite(r) & np.isfinite(g)
    both_nan = np.isnan(r) & np.isnan(g)
    same_inf = ~np.isfinite(r) & (g == r)
    if not np.all(finite | both_nan | same_inf):
        return float("inf"), float("inf")
    if not finite.any():
        return 0.0, 0.0
    err = float(np.max(np.abs(g[finite] - r[finite])))
    scale = float(np.max(np.abs(r[finite])))
    return err, err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def stored_params(func: tirx.PrimFunc) -> list[str]:
    """Names of the parameters ``func`` stores into."""
    params = list(func.params)
    names: list[str] = []

    def on_store(store: tirx.BufferStore) -> None:
        for p in params:
            if p.same_as(store.buffer) and str(p.name) not in names:
                names.append(str(p.name))

    tvm_ffi.structural_walk(func.body, [(tirx.BufferStore, on_store)])
    return names


def _is_prescheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def default_references(unscheduled: IRModule) -> dict[str, tirx.PrimFunc]:
    """Reference PrimFuncs by name: each function as FuseTIR left it, and for our GPU
    logit processors (thread-bound on arrival) their CPU loops."""
    from ..compiler.logit_processor import logit_processor_funcs

    refs = {
        gv.name_hint: f
        for gv, f in unscheduled.functions_items()
        if isinstance(f, tirx.PrimFunc) and not _is_prescheduled(f)
    }
    names = {gv.name_hint for gv in unscheduled.get_global_vars()}
    for name, f in logit_processor_funcs(Target({"kind": "llvm"})).items():
        if f"{name}_tir" in names:
            refs[f"{name}_tir"] = f
    return refs


# Why the KV cache's pre-scheduled kernels are not run: they come scheduled from TVM (no
# unscheduled form to compare with) and read page tables.
PRESCHEDULED_REASON = (
    "arrives scheduled from TVM's paged KV cache (no unscheduled reference to compare "
    "with) and needs page tables / sequence metadata"
)


class KernelChecker:
    """The kernels of one module, runnable on the OpenCL device and checkable against
    the CPU.

    ``unscheduled``/``scheduled``: from ``compiler.build.scheduled_module``; ``target``:
    the TVM target the kernels are compiled for. ``references`` adds or overrides
    reference PrimFuncs, ``recipes`` the inputs of some functions, ``not_checked`` says
    why a function is left out (all by function name).
    """

    def __init__(
        self,
        unscheduled: IRModule,
        scheduled: IRModule,
        target: Target,
        sizes: Sizes,
        runner: OpenCLRunner | None = None,
        references: Mapping[str, tirx.PrimFunc] | None = None,
        recipes: Mapping[str, Recipe] | None = None,
        not_checked: Mapping[str, str] | None = None,
        known_issues: Mapping[str, str] | None = None,
        only: str | None = None,
    ):
        self.target = target
        self.sizes = sizes
        self.runner = runner or OpenCLRunner()
        self.module = scheduled  # its Relax functions say which kernels each one calls
        self.funcs = {
            gv.name_hint: f
            for gv, f in sorted(scheduled.functions_items(), key=lambda x: x[0].name_hint)
            if isinstance(f, tirx.PrimFunc) and (only is None or re.search(only, gv.name_hint))
        }
        self.lowered: dict[str, LoweredFunction] = lower_for_device(self.funcs, target)
        self.references = {**default_references(unscheduled), **(references or {})}
        self.recipes = dict(recipes or {})
        self.excluded = dict(not_checked or {})
        self.known_issues = dict(known_issues or {})
        self._ref_lib: Any = None
        self._ref_funcs: tuple[dict[str, tirx.PrimFunc], dict[str, str]] | None = None
        self._why: dict[str, str | None] = {}
        self.pool = ArrayPool()

    @property
    def tolerance(self) -> float:
        return TOLERANCE_FLOAT if self.runner.as_float else TOLERANCE_FP16

    def params(self, name: str) -> list[Param]:
        return params_of(self.funcs[name])

    def kernels(self, name: str) -> list[str]:
        return [c.kernel for c in self.lowered[name].calls] if name in self.lowered else []

    def recipe(self, name: str) -> Recipe:
        return self.recipes.get(name, _GENERIC)

    def why_not_checked(self, name: str) -> str | None:
        if name not in self._why:
            self._why[name] = self._why_not_checked(name)
        return self._why[name]

    def _why_not_checked(self, name: str) -> str | None:
        if name in self.excluded:
            return self.excluded[name]
        if name not in self.lowered:
            return "was not lowered to a host function"
        if name not in self.references:
            if _is_prescheduled(self.funcs[name]):
                return PRESCHEDULED_REASON
            return "no reference function"
        problem = self._reference_funcs()[1].get(name)
        if problem:
            return problem
        try:  # the first case's inputs can be made: so can the others'
            case = self.recipe(name).cases(self.params(name), self.sizes)[0]
            self.prepare(name, case)
        except NotChecked as e:
            return str(e)
        return None

    def _reference_funcs(self) -> tuple[dict[str, tirx.PrimFunc], dict[str, str]]:
        if self._ref_funcs is None:
            wanted = {
                n: self.references[n]
                for n in self.funcs
                if n in self.references and n not in self.excluded
            }
            # fp32 in both modes: native fp16 kernels are measured against fp32 math.
            self._ref_funcs = reference_funcs(wanted, as_float=True)
        return self._ref_funcs

    def _reference_lib(self) -> Any:
        if self._ref_lib is None:
            self._ref_lib = build_reference(self._reference_funcs()[0])
        return self._ref_lib

    def written(self, name: str) -> list[str]:
        """The parameters the kernels or the reference store into: the buffers compared
        (the others are inputs, shared without copies)."""
        names = set(stored_params(self.funcs[name]))
        if name in self.references:
            names |= set(stored_params(self.references[name]))
        return [p.name for p in self.params(name) if p.name in names]

    def cases(self, name: str) -> list[dict[str, int]]:
        return self.recipe(name).cases(self.params(name), self.sizes)

    def prepare(self, name: str, case: Mapping[str, int], seed: int = 0) -> Prepared:
        """Inputs (and every size) for one run of ``name``."""
        return self.recipe(name).prepare(
            self.params(name),
            dict(case),
            self.sizes,
            np.random.default_rng(seed),
            self.runner.host_dtype,
            pool=self.pool,
        )

    def run_function(
        self,
        name: str,
        prepared: Prepared,
        hook: LaunchHook | None = None,
    ) -> tuple[dict[str, np.ndarray], list[Launch]]:
        """Run one function's kernels on the device; every buffer after, and the launches."""
        lowered = self.lowered[name]
        out, launches = self.runner.run(
            lowered, prepared.arrays, lowered.host_env(prepared.env), hook, self.written(name)
        )
        return out, [Launch(c.kernel, list(g), list(loc)) for c, (g, loc) in launches]

    def run_reference(self, name: str, prepared: Prepared) -> dict[str, np.ndarray]:
        params = [(p.name, p.is_buffer) for p in self.params(name)]
        return run_reference(
            self._reference_lib(),
            name,
            params,
            fp32_inputs(prepared.arrays),
            prepared.scalars,
            self.written(name),
        )

    def launches(self, name: str, prepared: Prepared) -> list[Launch]:
        """The launches the host code makes for these inputs (nothing is run)."""
        lowered = self.lowered[name]
        env = lowered.host_env(prepared.env)
        result = []
        for call in lowered.calls:
            g, loc = call.launch(env)
            result.append(Launch(call.kernel, list(g), list(loc)))
        return result

    def time_function(
        self, name: str, case: Mapping[str, int], repeat: int = 10, min_seconds: float = 0.0
    ) -> float:
        """Median device seconds of one call of the function's kernels."""
        prepared = self.prepare(name, case)
        lowered = self.lowered[name]
        return self.runner.time(
            lowered,
            prepared.arrays,
            lowered.host_env(prepared.env),
            repeat=repeat,
            min_seconds=min_seconds,
        )

    def check(self, name: str, hook: LaunchHook | None = None, seed: int = 0) -> list[CaseResult]:
        """Run the function for each test case; raises NotChecked when it cannot be."""
        reason = self.why_not_checked(name)
        if reason:
            raise NotChecked(reason)
        return [self.check_case(name, case, hook, seed) for case in self.cases(name)]

    def check_case(
        self, name: str, case: Mapping[str, int], hook: LaunchHook | None = None, seed: int = 0
    ) -> CaseResult:
        start = time.perf_counter()
        prepared = self.prepare(name, case, seed)
        ref = self.run_reference(name, prepared)
        try:
            got, launches = self.run_function(name, prepared, hook)
        except Exception as e:  # noqa: BLE001 - a build or launch error fails the check
            try:
                launches = self.launches(name, prepared)
            except Exception:  # noqa: BLE001
                launches = []
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return CaseResult(
                name,
                prepared.case,
                launches,
                float("inf"),
                float("inf"),
                False,
                None,
                message[:200],
                time.perf_counter() - start,
                self.known_issues.get(name),
            )
        worst, max_abs, max_rel = None, 0.0, 0.0
        for buf, expected in ref.items():
            err, rel = compare(got[buf], expected)
            if worst is None or rel > max_rel:
                worst = buf
            max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        passed = max_rel <= self.tolerance
        return CaseResult(
            name,
            prepared.case,
            launches,
            max_abs,
            max_rel,
            passed,
            worst,
            None,
            time.perf_counter() - start,
            None if passed else self.known_issues.get(name),
        )

    def check_all(self, progress: Any = None) -> VerifyReport:
        report = VerifyReport(
            target=str(self.target.kind.name),
            device=self.runner.info.describe(),
            as_float=self.runner.as_float,
            tolerance=self.tolerance,
        )
        start = time.perf_counter()
        for name in self.funcs:
            try:
                results = self.check(name)
            except NotChecked as e:
                report.not_checked.append(NotCheckedFunction(name, self.kernels(name), str(e)))
                continue
            report.results.extend(results)
            if progress is not None:
                progress(results)
            # The last run's buffers, should a cycle hold them, before the next function's:
            # they are young. A full collection costs 0.1 s a function among TVM's objects.
            gc.collect(1)
        report.seconds = time.perf_counter() - start
        return report


_GENERIC = Recipe()


def bundle_stale_kernels(
    checker: KernelChecker, device_code: bytes, prefix: str, names: Iterable[str] | None = None
) -> list[str]:
    """Kernels whose recompiled source is not in the bundle's device code (``devc.o`` of
    its .tar, where the OpenCL source is stored as text, symbols prefixed)."""
    from .lower import kernel_definition

    stale = []
    for name in names or checker.lowered:
        lowered = checker.lowered[name]
        for call in lowered.calls:
            definition = kernel_definition(lowered.sources[call.kernel], call.kernel)
            definition = definition.replace(
                f"__kernel void {call.kernel}(", f"__kernel void {prefix}{call.kernel}(", 1
            )
            if definition.encode() not in device_code:
                stale.append(call.kernel)
    return stale
