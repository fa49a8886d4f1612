"""``mlc-edge memory``: the plan's figures against a real bundle, the runtime and MLC's formula."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import compile_bundle, one_error_line
from model_shapes import LLAMA_3_1_8B_PRUNED
from tiny_models import make_llama
from tvm.runtime import ShapeTuple

from mlc_edge.cli import main
from mlc_edge.memory import (
    OUR_FLOOR_BYTES,
    PAGE_SIZE,
    RUNTIME_OVERHEAD_BYTES,
    UPSTREAM_FLOOR_BYTES,
    parse_size,
    plan_from_bundle,
    plan_from_config,
    predict_load,
)
from mlc_edge.runtime import Engine

PRUNED_PARAMS = 4_311_419_904
GB = 10**9


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    make_llama(root / "hf")
    # 100 tokens: not a multiple of the 16-token pages, so the rounding shows.
    return compile_bundle(root / "hf", root / "bundle", "--context-window-size", "100")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pruned") / "config.json"
    path.write_text(json.dumps(LLAMA_3_1_8B_PRUNED))
    return path


def test_bundle_figures_match_the_runtime(bundle: Path) -> None:
    plan, target = plan_from_bundle(bundle, None)
    assert target == "cpu"
    cache = json.loads((bundle / "tensor-cache.json").read_text())
    cache_bytes = sum(r["nbytes"] for shard in cache["records"] for r in shard["records"])
    engine = Engine(bundle)
    loaded = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in engine.params)
    assert plan.weights.total == cache_bytes == loaded
    assert plan.weights.embedding > 0 and plan.weights.output_layer > 0  # untied
    assert plan.weights.num_layers == 3
    assert plan.memory_usage == {k: int(v) for k, v in engine.metadata["memory_usage"].items()}
    assert plan.temp_prefill_bytes == engine.metadata["memory_usage"]["prefill"]
    assert plan.temp_decode_bytes == engine.metadata["memory_usage"]["decode"]

    # KV: context in whole pages plus one; the paged cache TVM creates holds that many.
    kv = engine.metadata["kv_cache"]
    assert plan.kv_tokens == 128 == (math.ceil(100 / PAGE_SIZE) + 1) * PAGE_SIZE
    assert plan.kv_cache_bytes == (
        kv["num_hidden_layers"] * kv["num_key_value_heads"] * kv["head_dim"] * 128 * 2 * 2
    )  # fp16 k and v
    pages = tvm.get_global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
    fresh = engine.vm["create_tir_paged_kv_cache"](
        ShapeTuple([1]),
        ShapeTuple([100]),
        ShapeTuple([16]),
        ShapeTuple([PAGE_SIZE]),
        ShapeTuple([0]),
    )
    assert int(pages(fresh)) * PAGE_SIZE == plan.kv_tokens
    assert plan.logits_bytes == 1 * engine.metadata["active_vocab_size"] * 4
    assert plan.total_bytes == (
        plan.weights.total
        + plan.kv_cache_bytes
        + plan.temp_max_bytes
        + plan.logits_bytes
        + RUNTIME_OVERHEAD_BYTES
    )


def test_pruned_llama_from_config_alone(pruned: Path) -> None:
    plan = plan_from_config(
        json.loads(pruned.read_text()), "android-opencl", "edge-768", "q0f16t", {}
    )
    assert plan.weights.total == 2 * PRUNED_PARAMS
    assert plan.weights.embedding == plan.weights.output_layer == 128256 * 3072 * 2
    assert plan.kv_tokens == 784  # 48 pages of 16 + 1
    assert plan.kv_cache_bytes == 784 * 32 * 8 * 128 * 2 * 2
    assert plan.temp_max_bytes == max(plan.memory_usage.values()) > 0
    assert plan.memory_usage["prefill"] > plan.memory_usage["decode"] > 0
    assert plan.largest_buffer == ("weight model.embed_tokens.weight", 128256 * 3072 * 2)
    assert plan.fits_max_alloc is True  # 751.5 MiB < 1024 MiB
    upstream, ours = plan.loads
    assert (upstream.floor_bytes, ours.floor_bytes) == (UPSTREAM_FLOOR_BYTES, OUR_FLOOR_BYTES)
    assert not upstream.loads and ours.loads and ours.context_fits


def test_load_prediction_by_hand() -> None:
    """MLC's EstimateMemoryUsageOnMode (engine_estimate.py), each term computed by hand."""
    kv = {
        "head_dim": 128,
        "num_key_value_heads": 8,
        "num_attention_heads": 24,
        "num_hidden_layers": 32,
    }
    params = 2 * PRUNED_PARAMS  # 8,622,839,808
    temps = {"prefill": 1_000_000, "decode": 70_000}
    sizes = {"vocab_size": 128256, "prefill_chunk_size": 16}
    # S = 1 sequence (mode "interactive"), P = 16, V = 128256, D = 128, KV = 8, H = 24, L = 32
    temp = 2 * 1_000_000
    per_token = 128 * 8 * 32 * 4 + 1.25  # 131,073.25
    aux = 2 * 88 + 16 * 25 * 8 + 16 * 128 * 32 * 4 + 48 * 2**20  # 50,597,168
    model_ws = 16 * 4 + 1 * 4 + (2 * 16 + 1) * (128 * 24) * 2  # 202,820
    logit_ws = 1 * 20 + 1 * 128256 * 16.125  # 2,068,148
    assert (aux, model_ws, logit_ws) == (50_597_168, 202_820, 2_068_148)

    # 12 GB Adreno phone: 5.4 GB reported, above the 5 GiB floor: refused.
    five = predict_load(params, temps, kv, int(5.4 * GB), 5 * 2**30, 768, **sizes)
    free = 5.4 * GB * 0.85 - params - temp - aux - model_ws - logit_ws
    assert five.memory_bytes == int(5.4 * GB)
    assert five.kv_capacity_tokens == int(free / per_token) == -31_186
    assert not five.loads
    # Our 16 GiB floor: 14,602,888,806.4 - 8,622,839,808 - 54,867,988 = 5,925,180,862.4 free.
    sixteen = predict_load(params, temps, kv, int(5.4 * GB), 16 * 2**30, 768, **sizes)
    free = 16 * 2**30 * 0.85 - params - temp - aux - model_ws - logit_ws
    assert free == 5_925_180_862.4
    assert sixteen.memory_bytes == 16 * 2**30
    assert sixteen.kv_capacity_tokens == int(free / per_token) == 45_205  # 45,220 before
    assert sixteen.loads and sixteen.context_fits
    e = sixteen.engine
    assert (
        e.temp_buffer_bytes,
        e.kv_bytes_per_token,
        e.kv_aux_workspace_bytes,
        e.model_workspace_bytes,
        e.logit_processor_workspace_bytes,
    ) == (temp, per_token, aux, model_ws, logit_ws)
    # A 1.2B fp16 model loads with the upstream floor.
    assert predict_load(2 * 1_235_814_400, temps, kv, 0, 5 * 2**30, 768, **sizes).loads


