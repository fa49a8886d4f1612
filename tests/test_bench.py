"""``mlc-edge bench`` (llama-bench's tests and output) and the ``--target cuda`` build."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    compile_bundle,
    greedy_compare,
    library_functions,
    one_error_line,
    prompt_ids,
)
from tiny_models import make_llama

from mlc_edge.cli import main
from mlc_edge.compiler.contract import required_functions
from mlc_edge.compiler.cuda import kernel_format
from mlc_edge.compiler.targets import get_target
from mlc_edge.runtime import Engine
from mlc_edge.runtime.bench import FIELDS, run_bench
from mlc_edge.runtime.cuda import cuda_problem
from mlc_edge.runtime.threads import physical_cores


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = make_llama(root / "hf")
    return model, root


@pytest.fixture(scope="module")
def cpu_bundle(models):
    _, root = models
    return compile_bundle(root / "hf", root / "cpu", "--target", "cpu")


@pytest.fixture(autouse=True)
def _threads_setting_restored(monkeypatch):
    """``bench -t`` sets TVM_NUM_THREADS for the process it runs in: here, pytest's."""
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, *words: str) -> None:
    assert code != 0 and out == ""
    one_error_line(err, *words)


def test_bench_json_has_the_documented_fields(models, cpu_bundle, capsys):
    model, _ = models
    code, out, err = cli(
        capsys, "bench", str(cpu_bundle), "-p", "16,33", "-n", "8", "-r", "3", "-t", "1", "--json"
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["test"] for r in results] == ["pp16", "pp33", "tg8"]
    assert [(r["n_prompt"], r["n_gen"]) for r in results] == [(16, 0), (33, 0), (0, 8)]
    n_params = sum(p.numel() for p in model.parameters())
    for r in results:
        assert list(r) == list(FIELDS)
        assert (r["target"], r["backend"], r["quantization"], r["model_type"]) == (
            "cpu",
            "CPU",
            "q0f16t",
            "llama",
        )
        assert r["model_lib"] == "hf_q0f16t_cpu" and r["model"] == "cpu"
        assert r["n_params"] == n_params and r["size"] == 2 * n_params  # fp16 weights
        assert r["threads"] == 1 and r["repetitions"] == 3
        assert (r["prefill_chunk_size"], r["context_window_size"]) == (16, 512)
        assert len(r["samples_ts"]) == len(r["samples_ns"]) == 3
        tokens = r["n_prompt"] + r["n_gen"]
        expected = [tokens * 1e9 / ns for ns in r["samples_ns"]]
        np.testing.assert_allclose(r["samples_ts"], expected, rtol=1e-3)
        assert r["avg_ts"] == pytest.approx(np.mean(expected), rel=1e-3)
        assert r["stddev_ts"] == pytest.approx(np.std(expected, ddof=1), rel=1e-2, abs=1e-2)
        assert r["avg_ts"] > 0


