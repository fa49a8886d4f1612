"""`mlc-edge verify --traffic`: bytes each kernel moves, counted on Oclgrind by our plugin
(mlc_edge/verify/traffic_plugin/traffic.cpp, mlc_edge/verify/traffic.py).

The plugin counts vector loads exactly; our decode GEMVs load at most 1.15x their
minimum (each weight once, the activation once per 8 columns), the 4-bit ones each packed
word, scale and zero point once; a schedule planted to
read its weight twice is flagged; a library of 1 layer scaled to 3 gives the bytes of
the 3-layer library; the tied lm_head (our NK GEMV, its activation row staged in local
memory once per work-group) stays within the same limit; our decode attention kernel
reads each K/V, query and page-table byte once (TVM's loads 3.16x its minimum), and a
copy of it reading K/V twice is flagged; so at the Llama-3.2-1B shape (TVM's 1.67x).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_oclgrind import needs_oclgrind, oclgrind_checker
from tiny_models import make_llama
from tvm import IRModule
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

from mlc_edge.cli import main
from mlc_edge.compiler.targets import TARGETS, get_target
from mlc_edge.models.decode_attention import decode_attention
from mlc_edge.verify import KernelChecker, Sizes
from mlc_edge.verify.kv_cache import DecodeRecipe
from mlc_edge.verify.oclgrind import Job, OclgrindHost, make_job, plugin_path, run_jobs
from mlc_edge.verify.traffic import (
    COUNT_ONLY,
    RATIO_LIMIT,
    measure_traffic,
    parse_traffic,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return oclgrind_checker(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def decode(tiny):
    (step,) = measure_traffic(tiny, ("decode",), model_layers=3, layers=1).steps
    return step


@needs_oclgrind
def test_the_plugin_counts_vector_and_scalar_loads_exactly():
    # 16 work-items: a float4 vload each (256 bytes), then every one reads a[0] (64 bytes
    # of a 4-byte location) and stores 16 bytes; b is never read.
    source = """__kernel void k(__global float* restrict a, __global float* restrict b) {
      int i = get_global_id(0);
      vstore4(vload4(i, a) * 2.0f + a[0], i, b);
    }"""
    job = Job(
        "k",
        {},
        ["k"],
        {
            "arrays": {"a": np.arange(64, dtype=np.float32), "b": np.zeros(64, np.float32)},
            "workspaces": {},
            "launches": [
                {
                    "kernel": "k",
                    "source": source,
                    "global": [16],
                    "local": [16],
                    "args": [("buffer", "a"), ("buffer", "b")],
                }
            ],
        },
    )
    (output,) = run_jobs([job], COUNT_ONLY, plugin=plugin_path())
    ((kernel, args, other),) = parse_traffic(output.traffic)
    assert kernel == "k" and other == (0, 0)
    # (loaded, stored, distinct loaded, distinct stored) per argument
    assert dict(args) == {0: [256 + 64, 0, 256, 0], 1: [0, 256, 0, 256]}


@needs_oclgrind
def test_our_decode_gemvs_read_each_weight_once(decode):
    linear = [k for k in decode.kernels if k.linear]
    # qkv, o_proj (+ residual), gate_up, down (+ residual), lm_head (untied: KN, ours)
    assert len(linear) == 5, [k.kernel for k in decode.kernels]
    for k in linear:
        weight = max(k.buffers, key=lambda b: b.min_loaded)
        assert weight.loaded == weight.min_loaded, k.as_dict()  # every weight byte once
        assert k.ratio <= RATIO_LIMIT, k.as_dict()
    assert not decode.over_limit()


@needs_oclgrind
def test_our_4bit_decode_gemvs_read_each_word_scale_and_zero_once(tmp_path):
    """``schedules/gpu/gemv_int4.py``, the 4-bit head's included: the packed words, the
    scales and the zero points each loaded once, the step within the limit."""
    checker = oclgrind_checker(tmp_path, "q4f16t", tie_word_embeddings=True)
    (step,) = measure_traffic(checker, ("decode",)).steps
    linear = [k for k in step.kernels if k.linear]
    assert len(linear) == 5 and all("dequantize_int4" in k.function for k in linear)
    for k in linear:
        for role in ("qweight", "scales", "qzeros"):
            (b,) = [b for b in k.buffers if re.search(rf"_{role}\d*$", b.name)]
            assert b.loaded == b.min_loaded > 0, (k.kernel, b)
        assert k.ratio <= RATIO_LIMIT, k.as_dict()
    assert not step.over_limit() and not step.kernels_over_limit()


@needs_oclgrind
def test_every_kernel_of_a_decode_step_is_within_the_limit(decode):
    # not only the linear layers: rope, the KV append and attention too (ours, in
    # mlc_edge/models/); TVM's rope and decode attention loaded 3.2x their minimum
    assert not decode.kernels_over_limit(), [
        (k.kernel, round(k.ratio, 3)) for k in decode.kernels_over_limit()
    ]
    assert {"fused_rope", "batch_decode_paged_kv"} <= {k.function for k in decode.kernels}
    # the same kernels at a lower limit are flagged: the check sees them
    assert decode.kernels_over_limit(1.0)


@needs_oclgrind
def test_our_kv_append_kernel_is_within_the_limit(decode):
    # ours (mlc_edge/models/kv_cache_kernels.py): 16-byte copies, a 4-byte slot each
    (append,) = [k for k in decode.kernels if k.function == "tir_kv_cache_transpose_append"]
    assert append.ratio <= RATIO_LIMIT, append.as_dict()
    assert append.stored == append.min_stored  # every K/V value written once


@needs_oclgrind
def test_a_schedule_that_reads_its_weight_twice_is_flagged(tiny, decode):
    # our qkv GEMV with its K loop run twice over the same rows
    source = tiny.lowered["matmul"].sources["matmul_kernel"]
    loop = re.search(r"for \(long (\w+) = \(long\)0; \1 < \(long\)(\d+); \+\+\1\) \{", source)
    assert loop is not None
    var, n = loop.group(1), int(loop.group(2))
    twice = (
        f"for (long {var}_twice = (long)0; {var}_twice < (long){2 * n}; ++{var}_twice) "
        f"{{ long {var} = {var}_twice % (long){n};"
    )
    planted = source[: loop.start()] + twice + source[loop.end() :]
    (step,) = measure_traffic(tiny, ("decode",), sources={"matmul_kernel": planted}).steps
    kernel = next(k for k in step.kernels if k.kernel == "matmul_kernel")
    good = next(k for k in decode.kernels if k.kernel == "matmul_kernel")
    assert kernel.loaded == 2 * good.loaded and kernel.min_loaded == good.min_loaded
    assert kernel.ratio > 2 and [x.function for x in step.over_limit()] == ["matmul"]


@needs_oclgrind
def test_one_layer_scaled_to_three_is_the_three_layer_library(tmp_path, decode):
    (three,) = measure_traffic(oclgrind_checker(tmp_path, layers=3), ("decode",), layers=3).steps
    assert decode.total_bytes() == pytest.approx(three.total_bytes())
    assert decode.minimum_bytes() == pytest.approx(three.minimum_bytes())


@needs_oclgrind
def test_cli_traffic_json_lists_kernels_and_predictions(tmp_path, capsys):
    make_llama(tmp_path)
    main(
        ["verify", str(tmp_path / "config.json"), "--traffic", "--num-hidden-layers", "1", "--json"]
    )
    data = json.loads(capsys.readouterr().out)
    decode, prefill = data["steps"]
    assert (decode["function"], prefill["function"]) == ("batch_decode", "batch_prefill")
    assert prefill["tokens"] == 16 and decode["model_layers"] == 3
    for k in decode["kernels"]:
        assert {"kernel", "bytes_loaded", "minimum", "ratio"} <= set(k)
    assert decode["kernels_over_limit"] == [] and decode["linear_over_limit"] == []
    per_step = decode["bytes_per_step"]
    gpus = {p["gpu"]: p for p in data["predictions"]}
    for name, spec in TARGETS.items():
        if name.startswith("android-opencl:"):
            bandwidth = spec.limits.memory_bandwidth_gb_s
            assert gpus[spec.limits.name]["predicted_decode_tok_s"] == pytest.approx(
                bandwidth * 1e9 / per_step, rel=1e-3
            )
    assert "not measured" in data["prediction_note"]


def test_cli_says_in_one_line_when_the_plugin_cannot_be_built(tmp_path, monkeypatch, capsys):
    import shutil

    make_llama(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built yet
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "g++" else real_which(name))
    with pytest.raises(SystemExit):
        main(["verify", str(tmp_path / "config.json"), "--traffic"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] in (
        "error: cannot build the Oclgrind traffic plugin: no g++ (apt-get install g++)",
    ) or err[-1].startswith("error: Oclgrind is not installed")


@needs_oclgrind
def test_traffic_tied_lm_head(tmp_path):
    checker = oclgrind_checker(tmp_path, tie_word_embeddings=True)
    (step,) = measure_traffic(checker, ("decode",)).steps
    lm_head = [k for k in step.kernels if k.linear and k.calls_in_layers == 0]
    assert lm_head, [k.kernel for k in step.kernels]
    for k in lm_head:
        assert k.ratio <= RATIO_LIMIT, k.as_dict()


def _kernel_traffic(checker, name: str, sources=None):
    """Bytes of the last (longest) case of function ``name`` alone: (loaded, minimum,
    {buffer: (loaded, minimum)})."""
    job = make_job(checker, name, checker.prepare(name, checker.cases(name)[-1]), sources)
    (output,) = run_jobs([job], COUNT_ONLY, plugin=plugin_path())
    ((_, args, _),) = parse_traffic(output.traffic)
    names = [value for kind, value in job.payload["launches"][0]["args"] if kind == "buffer"]
    positions = [
        i for i, (kind, _) in enumerate(job.payload["launches"][0]["args"]) if kind == "buffer"
    ]
    by_index = dict(zip(positions, names, strict=True))
    buffers = {}
    for index, counts in args:
        phone, here = job.element_bytes.get(by_index[index], (1, 1))
        buffers[by_index[index]] = (counts[0] * phone // here, counts[2] * phone // here)
    return (sum(b[0] for b in buffers.values()), sum(b[1] for b in buffers.values()), buffers)


@needs_oclgrind
def test_our_decode_attention_reads_each_byte_once(decode):
    # ours (mlc_edge/models/decode_attention.py): K/V, the query and the page table once
    # per step; TVM's loaded 16,640 bytes here against 5,272 (3.16x)
    (attention,) = [k for k in decode.kernels if k.function == "batch_decode_paged_kv"]
    assert attention.kernel == "batch_decode_paged_kv_kernel"
    assert attention.ratio <= RATIO_LIMIT, attention.as_dict()
    buffers = {b.name: b for b in attention.buffers}
    for name in ("pages", "Q"):  # every K/V and query byte exactly once
        assert buffers[name].loaded == buffers[name].min_loaded > 0, buffers[name]
    # 40 tokens of 2 KV heads of 16 fp16 values, K and V: all of them
    assert buffers["pages"].min_loaded == 40 * 2 * 16 * 2 * 2
    assert attention.stored == attention.min_stored  # output and lse written once


@needs_oclgrind
def test_tvms_decode_attention_and_ours_reading_kv_twice_are_over_the_limit(tiny):
    name, kernel = "batch_decode_paged_kv", "batch_decode_paged_kv_kernel"
    ours = _kernel_traffic(tiny, name)
    # ours with its tile loop run twice over the same tiles: K, V and the page ids twice
    source = tiny.lowered[name].sources[kernel]
    loop = re.search(r"for \(int tile = 0; tile < (\(.*?\)); \+\+tile\) \{", source)
    assert loop is not None
    twice = (
        f"for (int tile_twice = 0; tile_twice < 2 * {loop.group(1)}; ++tile_twice) "
        f"{{ int tile = tile_twice % {loop.group(1)};"
    )
    planted = _kernel_traffic(
        tiny, name, {kernel: source[: loop.start()] + twice + source[loop.end() :]}
    )
    assert planted[1] == ours[1] and planted[2]["pages"][0] == 2 * ours[2]["pages"][0]
    assert planted[0] / planted[1] > RATIO_LIMIT
    # TVM's own kernel, on the same inputs
    target = get_target("android-opencl").tvm_target()
    stock = KernelChecker(
        IRModule({}),
        IRModule({name: _attention_decode(2, 4, 16, "float16", False, {}, target)}),
        target,
        tiny.sizes,
        runner=OclgrindHost(),
        recipes={name: DecodeRecipe(False, 1e4)},
    )
    loaded, minimum, _ = _kernel_traffic(stock, name)
    assert minimum == ours[1] and loaded / minimum > 3


@needs_oclgrind
def test_decode_attention_at_the_llama_3_2_1b_shape():
    # 32 query heads, 8 KV heads, head_dim 64 (group 4), the kernel alone at 40 tokens:
    # ours at the limit, TVM's 1.67x (every work-item loads lengths, page ids and query)
    name = "batch_decode_paged_kv"
    target = get_target("android-opencl").tvm_target()
    ratios = {}
    for label, func in (
        ("ours", decode_attention(8, 32, 64, "float16", False, target)),
        ("stock", _attention_decode(8, 32, 64, "float16", False, {}, target)),
    ):
        checker = KernelChecker(
            IRModule({}),
            IRModule({name: func}),
            target,
            Sizes(vocab_size=1, seq_lens=(1,)),
            runner=OclgrindHost(),
            recipes={name: DecodeRecipe(False, 1e4)},
        )
        loaded, minimum, buffers = _kernel_traffic(checker, name)
        assert buffers["pages"][1] == 40 * 8 * 64 * 2 * 2  # all of K and V
        ratios[label] = loaded / minimum
    assert ratios["ours"] <= RATIO_LIMIT < ratios["stock"], ratios