def test_load_prediction_at_the_boundary() -> None:
    """The tiny Llama's shapes: where the old formula (48 MiB and the logits only,
    4 bytes a token entry) still found room, the engine refuses."""
    kv = {
        "head_dim": 16,
        "num_key_value_heads": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
    }
    sizes = {"vocab_size": 384, "prefill_chunk_size": 16}
    temps = {"prefill": 1000}
    per_token = 16 * 2 * 3 * 4 + 1.25  # 385.25
    aux = 2 * 88 + 16 * 5 * 8 + 16 * 16 * 6 * 4 + 48 * 2**20  # 50,338,608
    model_ws = 16 * 4 + 4 + 33 * (16 * 4) * 2  # 4,292
    logit_ws = 20 + 384 * 16.125  # 6,212
    memory = 100 * 2**20  # x 0.85 = 89,128,960
    # params leaving exactly 1,000 bytes too few
    params = 89_128_960 - 2 * 1000 - aux - model_ws - logit_ws + 1000
    assert params == 38_778_848
    p = predict_load(params, temps, kv, memory, 0, 16, **sizes)
    assert p.kv_capacity_tokens == int(-1000 / per_token) == -2 and not p.loads
    old_free = 89_128_960 - params - 2 * 1000 - 48 * 2**20 - 384 * 4  # the old formula: 14,928
    assert old_free // (16 * 2 * 3 * 4) == 38
    # 300 bytes to spare: less than a token, truncated to 0 tokens: still refused.
    assert predict_load(params - 1300, temps, kv, memory, 0, 16, **sizes).kv_capacity_tokens == 0
    # 3,850 bytes: 9.99 tokens, truncated toward zero.
    p = predict_load(params - 4850, temps, kv, memory, 0, 16, **sizes)
    assert p.kv_capacity_tokens == int(3850 / 385.25) == 9 and p.loads and not p.context_fits


