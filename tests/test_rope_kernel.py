"""The KV cache's split-rotary kernel (``fused_rope``): ours vs. TVM's.

TVM's kernel, scheduled by the stock fallback, is one work-item per output value: it
loads the position once per value and each rotated value twice (3.2x its minimum bytes
on the tiny model). Ours (mlc_edge/models/rope_kernel.py) is one work-item per pair
vector. Here it runs on the OpenCL device against numpy's rotate-half RoPE (plain,
llama3-scaled, partial rotary; positions out of order), inside ``mlc-edge verify`` of
the tiny Llama and Phi (PoCL, and real fp16 on Intel), on Oclgrind for races and
out-of-bounds accesses, and through the traffic counter.

On the CPU TVM's kernel computes pow/cos/sin for every value; ours (``split_rotary_cpu``)
computes a token's angles once. It must give TVM's results bit for bit: checked here
against TVM's kernel compiled for this CPU, and verify keeps TVM's as the reference.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tvm_ffi
from helpers import opencl_missing, run_verify_json
from test_oclgrind import needs_oclgrind
from test_verify_fp16 import _intel_missing
from tiny_models import make_model
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.errors import UserError
from mlc_edge.models.rope_kernel import FUSED_ROPE, split_rotary, split_rotary_cpu
from mlc_edge.verify import OpenCLRunner, default_sizes, model_checker
from mlc_edge.verify.lower import lower_for_device
from mlc_edge.verify.oclgrind import OclgrindHost, check_races
from mlc_edge.verify.traffic import RATIO_LIMIT, measure_traffic

needs_opencl = pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))

LLAMA3 = {  # Llama-3.2-1B's
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}
# (q heads, kv heads, head_dim, rotary_dim, theta, rope_scaling)
CASES = {
    "plain": (4, 2, 16, 16, 10000.0, {}),  # the tiny Llama
    "llama3": (32, 8, 64, 64, 500000.0, LLAMA3),  # Llama-3.2-1B
    "partial": (4, 4, 20, 8, 10000.0, {}),  # the tiny Phi: 8 of 20 rotated, 4 values a load
    "phi-2": (4, 4, 80, 32, 10000.0, {}),  # Phi-2's head: 32 of 80
}
SEQ_LEN = 7


def _inv_freq(rotary_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """transformers' inverse frequencies (float64), llama3 smoothing included."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling.get("rope_type") != "llama3":
        return inv
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv / scaling["factor"] + smooth * inv