def _topology(root: Path, cpus: dict[int, tuple[int, int]]) -> Path:
    """A fake ``/sys/devices/system/cpu``: cpu -> (package, core)."""
    for cpu, (package, core) in cpus.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_cores_not_hardware_threads(tmp_path):
    # 2 packages x 2 cores x 2 hardware threads (siblings numbered as Linux does)
    smt = _topology(tmp_path / "smt", {c: (c // 2 % 2, c % 2) for c in range(8)})
    assert physical_cores(range(8), smt) == 4
    assert physical_cores([0, 4], smt) == 1  # the process may run on one core's two threads
    flat = _topology(tmp_path / "flat", {0: (0, 0), 1: (0, 1)})
    assert physical_cores([0, 1], flat) == 2
    assert physical_cores([0, 1, 2], tmp_path / "missing") == 3  # no topology: CPUs


def test_the_engine_runs_a_thread_per_physical_core_unless_told(cpu_bundle):
    """TVM alone would take half the logical CPUs on x86 (one thread on this 2-core,
    1-thread-per-core machine); the engine asks for the cores, and TVM_NUM_THREADS wins."""
    probe = (
        "import sys, tvm; from mlc_edge.runtime import Engine; Engine(sys.argv[1]); "
        "print(tvm.get_global_func('runtime.NumThreads')())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}

    def threads(**extra: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", probe, str(cpu_bundle)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout.split()[-1])

    assert threads() == physical_cores()
    assert threads(TVM_NUM_THREADS="1") == 1


def test_bench_on_a_4bit_bundle(models, capsys):
    """q4f16t-hf: bench runs it; n_params is the model's, size the packed bytes on disk."""
    model, root = models
    bundle = compile_bundle(
        root / "hf", root / "q4", "--target", "cpu", "--quantization", "q4f16t-hf"
    )
    code, out, err = cli(
        capsys, "bench", str(bundle), "-p", "20", "-n", "4", "-r", "1", "-t", "1", "--json"
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["test"] for r in results] == ["pp20", "tg4"]
    n_params = sum(p.numel() for p in model.parameters())
    cache = json.loads((bundle / "tensor-cache.json").read_text())
    records = [r for shard in cache["records"] for r in shard["records"]]
    n_bytes = sum(r["nbytes"] for r in records)
    assert any(r["name"].endswith(".qweight") for r in records)
    for r in results:
        assert (r["quantization"], r["model_lib"]) == ("q4f16t-hf", "hf_q4f16t_hf_cpu")
        assert r["n_params"] == n_params and r["size"] == n_bytes < 2 * n_params
        assert r["avg_ts"] > 0 and len(r["samples_ns"]) == 1
    # The packed words count as the weights they hold, not one parameter each.
    assert cache["metadata"]["ParamSize"] == n_params
    assert cache["metadata"]["BitsPerParam"] == pytest.approx(8 * n_bytes / n_params, abs=1e-3)


def test_pp_prefills_in_chunks_and_tg_decodes_from_empty(cpu_bundle, monkeypatch):
    """pp N: ceil(N / chunk) prefill calls from an empty cache; tg N: N decode calls;
    the warm-up run is made but not counted."""
    engine = Engine(cpu_bundle)
    calls: list[tuple[str, int, int]] = []
    forward = engine._forward

    def spy(func: str, ids: list[int]) -> np.ndarray:
        calls.append((func, len(ids), engine._seq_len))
        return forward(func, ids)

    monkeypatch.setattr(engine, "_forward", spy)
    (pp,) = run_bench(engine, [40], [], repetitions=2, threads=1)
    assert len(pp.samples_ns) == 2
    # 1 warm-up + 2 timed runs, each 16 + 16 + 8 tokens starting from an empty cache.
    assert calls == [("prefill", 16, 0), ("prefill", 16, 16), ("prefill", 8, 32)] * 3
    calls.clear()
    (tg,) = run_bench(engine, [], [5], repetitions=2, threads=1)
    assert calls == [("decode", 1, i) for i in range(5)] * 3
    assert tg.test == "tg5" and engine._seq_len == 0


def test_bench_csv_and_table(cpu_bundle, capsys):
    code, out, err = cli(
        capsys, "bench", str(cpu_bundle), "-p", "16", "-n", "4", "-r", "2", "--csv"
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert list(rows[0]) == list(FIELDS)
    assert all(len(r["samples_ts"].split(";")) == 2 for r in rows)
    assert float(rows[1]["avg_ts"]) > 0 and int(rows[0]["n_prompt"]) == 16

    code, out, err = cli(capsys, "bench", str(cpu_bundle), "-p", "16", "-n", "0", "-r", "1")
    assert code == 0, err
    header, rule, row = out.strip().splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model",
        "size",
        "params",
        "backend",
        "threads",
        "test",
        "t/s",
    ]
    assert "pp16" in row and "±" in row and "CPU" in row


@pytest.mark.parametrize(
    "args, words",
    [
        (["-p", "600"], ["-p/--n-prompt 600", "context window of 512"]),
        (["-n", "16,513"], ["-n/--n-gen 513", "context window of 512"]),
        (["-p", "sixteen"], ["-p/--n-prompt"]),
        (["-p", "0", "-n", "0"], ["nothing to run"]),
        (["-r", "0"], ["--repetitions"]),
        (["--json", "--csv"], ["--json", "--csv"]),
    ],
)
def test_bench_refuses_bad_counts(cpu_bundle, capsys, args, words):
    assert_one_error_line(*cli(capsys, "bench", str(cpu_bundle), *args), *words)


def test_bench_refuses_a_library_for_another_target(models, cpu_bundle, capsys):
    _, root = models
    phone = compile_bundle(root / "hf", root / "phone", "--target", "android-opencl")
    assert_one_error_line(*cli(capsys, "bench", str(phone)), "phone", "--target cpu")
    assert_one_error_line(
        *cli(capsys, "bench", str(cpu_bundle), "--device", "cuda"), "compiled for cpu"
    )


def _cuda_bundle(models) -> Path:
    problem = get_target("cuda").build_problem()  # no nvcc, or no cc for the driver stub
    if problem:
        pytest.skip(f"the cuda target cannot be built here: {problem}")
    _, root = models
    out = root / "cuda"
    if not out.exists():
        compile_bundle(root / "hf", out, "--target", "cuda")
    return out


RUNTIME_ONLY_LOAD = """
import sys, tvm, tvm_ffi
from mlc_edge.runtime.cuda import load_cuda_runtime
assert not load_cuda_runtime(build=True)
def refuse(*args):
    raise RuntimeError("the library asked to compile CUDA source at load")
tvm_ffi.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
mod = tvm.runtime.load_module(sys.argv[1])
kinds = []
def walk(m):
    kinds.append(m.kind)
    for i in m.imports:
        walk(i)
walk(mod)
print(",".join(kinds))
"""


def test_cuda_build_holds_compiled_kernels(models, capsys):
    out = _cuda_bundle(models)
    lib = out / "lib" / "hf_q0f16t_cuda.so"
    assert lib.is_file()
    record = json.loads(lib.with_suffix(".json").read_text())
    assert (record["target"], record["device"]) == ("cuda", "cuda")
    assert json.loads(record["tvm_target"])["arch"] == "sm_80"
    data = lib.read_bytes()
    assert kernel_format(lib) == "fatbin" and b"__global__" not in data
    # Default arch: machine code for sm_80 and sm_90 (PTX for newer GPUs beside them).
    assert b"sm_80" in data and b"sm_90" in data
    # A runtime-only TVM loads it without compiling anything.
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY_LOAD, str(lib)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cuda" in done.stdout.strip().split(",")

    code, listing, err = cli(capsys, "targets", "--json")
    cuda = {t["name"]: t for t in json.loads(listing)["targets"]}["cuda"]
    assert cuda["can_build"] and cuda["device"] == "cuda" and cuda["arch"] == "sm_80"
    assert cuda["runs_here"] == (cuda_problem() is None)


def test_cuda_library_exports_what_the_engine_requires(models):
    # CUDA: the engine samples on the GPU and needs the sampler's functions too.
    (library,) = (_cuda_bundle(models) / "lib").glob("*.so")
    assert library_functions(library) == required_functions("cuda")


def test_cuda_bundle_without_a_gpu_gets_one_error_line(models, capsys):
    out = _cuda_bundle(models)
    if cuda_problem() is None:
        pytest.skip("this machine has a CUDA GPU (test_bench_on_cuda runs instead)")
    for command in (["bench", str(out)], ["run", str(out), "hello"]):
        assert_one_error_line(*cli(capsys, *command), "compiled for CUDA", "cannot run here")


def test_bench_on_cuda(models, capsys):
    out = _cuda_bundle(models)
    problem = cuda_problem()
    if problem:
        pytest.skip(f"no CUDA GPU: {problem}")
    code, text, err = cli(capsys, "bench", str(out), "-p", "33", "-n", "8", "-r", "2", "--json")
    assert code == 0, err
    results = json.loads(text)
    assert [(r["test"], r["backend"], r["target"]) for r in results] == [
        ("pp33", "CUDA", "cuda"),
        ("tg8", "CUDA", "cuda"),
    ]
    # The speed is of a correct model: greedy tokens as transformers', logits within a
    # small multiple of fp16's own error (as test_llama_matches_transformers' q0f16t test).
    model, _ = models
    ids = prompt_ids(model.config.vocab_size)
    ours, theirs, errors = greedy_compare(Engine(out), model, ids)
    assert ours == theirs
    with torch.no_grad():
        seq = torch.tensor([ids + theirs[:-1]])
        fp32 = model(seq).logits[0, len(ids) - 1 :]
        fp16 = copy.deepcopy(model).half()(seq).logits[0, len(ids) - 1 :].float()
    assert max(errors) < 4 * float((fp16 - fp32).abs().max()), errors


def test_cuda_benchmark_weights_match_mlc_edge_convert(models, cpu_bundle, tmp_path):
    """benchmarks/cuda_decode.py writes the bundle's weights on the GPU machine from its
    recipe (no TVM compiler there): the same bytes as `mlc-edge convert` writes."""
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "cuda_decode.py"
    spec = importlib.util.spec_from_file_location("cuda_decode", path)
    bench_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_script)
    model, _ = models
    recipe = bench_script.weights_recipe(cpu_bundle)
    assert [p["name"] for p in recipe["params"]][:2] == [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ]
    assert any(p["transpose"] for p in recipe["params"])  # q0f16t: linear weights [in, out]
    bench_script.write_weights(model, recipe, tmp_path)
    ours = json.loads((tmp_path / "tensor-cache.json").read_text())
    theirs = json.loads((cpu_bundle / "tensor-cache.json").read_text())
    assert ours == theirs  # names, shapes, offsets and the shards' md5 sums
    for shard in theirs["records"]:
        name = shard["dataPath"]
        assert (tmp_path / name).read_bytes() == (cpu_bundle / name).read_bytes()
