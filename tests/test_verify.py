"""`mlc-edge verify`: every OpenCL kernel run on this machine's OpenCL device (PoCL on the
CPU) and compared with the same function compiled for the CPU.

The checker itself is checked: a correct kernel passes, a launch with half the
work-groups or the wrong work-group size fails, launch sizes match the schedule's
threads, and kernels recompiled with other schedules do not pass for the bundle's.
Real shapes (one layer of Llama-3.2-1B, Qwen2.5-1.5B and a pruned Llama-3.1-8B) are
verified from their config.json alone, with 7-token prefill chunks to keep CI short.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import (
    check_softmax,
    compile_bundle,
    opencl_missing,
    run_verify_json,
    softmax_cases,
)
from model_shapes import LLAMA_3_1_8B_PRUNED, LLAMA_3_2_1B, QWEN2_5_1_5B
from tiny_models import make_llama

from mlc_edge.cli import main
from mlc_edge.compiler.passes.require_kernels import kernel_regions
from mlc_edge.compiler.targets import get_target
from mlc_edge.errors import UserError
from mlc_edge.verify import half_as_float, load_source, model_checker
from mlc_edge.verify.check import bundle_stale_kernels
from mlc_edge.verify.model import library_device_code

pytestmark = pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))

REAL_SHAPES = {
    "llama-3.2-1b": LLAMA_3_2_1B,
    "qwen2.5-1.5b": QWEN2_5_1_5B,
    "llama-3.1-8b-pruned": LLAMA_3_1_8B_PRUNED,
}

# Functions every Llama-like model has, by what they do (names carry numbers).
EXPECTED = (
    "matmul",
    "rms_norm",
    "fused_rope",
    "softmax",
    "take",
    "split",
    "reshape",
    "apply_bitmask_inplace_tir",
    "tir_kv_cache_transpose_append",
    "batch_decode_paged_kv",
    "batch_prefill_paged_kv",
    "batch_prefill_ragged_kv",
)
TREE_ATTENTION = {"batch_tree_attn", "tree_attn_paged_kv"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The tiny Llama compiled for android-opencl through the CLI."""
    root = tmp_path_factory.mktemp("verify")
    make_llama(root / "hf")
    return compile_bundle(root / "hf", root / "tiny-phone", "--target", "android-opencl")


@pytest.fixture(scope="module")
def checker(bundle):
    """The tiny model's kernels, ready to run (only a few, to stay quick)."""
    source = load_source(bundle)
    return model_checker(
        source.spec,
        get_target(source.target_name),
        only=r"^(rms_norm\d*|matmul\d*|fused_rope|apply_bitmask_inplace_tir|"
        r"batch_prefill_paged_kv|tir_attention_merge_state|"
        r"softmax_with_temperature_tir)$",
    )


def _prefill(checker, prefix: str) -> str:
    """The function named ``prefix<n>`` that runs on a chunk (``seq_len`` tokens):
    the names carry numbers that follow the model's definition."""
    for name in checker.funcs:
        shapes = " ".join(str(d) for p in checker.params(name) if p.is_buffer for d in p.shape)
        if re.fullmatch(rf"{prefix}\d*", name) and "seq_len" in shapes:
            return name
    raise AssertionError(f"no prefill {prefix}")


@pytest.fixture(scope="module")
def norm(checker) -> str:
    return _prefill(checker, "rms_norm")  # one kernel: one work-group per token


@pytest.fixture(scope="module")
def matmul(checker) -> str:
    # One kernel with our Adreno rules; TVM's stock matmul adds a padding kernel first.
    return _prefill(checker, "matmul")


# -- the whole model -----------------------------------------------------------------------


def test_every_kernel_of_the_tiny_bundle_passes(bundle, norm, capsys):
    code, report = run_verify_json(capsys, str(bundle))
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    assert report["target"] == "android-opencl" and report["bundle"] == str(bundle)
    # The kernels checked are the bundle's own: each one's source is in its library.
    assert report["stale_kernels"] == []
    checked = {r["function"] for r in report["results"]}
    for kind in EXPECTED:
        assert any(f.startswith(kind) or kind in f for f in checked), kind
    assert {n["function"] for n in report["not_checked"]} == TREE_ATTENTION
    assert report["checked_kernels"] >= 50
    # seq_len kernels ran with each chunk length.
    sizes = [r["sizes"] for r in report["results"] if r["function"] == norm]
    assert sizes == [{"seq_len": 1}, {"seq_len": 7}, {"seq_len": 16}]
    # PoCL has no fp16: the report says what that means.
    if report["fp16_as_float"]:
        assert "not fp16 rounding" in report["note"]
    for r in report["results"]:
        assert r["launches"] and all(
            g % loc == 0
            for k in r["launches"]
            for g, loc in zip(k["global_size"], k["local_size"], strict=True)
        )