def _reference(
    qkv: np.ndarray,
    positions: np.ndarray,
    q_heads: int,
    kv_heads: int,
    rotary_dim: int,
    theta: float,
    scaling: dict,
) -> dict[str, np.ndarray]:
    """q, k with rotate-half RoPE on their first ``rotary_dim`` values, v copied; the
    angle in float32 as transformers (and the kernels) compute it, the rest in float64."""
    x = qkv.astype(np.float64)
    inv = _inv_freq(rotary_dim, theta, scaling).astype(np.float32)
    angle = (positions.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    half = rotary_dim // 2
    rotated = x[:, : q_heads + kv_heads].copy()
    x0, x1 = x[:, : q_heads + kv_heads, :half], x[:, : q_heads + kv_heads, half:rotary_dim]
    rotated[..., :half] = x0 * cos - x1 * sin
    rotated[..., half:rotary_dim] = x1 * cos + x0 * sin
    return {"q": rotated[:, :q_heads], "k": rotated[:, q_heads:], "v": x[:, q_heads + kv_heads :]}


def _run(runner: OpenCLRunner, case: str, apply_rope: int = 1, seed: int = 0):
    q_heads, kv_heads, head_dim, rotary_dim, theta, scaling = CASES[case]
    target = get_target("android-opencl").tvm_target()
    func = split_rotary(theta, head_dim, q_heads, kv_heads, "float16", scaling, rotary_dim)
    lowered = lower_for_device({FUSED_ROPE: func}, target)[FUSED_ROPE]
    rng = np.random.default_rng(seed)
    fused = q_heads + 2 * kv_heads
    # fp16 values (exact in the host's dtype too); positions distinct and out of order
    qkv = rng.standard_normal((SEQ_LEN, fused, head_dim)).astype(np.float16)
    positions = rng.permutation(1000)[:SEQ_LEN].astype(np.int32)
    host = runner.host_dtype("float16")
    arrays = {
        "qkv": qkv.astype(host),
        "position_map": positions,
        "q": np.zeros((SEQ_LEN, q_heads, head_dim), host),
        "k": np.zeros((SEQ_LEN, kv_heads, head_dim), host),
        "v": np.zeros((SEQ_LEN, kv_heads, head_dim), host),
    }
    out, launches = runner.run(
        lowered,
        arrays,
        lowered.host_env(
            {"seq_len": SEQ_LEN, "apply_rope": apply_rope, "position_map_elem_offset": 0}
        ),
        written=["q", "k", "v"],
    )
    ref = _reference(qkv, positions, q_heads, kv_heads, rotary_dim, theta, scaling)
    return out, ref, qkv, launches


@pytest.fixture(scope="module")
def runner() -> OpenCLRunner:
    return OpenCLRunner()


@needs_opencl
@pytest.mark.parametrize("case", list(CASES))
def test_ours_matches_rotate_half_rope(case, runner):
    out, ref, _, launches = _run(runner, case)
    for name in ("q", "k", "v"):
        err = np.abs(out[name].astype(np.float64) - ref[name]).max()
        # fp16 output rounding (half an ulp of the largest value, |x| < 8), plus a few
        # float32 ulps of the angle (positions < 1000) times |x|
        assert err <= 2**-11 * 8 + 1e-3, (name, err)
    # v and the values past rotary_dim are copies: exact
    rotary_dim = CASES[case][3]
    np.testing.assert_array_equal(out["v"], ref["v"])
    np.testing.assert_array_equal(out["q"][..., rotary_dim:], ref["q"][..., rotary_dim:])
    ((global_size, local_size),) = [launch for _, launch in launches]
    assert local_size[0] == 256


@needs_opencl
def test_with_apply_rope_zero_everything_is_copied(runner):
    out, _, qkv, _ = _run(runner, "partial", apply_rope=0)
    np.testing.assert_array_equal(out["q"], qkv[:, :4])
    np.testing.assert_array_equal(out["k"], qkv[:, 4:8])
    np.testing.assert_array_equal(out["v"], qkv[:, 8:])


def test_one_work_item_per_pair_vector():
    # 16-byte loads where the half rotary width and the unrotated tail allow
    target = get_target("android-opencl").tvm_target()
    for case, (vec, per_head) in {
        "plain": (8, 1),
        "llama3": (8, 4),
        "partial": (4, 4),
        "phi-2": (8, 8),
    }.items():
        q_heads, kv_heads, head_dim, rotary_dim, theta, scaling = CASES[case]
        func = split_rotary(theta, head_dim, q_heads, kv_heads, "float16", scaling, rotary_dim)
        lowered = lower_for_device({FUSED_ROPE: func}, target)[FUSED_ROPE]
        source = lowered.sources[f"{FUSED_ROPE}_kernel"]
        assert f"vload{vec}(0, qkv_ptr" in source, case
        ((global_size, _),) = [call.launch({"seq_len": 256}) for call in lowered.calls]
        assert global_size[0] == 256 * (q_heads + 2 * kv_heads) * per_head, case


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "does not support"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "does not support"),
        ({"rope_scaling": {"factor": 8.0}}, "has no rope_type"),
        ({"rotary_dim": 7}, "even rotary_dim"),
        ({"rotary_dim": 18}, "even rotary_dim"),
        ({"scale": 2.0}, "rope_scale 1 only"),
    ],
)
def test_what_it_does_not_compute_fails_at_compile_time(kwargs, message):
    args = {
        "theta": 10000.0,
        "head_dim": 16,
        "num_q_heads": 4,
        "num_kv_heads": 2,
        "dtype": "float16",
        "rope_scaling": {},
        "rotary_dim": 16,
        **kwargs,
    }
    with pytest.raises(UserError, match=message):
        split_rotary(**args)


