"""The KV cache's merge-state kernel (chunked prefill): ours vs. TVM's, on OpenCL.

TVM's kernel lets every work-item of a head read ``S[n, h]`` and write it back with no
barrier between; on PoCL, which runs a work-group's work-items one after another, all but
the first read an already merged ``S`` (mlc_edge/models/kv_cache_kernels.py). Both kernels
run here on the OpenCL device and are compared with numpy's merge formula.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm_ffi
from helpers import opencl_missing
from tiny_models import make_llama
from tvm import tirx
from tvm.relax.frontend.nn.llm.kv_cache import _merge_state_inplace

from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.models.kv_cache_kernels import MERGE_STATE, merge_state_inplace
from mlc_edge.models.parameters import instantiate
from mlc_edge.verify import OpenCLRunner
from mlc_edge.verify.lower import lower_for_device

# The kernels run on OpenCL (PoCL here); the model-level tests need no device.
needs_opencl = pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))

N = 7  # tokens of a prefill chunk
# (heads, head_dim): the tiny test model, Llama-3.2-1B, Qwen2.5-1.5B, pruned Llama-3.1-8B,
# and 15 heads of 128, where 32 x 15 threads exceed a 256 work-group.
SHAPES = [(4, 16), (32, 64), (12, 128), (24, 128), (15, 128)]


@pytest.fixture(scope="module")
def target():
    return get_target("android-opencl").tvm_target()


@pytest.fixture(scope="module")
def runner() -> OpenCLRunner:
    return OpenCLRunner()


def _inputs(heads: int, head_dim: int, host_dtype, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # log-sum-exps a few units apart, so both sides weigh in and S changes visibly
    return {
        "V": rng.standard_normal((N, heads, head_dim)).astype(host_dtype),
        "S": (3 * rng.standard_normal((N, heads))).astype("float32"),
        "V_other": rng.standard_normal((N, heads, head_dim)).astype(host_dtype),
        "S_other": (3 * rng.standard_normal((N, heads))).astype("float32"),
    }


def _reference(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The merge formula in float64."""
    s, s_other = a["S"].astype(np.float64), a["S_other"].astype(np.float64)
    m = np.maximum(s, s_other)
    w, w_other = np.exp2(s - m), np.exp2(s_other - m)
    v = (a["V"] * w[..., None] + a["V_other"] * w_other[..., None]) / (w + w_other)[..., None]
    return {"V": v, "S": np.log2(w + w_other) + m}


def _run(
    func: tirx.PrimFunc, runner: OpenCLRunner, target, heads: int, head_dim: int
) -> tuple[dict[str, float], list]:
    """Max error of V and S against the reference, and the launches."""
    lowered = lower_for_device({MERGE_STATE: func}, target)[MERGE_STATE]
    arrays = _inputs(heads, head_dim, runner.host_dtype("float16"))
    out, launches = runner.run(
        lowered, arrays, lowered.host_env({"N": N, "H": heads, "D": head_dim}), written=["V", "S"]
    )
    ref = _reference(arrays)
    return {k: float(np.abs(out[k] - ref[k]).max()) for k in ("V", "S")}, launches


def _tolerance(runner: OpenCLRunner) -> float:
    # float on both sides where fp16 runs as float; native fp16 rounds V (|V| < ~5)
    return 1e-5 if runner.as_float else 1e-2


@needs_opencl
@pytest.mark.parametrize(("heads", "head_dim"), SHAPES)
def test_ours_matches_the_merge_formula(heads, head_dim, runner, target):
    errors, launches = _run(
        merge_state_inplace(heads, head_dim, "float16", target), runner, target, heads, head_dim
    )
    assert max(errors.values()) < _tolerance(runner), errors
    ((global_size, local_size),) = [launch for _, launch in launches]
    assert np.prod(local_size) <= 256  # the default Adreno work-group limit
    # every head of every token is one row of work-items
    assert global_size[0] // local_size[0] == N
    assert global_size[1] == heads and local_size[0] * 4 == head_dim


@needs_opencl
def test_tvm_kernel_races_where_work_items_run_one_after_another(runner, target):
    if not runner.device.type & runner.cl.device_type.CPU:
        pytest.skip("a GPU may run a head's work-items in lockstep: the race may not show")
    heads, head_dim = 32, 64  # Llama-3.2-1B: 16 work-items a head
    errors, _ = _run(
        _merge_state_inplace(heads, head_dim, "float16", target, MERGE_STATE),
        runner,
        target,
        heads,
        head_dim,
    )
    # every work-item after a head's first merges with an already merged S
    assert errors["V"] > 0.1 and errors["S"] > 0.1, errors


@needs_opencl
def test_tvm_kernel_skips_heads_that_do_not_fit_its_work_groups(runner, target):
    # 15 heads x 32 work-items > 256: TVM halves to 7 heads a group, 2 groups, and
    # never touches head 14 (on any device). Ours takes 5 heads a group.
    heads, head_dim = 15, 128
    func = _merge_state_inplace(heads, head_dim, "float16", target, MERGE_STATE)
    lowered = lower_for_device({MERGE_STATE: func}, target)[MERGE_STATE]
    arrays = _inputs(heads, head_dim, runner.host_dtype("float16"))
    out, _ = runner.run(
        lowered, arrays, lowered.host_env({"N": N, "H": heads, "D": head_dim}), written=["V", "S"]
    )
    np.testing.assert_array_equal(out["S"][:, 14], arrays["S"][:, 14])
    assert not np.allclose(arrays["S"][:, 14], _reference(arrays)["S"][:, 14])


def _tiny_module(tmp_path, target_name: str):
    make_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    spec = ModelSpec.create(config, "q0f16t", load_preset(get_target(target_name).default_preset))
    target = get_target(target_name).tvm_target()
    model = instantiate(spec, target)
    mod, _, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    return mod, model.kv_cache_shape(), target


def test_the_model_builds_its_kv_cache_with_our_kernel(tmp_path):
    mod, kv, target = _tiny_module(tmp_path, "android-opencl")
    ours = merge_state_inplace(kv.num_attention_heads, kv.head_dim, "float16", target)
    stock = _merge_state_inplace(
        kv.num_attention_heads, kv.head_dim, "float16", target, MERGE_STATE
    )
    got = mod[MERGE_STATE]
    assert _structural_equal(got, ours)
    assert not _structural_equal(got, stock)


def test_a_cpu_build_keeps_tvms_serial_kernel(tmp_path):
    mod, _, _ = _tiny_module(tmp_path, "cpu")
    names = {gv.name_hint for gv in mod.get_global_vars()}
    # (exported under its global symbol)
    assert MERGE_STATE not in names and "merge_state_inplace_cpu" in names


def _structural_equal(a, b) -> bool:
    return bool(tvm_ffi.structural_equal(a, b))