def test_text_report_one_row_per_kernel_and_failures_exit_non_zero(
    bundle, checker, norm, matmul, capsys, monkeypatch
):
    import mlc_edge.verify.check as check

    monkeypatch.setattr(check, "TOLERANCE_FLOAT", -1.0)  # nothing can pass
    monkeypatch.setattr(check, "TOLERANCE_FP16", -1.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(bundle), "--only", f"^{norm}$|^{matmul}$"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    if "fp16_as_float" in out or "half rewritten to float" in out:
        assert "not fp16 rounding" in out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.startswith((f"{norm}_kernel", f"{matmul}_kernel"))
    ]
    # the norm: one kernel x 3 chunk lengths; the matmul: its kernels (earlier ones feed
    # the last, checked together) x 3
    n = len(checker.kernels(matmul))
    assert len(rows) == 3 + n * 3
    assert sum("(feeds" in " ".join(row) for row in rows) == 3 * (n - 1)
    assert all(row[0] != f"{norm}_kernel" or "FAIL" in row for row in rows)
    assert f"2 functions ({1 + n} kernels) checked in 6 runs: 6 FAILED" in out


# -- the checker catches what it must --------------------------------------------------------


def test_a_correct_kernel_passes(checker, norm, matmul):
    for name in (norm, matmul):
        results = checker.check(name)
        assert [r.sizes["seq_len"] for r in results] == [1, 7, 16]
        assert all(r.passed and r.max_rel_error < 1e-5 for r in results), results


