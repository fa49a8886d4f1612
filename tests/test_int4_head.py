"""The output layer in 4 bits too (``q4f16t``, ``q4f32t``): untied, and tied, where
the fp16 embedding table stays for the lookup and the output layer is a 4-bit copy of it.

The compiled model is checked against transformers running the weights the bundle's
tensors stand for (the dequantized 4-bit layers and the dequantized 4-bit head), the
tensor cache against the memory plan, the split output layer against the whole one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import (
    assert_matches_fp32,
    compile_bundle,
    greedy_compare,
    load_cache_rows,
    prompt_ids,
    top2_margins,
)
from model_shapes import LLAMA_3_2_1B
from test_int4 import _hf_weights_from_bundle, _load_into, reference_dequantize
from tiny_models import make_llama, make_model

from mlc_edge.compiler.targets import TARGETS
from mlc_edge.config import ModelSpec
from mlc_edge.memory.plan import records_from_metadata, weight_breakdown
from mlc_edge.memory.sources import tensor_cache_records
from mlc_edge.models.parameters import parameter_list
from mlc_edge.runtime import Engine

SIZES = {"context_window_size": 512, "prefill_chunk_size": 16, "max_batch_size": 1}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama(request, tmp_path_factory):
    """A tiny Llama (untied or tied) and its ``q4f32t`` bundle."""
    tied = request.param
    path = tmp_path_factory.mktemp("tied" if tied else "untied")
    model = make_llama(path / "hf", tie_word_embeddings=tied)
    bundle = compile_bundle(path / "hf", path / "q4f32t", "--quantization", "q4f32t")
    return model, path, bundle


def _reference(model, bundle, group: int = 32):
    """transformers running what the bundle stands for: the 4-bit layers dequantized, the
    output layer the dequantized 4-bit head (a tied model is untied for it: its embedding
    keeps the checkpoint's table, as the bundle's does)."""
    reference = _load_into(model, _hf_weights_from_bundle(bundle, model, group))
    head = reference_dequantize(load_cache_rows(bundle), "lm_head", group)  # [out, in]
    reference.lm_head.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(head)))
    reference.config.tie_word_embeddings = False
    return reference


def test_q4f32t_matches_transformers_on_the_dequantized_head(llama):
    model, _, bundle = llama
    cache = load_cache_rows(bundle)
    assert cache["lm_head.qweight"].dtype == np.int32 and "lm_head.weight" not in cache
    # The lookup table is the checkpoint's, unquantized.
    np.testing.assert_array_equal(
        cache["model.embed_tokens.weight"], model.get_input_embeddings().weight.detach().numpy()
    )
    reference = _reference(model, bundle)
    ids = prompt_ids(model.config.vocab_size)
    # The head's quantization is real: the float head's logits are far from it.
    layers = _hf_weights_from_bundle(bundle, model, 32)
    layers.pop("lm_head.weight", None)  # the untied model's: its float head, here
    original = _load_into(model, layers)
    with torch.no_grad():
        drift = reference(torch.tensor([ids])).logits - original(torch.tensor([ids])).logits
    assert float(drift.abs().max()) > 1e-2
    assert_matches_fp32(Engine(bundle), reference, ids)


def test_q4f16t_greedy_tokens_match_on_decisive_steps(tmp_path):
    model = make_llama(tmp_path / "hf", tie_word_embeddings=True)
    bundle = compile_bundle(tmp_path / "hf", tmp_path / "b", "--quantization", "q4f16t")
    cache = load_cache_rows(bundle)
    assert cache["lm_head.scales"].dtype == np.float16
    assert cache["model.embed_tokens.weight"].dtype == np.float16
    reference = _reference(model, bundle)
    ids = prompt_ids(model.config.vocab_size, seed=1)
    ours, theirs, _ = greedy_compare(Engine(bundle), reference, ids)
    decisive = [i for i, m in enumerate(top2_margins(reference, ids, theirs)) if m > 0.05]
    assert len(decisive) >= len(theirs) - 2
    assert [ours[i] for i in decisive] == [theirs[i] for i in decisive]


def test_a_tied_phi_keeps_its_head_bias_beside_the_4bit_copy(tmp_path):
    # Phi's output layer has a bias: tied, the 4-bit head is a copy of the table and the
    # bias stays as the checkpoint has it.
    model = make_model(
        "Phi",
        tmp_path / "hf",
        hidden_size=160,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    assert model.lm_head.bias is not None
    bundle = compile_bundle(tmp_path / "hf", tmp_path / "b", "--quantization", "q4f32t")
    cache = load_cache_rows(bundle)
    np.testing.assert_array_equal(cache["lm_head_bias"], model.lm_head.bias.detach().numpy())
    reference = _reference(model, bundle)
    ids = prompt_ids(model.config.vocab_size)
    assert_matches_fp32(Engine(bundle), reference, ids)


def test_tensor_cache_holds_what_the_memory_plan_predicts(llama):
    _, path, bundle = llama
    hf_config = json.loads((path / "hf" / "config.json").read_text())
    spec = ModelSpec.create(hf_config, "q4f32t", SIZES)
    declared = parameter_list(spec)
    cache = load_cache_rows(bundle)
    assert [(n, tuple(a.shape), str(a.dtype)) for n, a in cache.items()] == [
        (n, s, str(d)) for n, s, d in declared
    ]
    hidden, vocab = hf_config["hidden_size"], hf_config["vocab_size"]
    assert cache["lm_head.qweight"].shape == (hidden, vocab // 8)
    assert cache["lm_head.scales"].shape == (hidden // 32, vocab)
    plan = weight_breakdown(
        records_from_metadata(
            {"params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in declared]}
        )
    )
    assert weight_breakdown(tensor_cache_records(bundle)) == plan
    assert plan.output_pieces == 1 and plan.embedding == vocab * hidden * 4


@pytest.mark.parametrize("tied", [True, False])
def test_memory_plan_of_the_1b_shape(tied):
    """The head shrinks to 4.625 bits a weight (4 bits, an fp16 scale and a 4-bit zero
    per 32); a tied model adds it beside the fp16 table, which stays."""
    config = {**LLAMA_3_2_1B, "tie_word_embeddings": tied}
    plans = {}
    for scheme in ("q4f16t-hf", "q4f16t"):
        params = [
            {"name": n, "shape": list(s), "dtype": d}
            for n, s, d in parameter_list(ModelSpec.create(config, scheme, SIZES))
        ]
        plans[scheme] = weight_breakdown(records_from_metadata({"params": params}))
    table = 128256 * 2048 * 2
    head4 = 128256 * 2048 * 4.625 / 8
    assert head4 == 151_855_104
    before, after = plans["q4f16t-hf"], plans["q4f16t"]
    assert before.output_layer == (0 if tied else table)
    assert after.output_layer == head4 and after.output_pieces == 1
    assert before.embedding == after.embedding == table
    assert before.layers == after.layers
    assert after.total - before.total == head4 - (0 if tied else table)


def test_split_4bit_head_computes_what_the_whole_one_does(llama, tmp_path):
    """A small largest allocation splits the table and the 4-bit head into 3 pieces: the
    pieces are the whole head's columns, bit for bit, and the logits are the same."""
    from test_split_vocab import _limited_cpu

    model, path, whole = llama
    # fp32 rows of 256 bytes: 156 fit, so 3 pieces of 128 rows of the 384 (the fp16-sized
    # rule); every 4-bit layer's tensors are far smaller.
    limit = 40_000
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TARGETS, "cpu", _limited_cpu(limit))
        split = compile_bundle(
            path / "hf", tmp_path / "split", "--target", "cpu", "--quantization", "q4f32t"
        )
    whole_cache, split_cache = load_cache_rows(whole), load_cache_rows(split)
    assert "lm_head.qweight" not in split_cache
    columns = 0
    for i in range(3):
        rows = split_cache[f"lm_head.scales.{i}"].shape[1]
        for part, per in (("qweight", 8), ("qzeros", 8), ("scales", 1)):
            np.testing.assert_array_equal(
                split_cache[f"lm_head.{part}.{i}"],
                whole_cache[f"lm_head.{part}"][:, columns // per : (columns + rows) // per],
            )
        columns += rows
    assert columns == model.config.vocab_size and "lm_head.qweight.3" not in split_cache
    assert max(a.nbytes for a in split_cache.values()) <= limit
    ids = prompt_ids(model.config.vocab_size)
    ours, theirs = Engine(split), Engine(whole)
    np.testing.assert_allclose(ours.prefill(ids), theirs.prefill(ids), rtol=0, atol=1e-5)
    for token in ids[:4]:
        np.testing.assert_allclose(ours.decode(token), theirs.decode(token), rtol=0, atol=1e-5)


def test_verify_passes_with_the_4bit_head(tmp_path, capsys):
    """android-opencl (PoCL): the head's fused dequantize + matmul is checked with the
    layers' in decode, prefill and batch_decode."""
    from helpers import opencl_missing, run_verify_json

    if opencl_missing():
        pytest.skip(opencl_missing())
    make_llama(tmp_path / "hf", tie_word_embeddings=True)
    capsys.readouterr()
    code, report = run_verify_json(
        capsys,
        str(tmp_path / "hf" / "config.json"),
        "--quantization",
        "q4f16t",
        "--num-hidden-layers",
        "1",
        "--seq-lens",
        "1,16",
        "--only",
        "dequantize_int4",
    )
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    int4 = {r["function"] for r in report["results"] if "dequantize_int4" in r["function"]}
    # qkv, o, gate_up, down and the head: in decode, prefill and batch_decode each.
    assert len(int4) == 15, sorted(int4)
    assert not [n for n in report["not_checked"] if "dequantize" in n["function"]]


def test_a_q4_0_gguf_table_becomes_the_4bit_head_with_its_values(tmp_path, capsys):
    """A tied GGUF whose ``token_embd`` is Q4_0: its blocks are the 4-bit head, values
    unchanged (zero points 8, scales d), as for the layers; nothing re-quantized."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_gguf

    from mlc_edge.cli import main
    from mlc_edge.quantization.int4 import dequantize

    model = make_llama(tmp_path / "hf", tie_word_embeddings=True)
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    path = write_gguf(model, tmp_path / "m.gguf", types={"token_embd.weight": q4_0}, tokenizer=True)
    table = model.get_input_embeddings().weight.detach().numpy()
    blocks = gguf.quants.dequantize(gguf.quants.quantize(table, q4_0), q4_0)
    capsys.readouterr()
    main(["convert", str(path), "-o", str(tmp_path / "b"), "--quantization", "q4f16t"])
    assert "re-quantized" not in capsys.readouterr().err
    cache = load_cache_rows(tmp_path / "b")
    head = dequantize(*(cache[f"lm_head.{p}"] for p in ("qweight", "qzeros", "scales")), 32)
    assert np.ascontiguousarray(head.T).tobytes() == blocks.astype(np.float32).tobytes()
    assert (cache["lm_head.qzeros"].view(np.uint32) == 0x88888888).all()


def test_an_awq_checkpoint_keeps_its_bits_and_its_float_head_is_quantized(tmp_path, capsys):
    """AWQ leaves the output layer in float: ``q4f16t`` quantizes it round-to-nearest and
    says so in one line naming ``q4f16t-hf``; the AWQ layers keep their bits."""
    from test_int4 import make_awq_checkpoint

    from mlc_edge.cli import main
    from mlc_edge.quantization.int4 import quantize_rtn

    model = make_llama(tmp_path / "hf")
    _, tensors = make_awq_checkpoint(model, tmp_path / "awq")
    capsys.readouterr()
    main(["convert", str(tmp_path / "awq"), "-o", str(tmp_path / "b"), "--quantization", "q4f16t"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "output layer" in line]
    assert notes == [
        "note: the AWQ checkpoint's output layer is in float; q4f16t quantizes it "
        "round-to-nearest, so the logits are no longer exactly the checkpoint's; "
        "--quantization q4f16t-hf keeps it"
    ]
    cache = load_cache_rows(tmp_path / "b")
    o_proj = "model.layers.1.self_attn.o_proj.qweight"
    assert cache[o_proj].tobytes() == tensors[o_proj].tobytes()
    want = quantize_rtn(tensors["lm_head.weight"].T, 32, "float16")
    for part, tensor in want.items():
        np.testing.assert_array_equal(cache[f"lm_head.{part}"], tensor)


def test_the_4bit_head_builds_for_cuda_and_unpacks_in_registers(tmp_path):
    """CUDA source only (no nvcc): the head is one more fused 4-bit kernel in decode,
    prefill and batch_decode, held to the layers' checks."""
    import dataclasses

    from test_cuda_int4 import _parameters, unpacking_problems

    from mlc_edge.compiler.build import compile_model
    from mlc_edge.compiler.cuda import kernel_sources
    from mlc_edge.compiler.targets import get_target
    from mlc_edge.config import load_preset

    make_llama(tmp_path / "hf", num_hidden_layers=1, tie_word_embeddings=True)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    spec = ModelSpec.create(hf_config, "q4f16t", load_preset("edge-512"))
    source_only = dataclasses.replace(get_target("cuda"), nvcc=False)
    kernels = kernel_sources(compile_model(spec, source_only, "tiny")[0])
    packed = {n: s for n, s in kernels.items() if any("qweight" in p for p in _parameters(s))}
    assert len(packed) == 15, sorted(packed)  # 4 layers' and the head's, in 3 functions
    assert not [p for name, source in packed.items() for p in unpacking_problems(name, source)]