def _module(tmp_path, target_name: str, family: str = "Llama"):
    from tvm import tirx

    from mlc_edge.models.parameters import instantiate

    make_model(family, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    target = get_target(target_name)
    spec = ModelSpec.create(config, "q0f16t", load_preset(target.default_preset))
    model = instantiate(spec, target.tvm_target())
    mod, _, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    return mod[FUSED_ROPE], model.kv_cache_shape(), tirx


@pytest.mark.parametrize("family", ["Llama", "Phi"])
def test_the_model_builds_its_kv_cache_with_our_rope_kernel(tmp_path, family):
    got, kv, _ = _module(tmp_path / "gpu", "android-opencl", family)
    assert tvm_ffi.structural_equal(got, split_rotary(*_kernel_args(kv)))
    cpu, kv, _ = _module(tmp_path / "cpu", "cpu", family)
    assert tvm_ffi.structural_equal(cpu, split_rotary_cpu(*_kernel_args(kv)))


def _kernel_args(kv) -> tuple:
    """A rope kernel's arguments for the model's KV cache shape (fp16)."""
    return (
        kv.rope_theta,
        kv.head_dim,
        kv.num_attention_heads,
        kv.num_key_value_heads,
        "float16",
        kv.rope_scaling,
        kv.rotary_dim,
    )


def _cpu_rope(func):
    import tvm

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target("llvm"))["main"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_cpu_kernel_gives_tvms_results_bit_for_bit(case, dtype):
    """One token (decode) and a chunk of 16, rope applied and not: every output equal to
    TVM's kernel's, bits included (the same expressions in the same order)."""
    import tvm

    q_heads, kv_heads, head_dim, rotary_dim, theta, scaling = CASES[case]
    args = (theta, head_dim, q_heads, kv_heads, dtype, scaling, rotary_dim)
    ours = _cpu_rope(split_rotary_cpu(*args))
    stock = _cpu_rope(llama_rope_with_position_map(args[0], 1, *args[1:]))
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    for seq_len in (1, 16):
        qkv = (rng.standard_normal((seq_len, q_heads + 2 * kv_heads, head_dim)) * 4).astype(dtype)
        positions = rng.permutation(100_000)[:seq_len].astype(np.int32)
        for apply_rope in (1, 0):
            got = []
            for kernel in (ours, stock):
                outs = [
                    tvm.runtime.tensor(np.full((seq_len, n, head_dim), np.nan, dtype), dev)
                    for n in (q_heads, kv_heads, kv_heads)
                ]
                kernel(
                    tvm.runtime.tensor(qkv, dev),
                    tvm.runtime.tensor(positions, dev),
                    *outs,
                    apply_rope,
                )
                got.append([o.numpy() for o in outs])
            for name, a, b in zip("qkv", *got, strict=True):
                assert a.tobytes() == b.tobytes(), (name, seq_len, apply_rope)
            if apply_rope:  # the rotation happened (the check compares something)
                assert not np.array_equal(got[0][0], qkv[:, :q_heads])
            else:
                assert np.array_equal(got[0][0], qkv[:, :q_heads])


def test_a_planted_fault_in_the_cpu_kernel_is_seen():
    """The bit-for-bit check above catches a kernel that swaps the sign of sin."""
    import tvm

    q_heads, kv_heads, head_dim, rotary_dim, theta, scaling = CASES["plain"]
    args = (theta, head_dim, q_heads, kv_heads, "float16", scaling, rotary_dim)
    stock = _cpu_rope(llama_rope_with_position_map(args[0], 1, *args[1:]))
    # TVM's own kernel at position -p rotates by -angle: what a sign error in sin gives
    dev = tvm.cpu()
    qkv = np.random.default_rng(1).standard_normal((1, q_heads + 2 * kv_heads, head_dim))
    qkv = tvm.runtime.tensor(qkv.astype("float16"), dev)
    got = []
    for pos in (37, -37):
        outs = [
            tvm.runtime.tensor(np.zeros((1, n, head_dim), "float16"), dev)
            for n in (q_heads, kv_heads, kv_heads)
        ]
        stock(qkv, tvm.runtime.tensor(np.array([pos], np.int32), dev), *outs, 1)
        got.append(outs[0].numpy())
    ours = _cpu_rope(split_rotary_cpu(*args))
    outs = [
        tvm.runtime.tensor(np.zeros((1, n, head_dim), "float16"), dev)
        for n in (q_heads, kv_heads, kv_heads)
    ]
    ours(qkv, tvm.runtime.tensor(np.array([37], np.int32), dev), *outs, 1)
    assert outs[0].numpy().tobytes() == got[0].tobytes()
    assert outs[0].numpy().tobytes() != got[1].tobytes()


def test_verify_compares_with_tvms_kernel(tmp_path):
    """The CPU build holds ours: verify's reference for ``fused_rope`` is TVM's kernel."""
    _, kv, _ = _module(tmp_path / "cpu", "cpu", "Llama")
    config = json.loads((tmp_path / "cpu" / "config.json").read_text())
    spec = ModelSpec.create(config, "q0f16t", load_preset("edge-512"))
    checker = model_checker(spec, get_target("android-opencl"), runner=None, only="^fused_rope$")
    theta, *rest = _kernel_args(kv)
    stock = llama_rope_with_position_map(theta, 1, *rest)
    assert tvm_ffi.structural_equal(checker.references[FUSED_ROPE], stock)


# -- inside mlc-edge verify (the CPU build's TVM kernel is the reference) -----------------


def _config(tmp_path, family: str, **overrides) -> str:
    make_model(family, tmp_path, **overrides)
    return str(tmp_path / "config.json")


@pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))
@pytest.mark.parametrize("family", ["Llama", "Phi"])
def test_verify_of_the_tiny_models_passes_on_pocl(tmp_path, capsys, family):
    from mlc_edge.verify.devices import available_devices

    if not any(d.implementation == "pocl" for d in available_devices()):
        pytest.skip("PoCL is not installed")
    code, report = run_verify_json(
        capsys,
        _config(tmp_path, family),
        "--num-hidden-layers",
        "1",
        "--only",
        "^fused_rope$",
        "--device",
        "pocl",
    )
    assert code == 0 and report["passed"], report
    assert [(r["function"], r["status"]) for r in report["results"]] == [("fused_rope", "ok")] * 3