def test_parse_size() -> None:
    assert parse_size("12GB") == 12 * GB
    assert parse_size("5GiB") == 5 * 2**30
    assert parse_size("5.4GB") == int(5.4 * GB)
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")


def test_cli_json_and_budget(pruned: Path, capsys) -> None:
    main(
        [
            "memory",
            str(pruned),
            "--target",
            "android-opencl",
            "--preset",
            "edge-768",
            "--reported-memory",
            "5.4GB",
            "--budget",
            "9GB",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "android-opencl" and len(out["plans"]) == 1
    plan = out["plans"][0]
    for key in (
        "weights",
        "kv_cache",
        "temporaries",
        "logits_bytes",
        "overhead_bytes",
        "total_bytes",
        "largest_buffer",
        "reported_memory_bytes",
        "load",
        "budget_bytes",
        "within_budget",
    ):
        assert key in plan
    assert plan["weights"]["total"] == 2 * PRUNED_PARAMS
    assert plan["reported_memory_bytes"] == int(5.4 * GB)
    assert [p["loads"] for p in plan["load"]] == [False, True]
    assert plan["budget_bytes"] == 9 * GB and plan["within_budget"] is True
    assert plan["total_bytes"] == (
        plan["weights"]["total"]
        + plan["kv_cache"]["bytes"]
        + plan["temporaries"]["max"]
        + plan["logits_bytes"]
        + plan["overhead_bytes"]
    )


def test_cli_table_of_bundle(bundle: Path, capsys) -> None:
    main(["memory", str(bundle)])
    out = capsys.readouterr().out
    assert "TOTAL (peak)" in out
    assert any(
        line.startswith("KV cache tokens") and "128 float16" in line for line in out.splitlines()
    )


def mlc_edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlc_edge", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args",
    [
        ["memory", "/nonexistent/config.json"],
        ["memory", "{pruned}", "--preset", "edge-999"],
        ["memory", "{pruned}", "--budget", "lots"],
        ["memory", "{pruned}", "--target", "nope"],
        ["memory", "{pruned}", "--quantization", "q0f16t,q4f16t-hf"],  # several need --compare
    ],
)
def test_bad_input_is_one_line(pruned: Path, args: list[str]) -> None:
    res = mlc_edge(*[a.replace("{pruned}", str(pruned)) for a in args])
    assert res.returncode != 0
    one_error_line(res.stderr)


def test_phone_bundle_and_compare(tmp_path: Path, capsys) -> None:
    make_llama(tmp_path / "hf")
    out = compile_bundle(tmp_path / "hf", tmp_path / "phone", "--target", "android-opencl")
    capsys.readouterr()
    main(["memory", str(out), "--compare", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "android-opencl"  # the .tar does not load here: recompiled
    labels = [p["label"] for p in result["plans"]]
    assert labels == ["bundle", "edge-512", "edge-768", "mlc-default"]
    bundle, edge512, _, mlc = result["plans"]
    cache = json.loads((out / "tensor-cache.json").read_text())
    assert bundle["weights"]["total"] == cache["metadata"]["ParamBytes"]
    assert bundle["temporaries"] == edge512["temporaries"]  # the bundle is edge-512
    # MLC's defaults: context = max_position_embeddings (512), chunk = min(context, 8192).
    assert (mlc["context_window_size"], mlc["prefill_chunk_size"]) == (512, 512)
    assert mlc["temporaries"]["prefill"] > edge512["temporaries"]["prefill"]
    assert mlc["total_bytes"] > edge512["total_bytes"]


def test_compare_plans_each_scheme(tmp_path: Path, capsys) -> None:
    """--compare --quantization q0f16t,q4f16t-hf: the presets for each scheme, labelled; the
    4-bit weights are smaller, the KV cache the same."""
    make_llama(tmp_path / "hf")
    capsys.readouterr()
    main(
        [
            "memory",
            str(tmp_path / "hf" / "config.json"),
            "--compare",
            "--json",
            "--quantization",
            "q0f16t,q4f16t-hf",
        ]
    )
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert [(p["label"], p["quantization"]) for p in plans] == [
        (f"{name} {q}", q)
        for q in ("q0f16t", "q4f16t-hf")
        for name in ("edge-512", "edge-768", "mlc-default")
    ]
    for fp16, int4 in zip(plans[:3], plans[3:], strict=True):
        assert int4["weights"]["total"] < fp16["weights"]["total"] / 2
        assert int4["kv_cache"] == fp16["kv_cache"]
