"""Real fp16 on Intel's CPU OpenCL runtime (``verify --device intel``).

Intel's runtime (``intel-opencl-rt`` from pip, in ``.[dev]``) has ``cl_khr_fp16``: the
kernels run in fp16 as a phone runs them, against an fp32 reference from the same fp16
inputs. What this sees and the float rewrite cannot: a planted ``half`` accumulator in a
copy of our GEMV fails here and passes the rewrite; our kernels stay at the fp16 output
rounding at K = 2048, 4864, 8192 where TVM's stock ones do not. Device selection: by
name, the best present by default, one clear error for a device that is not there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import run_verify_json
from mlc_edge.schedules.adreno import adreno_rules, stock_rules
from model_shapes import LLAMA_3_2_1B
from test_adreno_schedules import kn_matmul, nt_matmul, schedule
from tiny_models import make_llama
from tvm import IRModule

from mlc_edge.cli import main
from mlc_edge.compiler.targets import get_target
from mlc_edge.errors import UserError
from mlc_edge.verify import KernelChecker, OpenCLRunner, Sizes
from mlc_edge.verify.devices import (
    OpenCLDevice,
    available_devices,
    implementation_of,
    intel_library,
    prepare_environment,
    select_device,
)
from mlc_edge.verify.fp16 import FP16_TOLERANCE, FP16_UNIT_ROUNDOFF


def _intel_missing() -> str | None:
    if intel_library() is None:
        reason = "Intel's CPU OpenCL runtime is not installed (pip install -e '.[dev]')"
    elif not any(d.implementation == "intel" for d in available_devices()):
        reason = "Intel's CPU OpenCL runtime is installed but shows no device"
    else:
        return None
    if os.environ.get("MLC_EDGE_REQUIRE_OPENCL") == "1":
        raise RuntimeError(f"MLC_EDGE_REQUIRE_OPENCL=1 but {reason}")
    return reason


pytestmark = pytest.mark.skipif(_intel_missing() is not None, reason=str(_intel_missing()))


@pytest.fixture(scope="module")
def intel() -> OpenCLRunner:
    return OpenCLRunner(device="intel")


def _check(func, runner: OpenCLRunner, rules: list, seq_lens=(16,)):
    target = get_target("android-opencl").tvm_target()
    checker = KernelChecker(
        IRModule({"f": func}),
        schedule(func, rules),
        target,
        Sizes(vocab_size=1, seq_lens=seq_lens, batch_size=2),
        runner=runner,
    )
    return checker, checker.check("f")


# -- the device --------------------------------------------------------------------------


def test_intel_runs_real_fp16(intel):
    assert intel.info.implementation == "intel" and intel.info.fp16
    assert not intel.as_float
    # Intel's pip .icd names a path that does not exist: ours points at the library,
    # beside the system's own .icd files, and keeps the kernels' order of operations.
    vendors = Path(os.environ["OCL_ICD_VENDORS"])
    assert str(intel_library()) in (vendors / "mlc-edge-intel.icd").read_text()
    assert os.environ["CL_CONFIG_USE_VECTORIZER"] == "False"
    assert prepare_environment() == str(vendors)  # idempotent


def test_the_default_is_a_device_with_fp16_and_never_oclgrind(monkeypatch):
    monkeypatch.delenv("MLC_EDGE_OPENCL_DEVICE", raising=False)
    assert select_device().fp16  # Intel's, installed here
    fake = [
        OpenCLDevice("oclgrind", "Oclgrind", "Oclgrind Simulator", False, True, None),
        OpenCLDevice("pocl", "Portable Computing Language", "cpu", False, False, None),
        OpenCLDevice("nvidia", "NVIDIA CUDA", "RTX", False, True, None),
        OpenCLDevice("intel", "Intel(R) OpenCL", "cpu", True, False, None),
    ]
    ranked = [d.implementation for d in sorted(fake, key=OpenCLDevice.rank)]
    assert ranked == ["intel", "nvidia", "pocl", "oclgrind"]
    # "intel" is the CPU runtime, not Intel's GPU driver
    assert implementation_of("Intel(R) OpenCL") == "intel"
    assert implementation_of("Intel(R) OpenCL Graphics") == "Intel(R) OpenCL Graphics"


def test_devices_by_name_and_a_missing_one(monkeypatch, capsys, tmp_path):
    assert select_device("intel").implementation == "intel"
    assert select_device("INTEL(R) OPENCL").implementation == "intel"  # platform name
    monkeypatch.setenv("MLC_EDGE_OPENCL_DEVICE", "intel")
    assert select_device().implementation == "intel"
    with pytest.raises(UserError, match="no OpenCL device matches 'no-such-gpu'.*present: "):
        select_device("no-such-gpu")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    with pytest.raises(SystemExit) as e:  # refused before anything is compiled
        main(["verify", str(tmp_path), "--device", "no-such-gpu"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no OpenCL device matches 'no-such-gpu'"), err


# -- what real fp16 sees -------------------------------------------------------------------

KINDS = {
    # name: (the function at reduction length K, N kept small)
    "gemv_kn": lambda k: kn_matmul(1, k, 64),
    "batch_gemv_kn": lambda k: kn_matmul("batch_size", k, 64),
    "prefill_matmul_kn": lambda k: kn_matmul("seq_len", k, 64),
    "gemv_nk_lm_head": lambda k: nt_matmul("batch_size", k, 64),
}


@pytest.mark.parametrize("k", [2048, 4864, 8192])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_ours_at_the_fp16_rounding_floor_stock_above_it(intel, kind, k):
    """fp32 accumulation rounded once: at most half an fp16 ulp of the largest output
    (fp32 summation adds ~1e-6). TVM's stock rules accumulate in fp16: many times that,
    above the verify tolerance (``fp16.py``)."""
    _, ours = _check(KINDS[kind](k), intel, adreno_rules())
    _, stock = _check(KINDS[kind](k), intel, stock_rules())
    for r in ours:
        assert r.passed and r.max_rel_error <= 1.05 * FP16_UNIT_ROUNDOFF, (r.sizes, r.max_rel_error)
    worst_ours = max(r.max_rel_error for r in ours)
    worst_stock = max(r.max_rel_error for r in stock)
    assert worst_stock > 2 * FP16_UNIT_ROUNDOFF and worst_stock > 2 * worst_ours, worst_stock


def _with_half_accumulator(source: str) -> str:
    """Our GEMV's source with its fp32 register accumulator (``floatN acc[1]``, the
    first variable the kernel declares) declared ``halfN``: every addition then rounds
    to fp16, as a schedule without fp32 accumulation would."""
    m = re.search(r"^\s*float(\d*) (\w+)\[1\];$", source, re.M)
    assert m, source[:1500]
    width, name = m.group(1), m.group(2)
    acc = f"{name}[0]"
    lines = []
    for line in source.splitlines():
        if line == m.group(0):
            line = line.replace(f"float{width} ", f"half{width} ")
        else:
            store = re.match(rf"(\s*){re.escape(acc)} = (.*);$", line)
            read = line if store is None else store.group(2)
            read = read.replace(acc, f"convert_float{width}({acc})")
            if store is not None:
                read = f"{store.group(1)}{acc} = convert_half{width}({read});"
            line = read
        lines.append(line)
    planted = "\n".join(lines)
    assert planted.count(f"convert_half{width}(") >= 2, "the initial and running stores"
    return planted


@pytest.mark.parametrize("fp16", ["auto", "float"])
def test_a_half_accumulator_fails_in_fp16_and_passes_the_float_rewrite(fp16):
    runner = OpenCLRunner(device="intel", fp16=fp16)
    checker, (good,) = _check(kn_matmul(1, 4864, 128), runner, adreno_rules(), (1,))
    assert good.passed, good.max_rel_error
    lowered = checker.lowered["f"]
    (kernel,) = lowered.sources
    lowered.sources[kernel] = _with_half_accumulator(lowered.sources[kernel])
    (planted,) = checker.check("f")
    if fp16 == "auto":  # real fp16: the planted defect is seen
        assert not planted.passed and planted.max_rel_error > FP16_TOLERANCE, planted
    else:  # half rewritten to float: it cannot be
        assert runner.as_float and planted.passed, planted


# -- whole models ----------------------------------------------------------------------------


def test_the_tiny_model_in_fp16(tmp_path, capsys):
    make_llama(tmp_path / "hf")
    code, report = run_verify_json(
        capsys, str(tmp_path / "hf"), "--device", "intel", "--num-hidden-layers", "1"
    )  # the same kernels, faster
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    assert not report["fp16_as_float"] and "2^-11" in report["note"]
    assert report["tolerance"] == FP16_TOLERANCE and "Intel" in report["device"]
    assert report["checked_kernels"] >= 50
    assert all(r["max_rel_error"] is not None for r in report["results"])


def test_one_layer_of_llama_3_2_1b_in_fp16(tmp_path, capsys):
    """Real shapes (K up to 8192, the tied 128256 x 2048 lm_head), one layer, 7-token
    chunks: every kernel within the fp16 budget; our linear layers at the rounding."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    code, report = run_verify_json(
        capsys, str(tmp_path), "--device", "intel", "--num-hidden-layers", "1", "--seq-lens", "7"
    )
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    assert not report["fp16_as_float"]
    heads = [r for r in report["results"] if r["function"].startswith("fused_NT_matmul")]
    assert len(heads) == 3  # decode/prefill, batch_decode, batch_prefill
    linear = [r for r in report["results"] if re.match(r"(fused_)?(NT_)?matmul", r["function"])]
    assert len(linear) >= 12
    for r in linear:  # one rounding (two where a residual add is fused)
        assert r["max_rel_error"] <= 1.25 * FP16_UNIT_ROUNDOFF, (r["function"], r["max_rel_error"])
