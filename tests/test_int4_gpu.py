"""Our GPU rules for fused 4-bit matmuls: the decode GEMV (``schedules/gpu/gemv_int4.py``)
and the prefill matmul (``schedules/gpu/prefill_int4.py``).

The kernels run on this machine's OpenCL device (PoCL) and are compared with the
unscheduled function compiled for the CPU (``mlc_edge.verify``: random words for
``qweight``/``qzeros``); the structure is checked too: our rule (not TVM's) scheduled the
tiny model's 4-bit matmuls, fp32 accumulators. The whole model's 4-bit kernels
pass ``mlc-edge verify`` in ``tests/test_int4.py``.
"""

from __future__ import annotations

import json

import pytest
from mlc_edge.schedules.adreno import adreno_rules
from test_adreno_schedules import accumulator_dtypes, annotations, needs_opencl, schedule
from tiny_models import make_llama
from tvm import IRModule, tirx
from tvm.relax.frontend import nn

from mlc_edge.compiler.build import fuse_into_tir, scheduled_module
from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.quantization import get_scheme
from mlc_edge.verify import KernelChecker, OpenCLRunner, Sizes

GEMV_INT4 = "adreno.gemv_int4"
PREFILL_INT4 = "adreno.prefill_int4"


def int4_function(k: int, n: int, scheme: str, rows: str | int = 1) -> tirx.PrimFunc:
    """The fused dequantize + matmul PrimFunc of one 4-bit linear layer ``[K, N]`` for a
    decode step (``rows`` 1), batch decode (``"batch_size"``) or a prefill chunk
    (``"seq_len"``), as the model build makes it."""
    linear_of = get_scheme(scheme).linear

    class One(nn.Module):
        def __init__(self):
            self.proj = linear_of(k, n, bias=False)

        def forward(self, x):
            return self.proj(x)

    lead = [1, rows] if rows == "seq_len" else [rows, 1]
    model = One()
    model.to("float16")
    spec = {
        "forward": {
            "x": nn.spec.Tensor(lead + [k], "float16"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod = fuse_into_tir()(model.export_tvm(spec=spec)[0])
    (func,) = [
        f
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and "dequantize_int4" in gv.name_hint
    ]
    return func.with_attr("global_symbol", "f")


@pytest.fixture(scope="module")
def runner() -> OpenCLRunner:
    return OpenCLRunner()


def check_on_opencl(runner, func, rule: str, seq_lens: tuple[int, ...]) -> None:
    scheduled = schedule(func, adreno_rules())
    assert annotations(scheduled["f"]) == [rule]
    assert accumulator_dtypes(scheduled["f"]) == {"float32"}
    checker = KernelChecker(
        IRModule({"f": func}),
        scheduled,
        get_target("android-opencl").tvm_target(),
        Sizes(vocab_size=1, seq_lens=seq_lens, batch_size=3),
        runner=runner,
    )
    results = checker.check("f")
    assert results and all(r.passed for r in results), [
        (r.sizes, r.max_rel_error, r.error) for r in results
    ]


@needs_opencl
@pytest.mark.parametrize(
    "k,n,scheme,rows",
    [
        (64, 64, "q4f16t-hf", 1),
        (256, 200, "q4f16t-hf", 1),  # 25 words: a partial tile of threads
        (256, 128, "q4f16t-g128-hf", 1),  # 128-row groups: 32 rows of a group per thread
        (128, 96, "q4f16t-hf", "batch_size"),
        (96, 64, "q4f32t-hf", 1),  # fp32 activations and scales
    ],
)
def test_the_4bit_decode_gemv_matches_the_cpu(runner, k, n, scheme, rows):
    check_on_opencl(runner, int4_function(k, n, scheme, rows), GEMV_INT4, (1,))


@needs_opencl
@pytest.mark.parametrize(
    "k,n,scheme",
    [
        (64, 64, "q4f16t-hf"),
        (128, 200, "q4f16t-hf"),  # 25 words: a partial tile of threads
        (256, 64, "q4f16t-g128-hf"),
        (96, 64, "q4f32t-hf"),
    ],
)
def test_the_4bit_prefill_matmul_matches_the_cpu(runner, k, n, scheme):
    """Chunks of 1, 7, 16 rows and 20 (two passes over the weights)."""
    func = int4_function(k, n, scheme, "seq_len")
    check_on_opencl(runner, func, PREFILL_INT4, (1, 7, 16, 20))


def test_the_rule_takes_the_tiny_models_4bit_decode_matmuls(tmp_path):
    """``mlc-edge compile --target android-opencl --quantization q4f16t-hf``: every 4-bit
    matmul is ours, the GEMV for decode and batch decode, the matmul for prefill."""
    make_llama(tmp_path, num_hidden_layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    spec = ModelSpec.create(config, "q4f16t-hf", load_preset("edge-512"))
    unscheduled, scheduled = scheduled_module(spec, get_target("android-opencl"))
    int4 = [
        gv.name_hint
        for gv, f in unscheduled.functions_items()
        if isinstance(f, tirx.PrimFunc) and "dequantize_int4" in gv.name_hint
    ]
    assert len(int4) == 12, int4  # qkv, o, gate_up, down x decode, prefill, batch_decode
    decode = []
    for name in int4:
        out = unscheduled[name].params[-1].shape
        if isinstance(out[-2], tirx.IntImm) and int(out[-2]) == 1:
            decode.append(name)
            assert annotations(scheduled[name]) == [GEMV_INT4], name
            assert accumulator_dtypes(scheduled[name]) == {"float32"}, name
        else:
            assert annotations(scheduled[name]) == [PREFILL_INT4], name
            assert accumulator_dtypes(scheduled[name]) == {"float32"}, name
    assert len(decode) == 8, decode


def test_every_4bit_kernel_of_the_tiny_model_is_at_the_fp16_floor_on_intel(tmp_path, capsys):
    """Real fp16 (Intel's CPU OpenCL runtime has cl_khr_fp16, as a phone): each 4-bit
    kernel of decode, prefill (chunks of 1, 7, 16) and batch decode, the 4-bit head's
    (``q4f16t``) included, against an fp32 reference from the same fp16 inputs. The
    words unpacked exactly and fp32 accumulation leave one rounding, of the output: at
    most half an fp16 ulp of the largest output (``tests/test_verify_fp16.py`` sees an
    fp16 accumulator well above that)."""
    from helpers import run_verify_json
    from test_verify_fp16 import _intel_missing

    from mlc_edge.verify.fp16 import FP16_UNIT_ROUNDOFF

    if _intel_missing():
        pytest.skip(_intel_missing())
    make_llama(tmp_path, num_hidden_layers=1, tie_word_embeddings=True)
    code, report = run_verify_json(
        capsys,
        str(tmp_path / "config.json"),
        "--device",
        "intel",
        "--quantization",
        "q4f16t",
        "--only",
        "dequantize_int4",
        "--seq-lens",
        "1,7,16",
    )
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] != "ok"]
    assert not report["fp16_as_float"] and "Intel" in report["device"]
    int4 = [r for r in report["results"] if "dequantize_int4" in r["function"]]
    # qkv, o, gate_up, down and the head, in decode, prefill and batch decode each
    assert len({r["function"] for r in int4}) == 15
    for r in int4:
        assert r["max_rel_error"] <= 1.05 * FP16_UNIT_ROUNDOFF, (r["function"], r["sizes"], r)