def _halve_work_groups(kernel: str, launch):
    (global_size, local_size) = launch
    groups = global_size[0] // local_size[0]
    assert groups >= 2, "pick sizes with several work-groups"
    return ((groups // 2) * local_size[0], *global_size[1:]), local_size


def test_half_the_work_groups_is_caught(checker, norm):
    (result,) = [
        r for r in checker.check(norm, hook=_halve_work_groups) if r.sizes["seq_len"] == 16
    ]
    assert not result.passed and result.max_rel_error > 0.1
    assert result.worst_buffer in checker.written(norm)
    (right,) = checker.launches(norm, checker.prepare(norm, {"seq_len": 16}))
    groups = right.global_size[0] // right.local_size[0]
    assert result.launches[0].global_size[0] == (groups // 2) * right.local_size[0]


def test_too_small_work_groups_are_caught(checker, norm, matmul):
    def smaller_groups(kernel: str, launch):
        # As many work-groups, of half the threads: what a runtime launching a kernel
        # with another work-group size than its schedule's does. (Not more groups:
        # those would write past the buffers.)
        global_size, local_size = launch
        return ((global_size[0] // 2, *global_size[1:]), (local_size[0] // 2, *local_size[1:]))

    for name in (norm, matmul):
        results = checker.check(name, hook=smaller_groups)
        assert not any(r.passed for r in results), name


def test_a_chain_of_kernels_is_checked_together(bundle, matmul):
    """TVM's stock prefill matmul is two kernels (one pads the input, the matmul reads the
    padded copy): checked as one function, and a broken first kernel fails it."""
    from mlc_edge.schedules.adreno import stock_rules

    source = load_source(bundle)
    stock = model_checker(
        source.spec, get_target(source.target_name), rules=stock_rules(), only=rf"^{matmul}$"
    )
    first, _ = stock.kernels(matmul)
    assert all(r.passed for r in stock.check(matmul))

    def halve_first(kernel: str, launch):
        return _halve_work_groups(kernel, launch) if kernel == first else launch

    (result,) = [r for r in stock.check(matmul, hook=halve_first) if r.sizes["seq_len"] == 16]
    assert not result.passed


def test_launch_sizes_are_the_host_codes(checker):
    # The GPU logit processors: one thread per (sequence, token), 256 a work-group.
    prepared = checker.prepare(
        "apply_bitmask_inplace_tir", {"batch_size": 2, "vocab_size": 384, "num_seq": 2}
    )
    (launch,) = checker.launches("apply_bitmask_inplace_tir", prepared)
    assert launch.global_size == [math.ceil(2 * 384 / 256) * 256]
    assert launch.local_size == [256]
    # Every kernel's work-group is what its schedule binds to threadIdx.
    for name in checker.funcs:
        if checker.why_not_checked(name):
            continue
        prepared = checker.prepare(name, checker.cases(name)[0])
        launches = checker.launches(name, prepared)
        regions = kernel_regions(checker.funcs[name]).kernels
        assert len(launches) == len(regions), name
        for launch, region in zip(launches, regions, strict=True):
            assert math.prod(launch.local_size) == region.work_group_size(), name


def test_softmax_with_temperature_on_opencl(checker):
    """The phone's kernel at temperatures 0, 1e-6, 1e-5, 0.7 and 1, with ties: one-hot
    when greedy, softmax of logits / T otherwise (the engine samples from this)."""
    name = "softmax_with_temperature_tir"
    assert len(checker.kernels(name)) == 1  # one work-group per row
    logits, temps = softmax_cases(384, 384)
    prepared = checker.prepare(name, {"batch_size": len(temps), "vocab_size": 384})
    prepared.arrays.update(logits=logits, temperature=temps)
    got, _ = checker.run_function(name, prepared)
    check_softmax(got["probs"], logits, 384)


def test_merge_state_passes_with_no_known_issue(checker):
    # TVM's merge_state kernel raced on PoCL (a KNOWN issue); the model now uses ours
    # (tests/test_merge_state.py runs both), so nothing is excused any more.
    assert not checker.known_issues
    results = checker.check("tir_attention_merge_state")
    assert [r.sizes["N"] for r in results] == [1, 7, 16]
    assert all(r.passed and r.max_rel_error < 1e-5 for r in results), results


def test_kernels_of_other_schedules_are_not_the_bundles(bundle, checker, matmul):
    from tvm.s_tir import dlight as dl

    source = load_source(bundle)
    code = library_device_code(source.library)
    assert bundle_stale_kernels(checker, code, source.prefix) == []
    other = model_checker(
        source.spec, get_target(source.target_name), rules=[dl.gpu.Fallback()], only=rf"^{matmul}$"
    )
    assert bundle_stale_kernels(other, code, source.prefix) == [f"{matmul}_kernel"]
    # ... and they are still correct kernels
    assert all(r.passed for r in other.check(matmul))


def test_half_is_rewritten_to_float():
    program = (
        "// Function: k_kernel\n#ifdef cl_khr_fp16\n#pragma OPENCL EXTENSION cl_khr_fp16 : "
        "enable\n#elif defined(cl_amd_fp16)\n#pragma OPENCL EXTENSION cl_amd_fp16 : enable\n"
        '#else\n#error "Half precision floating point not supported"\n#endif\n\n'
        "__kernel void k_kernel(__global half* restrict a, __global half4* b) {\n"
        "  half4 v = convert_half4(vload4(0, (__global float*)a));\n"
        "  a[0] = (half)1.0f; b[0] = v; }\n"
    )
    out = half_as_float(program)
    assert "half" not in out and "#error" not in out and "cl_khr_fp16" not in out
    assert "float4 v = convert_float4(" in out and "(float)1.0f" in out


def test_a_cpu_target_is_refused(bundle):
    with pytest.raises(UserError, match="not an OpenCL target"):
        load_source(bundle, target="cpu")


# -- real shapes, from config.json alone ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_one_layer_of_real_shapes(name, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(REAL_SHAPES[name]))
    # No weights, no tokenizer: the config is all verify needs.
    code, report = run_verify_json(
        capsys, str(tmp_path), "--num-hidden-layers", "1", "--seq-lens", "7"
    )
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    assert report["bundle"] is None and report["stale_kernels"] is None
    assert report["checked_functions"] >= 50
    assert {n["function"] for n in report["not_checked"]} == TREE_ATTENTION
    vocab = REAL_SHAPES[name]["vocab_size"]
    softmax = [r for r in report["results"] if r["function"] == "softmax_with_temperature_tir"]
    assert softmax and softmax[0]["sizes"]["vocab_size"] == vocab