@pytest.mark.skipif(_intel_missing() is not None, reason=str(_intel_missing()))
@pytest.mark.parametrize("family", ["Llama", "Phi"])
def test_verify_in_real_fp16_on_intel(tmp_path, capsys, family):
    code, report = run_verify_json(
        capsys,
        _config(tmp_path, family),
        "--num-hidden-layers",
        "1",
        "--only",
        "^fused_rope$",
        "--device",
        "intel",
    )
    assert code == 0 and report["passed"] and not report["fp16_as_float"], report
    assert [(r["function"], r["status"]) for r in report["results"]] == [("fused_rope", "ok")] * 3


# -- Oclgrind: races, out-of-bounds, bytes -------------------------------------------------


@pytest.fixture(scope="module", params=["Llama", "Phi"])
def oclgrind_checker(request, tmp_path_factory):
    """The tiny model's ``fused_rope`` (1 layer) on Oclgrind, for both families."""
    path = tmp_path_factory.mktemp(request.param)
    config = json.loads(open(_config(path, request.param)).read())
    config["num_hidden_layers"] = 1
    target = get_target("android-opencl")
    spec = ModelSpec.create(config, "q0f16t", load_preset(target.default_preset))
    return model_checker(
        spec, target, default_sizes(spec, (1, 7)), OclgrindHost(), only=r"^fused_rope$"
    )


@needs_oclgrind
def test_no_race_or_invalid_access_on_oclgrind(oclgrind_checker):
    report = check_races(oclgrind_checker, ("races", "uninitialized"))
    assert report.passed, "\n".join(report.lines())
    assert report.kernels() == ["fused_rope_kernel"]


@needs_oclgrind
def test_decode_rope_loads_within_the_limit(oclgrind_checker):
    (step,) = measure_traffic(oclgrind_checker, ("decode",)).steps
    (rope,) = [k for k in step.kernels if k.function == FUSED_ROPE]
    # every value once, the 4-byte position once per work-item that rotates
    assert rope.ratio <= RATIO_LIMIT, rope.as_dict()
    assert rope.stored == rope.min_stored  # every q/k/v value written once
