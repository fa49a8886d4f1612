"""The bundle's contract with MLC's runtime, the CLI, and what bad input gets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import (
    check_softmax,
    compile_bundle,
    library_functions,
    one_error_line,
    prompt_ids,
    softmax_cases,
)
from tiny_models import make_llama

from mlc_edge.compiler.contract import chat_config_fields, required_functions
from mlc_edge.config import ModelSpec
from mlc_edge.convert.tensor_cache import read_tensor_cache_json
from mlc_edge.errors import UserError
from mlc_edge.runtime import Engine, Sampler

REQUIRED_CHAT_CONFIG = (
    "model_type",
    "vocab_size",
    "prefill_chunk_size",
    "model_config",
    "conv_template",
    "version",
    "quantization",
    "context_window_size",
    "sliding_window_size",
    "attention_sink_size",
    "tensor_parallel_shards",
    "pipeline_parallel_stages",
    "active_vocab_size",
    "temperature",
    "top_p",
    "repetition_penalty",
    "tokenizer_files",
    "tokenizer_info",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "model_task",
)
REQUIRED_METADATA = (
    "model_type",
    "quantization",
    "context_window_size",
    "sliding_window_size",
    "attention_sink_size",
    "prefill_chunk_size",
    "max_batch_size",
    "tensor_parallel_shards",
    "pipeline_parallel_stages",
    "kv_state_kind",
    "active_vocab_size",
    "model_task",
    "params",
    "kv_cache",
    "memory_usage",
)
RUNTIME_FUNCTIONS = (
    "_metadata",
    "embed",
    "prefill",
    "decode",
    "batch_prefill",
    "batch_decode",
    "create_tir_paged_kv_cache",
    "alloc_embedding_tensor",
    "softmax_with_temperature",
    "apply_logit_bias_inplace",
    "apply_penalty_inplace",
    "apply_bitmask_inplace",
)


def mlc_edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlc_edge", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    model = make_llama(root / "hf")
    (root / "hf" / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "bos_token_id": 0, "eos_token_id": 1})
    )
    return model, root, compile_bundle(root / "hf", root / "out", "--preset", "edge-768")


def test_bundle_files_follow_the_runtime_contract(bundle):
    _, _, out = bundle
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    for key in REQUIRED_CHAT_CONFIG:
        assert key in chat, key
    assert chat["model_config"]["vocab_size"] == chat["vocab_size"] == 384
    assert chat["model_config"]["prefill_chunk_size"] == chat["prefill_chunk_size"] == 16
    assert chat["context_window_size"] == chat["model_config"]["context_window_size"] == 768
    assert chat["model_config"]["max_batch_size"] == 1 and "max_batch_size" not in chat
    assert (chat["temperature"], chat["top_p"]) == (0.6, 0.9)  # from generation_config.json
    assert "tokenizer.json" in chat["tokenizer_files"] and (out / "tokenizer.json").is_file()
    assert chat["conv_template"]["stop_token_ids"] == [1]

    engine = Engine(out)
    md = engine.metadata
    for key in REQUIRED_METADATA:
        assert key in md, key
    assert (md["context_window_size"], md["prefill_chunk_size"], md["max_batch_size"]) == (
        768,
        16,
        1,
    )
    assert md["kv_cache"] == {
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    assert md["memory_usage"]["prefill"] > 0 and md["memory_usage"]["decode"] > 0
    for name in RUNTIME_FUNCTIONS:
        engine.vm[name]  # raises if the library lacks it

    cache = read_tensor_cache_json(out)
    records = {r["name"]: r for shard in cache["records"] for r in shard["records"]}
    assert [p["name"] for p in md["params"]] == list(records)
    for p in md["params"]:
        assert (records[p["name"]]["shape"], records[p["name"]]["dtype"]) == (
            p["shape"],
            p["dtype"],
        )
    for shard in cache["records"]:
        data = (out / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard" and shard["nbytes"] == len(data)
        assert len(data) <= 32 * 2**20 or len(shard["records"]) == 1
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
    assert cache["metadata"]["ParamBytes"] == sum(r["nbytes"] for r in records.values())


def test_chat_config_and_metadata_agree_on_the_fields_they_share(bundle):
    _, _, out = bundle
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    md = Engine(out).metadata
    shared = set(chat) & set(md)
    assert shared == set(chat_config_fields(ModelSpec.from_chat_config(chat)))
    assert {k: chat[k] for k in shared} == {k: md[k] for k in shared}


def test_cpu_library_exports_what_the_engine_requires(bundle):
    _, _, out = bundle
    (library,) = (out / "lib").glob("*.so")
    assert library_functions(library) == required_functions("cpu")


def test_weights_load_with_tvms_reader_and_keep_their_values(bundle):
    model, _, out = bundle
    load = tvm.get_global_func("vm.builtin.tensor_cache.load")
    get = tvm.get_global_func("vm.builtin.tensor_cache.get")
    load(str(out), tvm.cpu().dlpack_device_type(), 0)
    try:
        qkv = get("model.layers.1.self_attn.qkv_proj.weight").numpy()
        embed = get("model.embed_tokens.weight").numpy()
    finally:
        tvm.get_global_func("vm.builtin.tensor_cache.clear")()
    attn = model.model.layers[1].self_attn
    expected = np.concatenate(
        [
            attn.q_proj.weight.detach().numpy(),
            attn.k_proj.weight.detach().numpy(),
            attn.v_proj.weight.detach().numpy(),
        ]
    ).T.astype("float16")
    np.testing.assert_array_equal(qkv, expected)  # q0f16t: fused, stored [in, out]
    np.testing.assert_array_equal(
        embed, model.model.embed_tokens.weight.detach().numpy().astype("float16")
    )


def test_run_cli_streams_and_reports_speeds(bundle):
    _, _, out = bundle
    text = mlc_edge("run", str(out), "What is the capital of France?", "--max-tokens", "6")
    assert text.returncode == 0, text.stderr
    assert "prefill" in text.stderr and "decode" in text.stderr and "tok/s" in text.stderr
    res = mlc_edge("run", str(out), "What is the capital of France?", "--max-tokens", "6", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert 1 <= len(result["token_ids"]) <= 6
    assert result["finish_reason"] in ("stop", "length")
    assert result["prefill_tokens_per_s"] > 0 and isinstance(result["text"], str)
    # Greedy is deterministic; the streamed text is the JSON text.
    assert text.stdout.strip() == result["text"].strip()


def test_generation_stops_when_the_context_window_is_full(tmp_path):
    model = make_llama(tmp_path / "hf")
    out = compile_bundle(
        tmp_path / "hf", tmp_path / "b", "--quantization", "q0f32t", "--context-window-size", "48"
    )
    engine = Engine(out)
    ids = prompt_ids(model.config.vocab_size)

    # eos is token 1; a sampler that never picks it keeps generating until the window ends
    class NeverEos(Sampler):
        def __call__(self, probs: np.ndarray) -> int:
            return int(np.argmax(probs[2:])) + 2

    result = engine.generate(ids, 1000, NeverEos(1.0))
    assert result.finish_reason == "context window full"
    assert len(ids) + len(result.token_ids) == 48 + 1  # the last token is sampled, not fed


def test_sampler_greedy_top_p_and_seed():
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype="float32")
    probs = np.exp(logits) / np.exp(logits).sum()  # the library's output at temperature 1
    one_hot = np.array([0.0, 1.0, 0.0, 0.0], dtype="float32")  # ... and at temperature 0
    assert Sampler(0.0)(one_hot) == 1
    assert {Sampler(0.0, seed=s)(probs) for s in range(20)} == {1}  # greedy: the argmax
    assert {Sampler(1.0, top_p=0.01, seed=s)(probs) for s in range(20)} == {1}
    a = [Sampler(1.0, seed=7)(probs) for _ in range(1)]
    s1, s2 = Sampler(1.0, seed=3), Sampler(1.0, seed=3)
    assert [s1(probs) for _ in range(30)] == [s2(probs) for _ in range(30)]
    draws = [Sampler(1.0, top_p=0.9, seed=s)(probs) for s in range(200)]
    assert 3 not in draws and {1, 2} <= set(draws) and a[0] in range(4)
    with pytest.raises(UserError, match="non-finite"):
        Sampler(0.0)(np.full(4, np.nan, "float32"))  # what greedy got before the fix


def test_softmax_with_temperature_through_the_vm(bundle):
    _, _, out = bundle
    vm = Engine(out).vm
    logits, temps = softmax_cases(384, 384)
    # One row a call: the library is planned for max_batch_size (1) rows.
    probs = np.concatenate(
        [
            vm["softmax_with_temperature"](
                tvm.runtime.tensor(logits[row : row + 1]), tvm.runtime.tensor(temps[row : row + 1])
            ).numpy()
            for row in range(len(temps))
        ]
    )
    check_softmax(probs, logits, 384)


def test_softmax_with_temperature_zeroes_ids_past_the_active_vocabulary():
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    from mlc_edge.models.decoder import softmax_with_temperature_te

    class Softmax(nn.Module):
        def softmax(self, logits: nn.Tensor, temperature: nn.Tensor) -> nn.Tensor:
            return op.tensor_expr_op(
                softmax_with_temperature_te, "softmax", args=[logits, temperature, 384]
            )

    none = {"param_mode": "none", "effect_mode": "none"}
    mod, _ = Softmax().export_tvm(
        spec={
            "softmax": {
                "logits": nn.spec.Tensor(["batch_size", 1, "vocab_size"], "float32"),
                "temperature": nn.spec.Tensor(["batch_size"], "float32"),
                "$": none,
            }
        }
    )
    vm = relax.VirtualMachine(relax.build(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    logits, temps = softmax_cases(390, 384)
    probs = vm["softmax"](tvm.runtime.tensor(logits), tvm.runtime.tensor(temps)).numpy()
    check_softmax(probs, logits, 384)
    assert not probs[:, 0, 384:].any()


def test_greedy_generation_samples_through_the_library(bundle):
    model, _, out = bundle
    engine = Engine(out)
    ids = prompt_ids(model.config.vocab_size)
    result = engine.generate(ids, 8, Sampler(0.0))
    # The argmax of the logits, step by step: what greedy means.
    engine.reset()
    logits, expected = engine.prefill(ids), []
    for _ in range(len(result.token_ids)):
        expected.append(int(np.argmax(logits)))
        logits = engine.decode(expected[-1])
    assert result.token_ids == expected


def test_logit_processors_match_numpy(bundle):
    _, _, out = bundle
    vm = Engine(out).vm
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 384)).astype("float32")

    x = tvm.runtime.tensor(logits.copy())
    vm["apply_logit_bias_inplace"](
        x,
        tvm.runtime.tensor(np.array([0, 1], "int32")),
        tvm.runtime.tensor(np.array([5, 7], "int32")),
        tvm.runtime.tensor(np.array([2.0, -3.0], "float32")),
    )
    expected = logits.copy()
    expected[0, 5] += 2.0
    expected[1, 7] -= 3.0
    np.testing.assert_allclose(x.numpy(), expected)

    x = tvm.runtime.tensor(logits.copy())
    penalties = np.array([[0.5, 0.25, 1.5]], "float32")
    vm["apply_penalty_inplace"](
        x,
        tvm.runtime.tensor(np.array([1], "int32")),
        tvm.runtime.tensor(np.array([0, 0], "int32")),
        tvm.runtime.tensor(np.array([3, 9], "int32")),
        tvm.runtime.tensor(np.array([2, 1], "int32")),
        tvm.runtime.tensor(penalties),
    )
    expected = logits.copy()
    for tok, cnt in ((3, 2), (9, 1)):
        v = expected[1, tok] - (0.5 + cnt * 0.25)
        expected[1, tok] = v * 1.5 if v < 0 else v / 1.5
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6)

    x = tvm.runtime.tensor(logits.copy())
    bitmask = np.zeros((2, 12), "int32")
    bitmask[0, 0] = 0b101  # tokens 0 and 2 allowed for row 0
    vm["apply_bitmask_inplace"](
        x, tvm.runtime.tensor(np.array([0], "int32")), tvm.runtime.tensor(bitmask)
    )
    got = x.numpy()
    assert np.all(got[0, [1] + list(range(3, 384))] < -1e30)
    np.testing.assert_array_equal(got[0, [0, 2]], logits[0, [0, 2]])
    np.testing.assert_array_equal(got[1], logits[1])


def test_subcommands_build_the_same_bundle_step_by_step(bundle, tmp_path):
    _, root, full = bundle
    hf, out = root / "hf", tmp_path / "steps"
    for args in (
        ["gen-config", str(hf), "-o", str(out), "--preset", "edge-768"],
        ["convert", str(hf), "-o", str(out), "--json"],
        ["compile", str(out), "--json"],
    ):
        res = mlc_edge(*args)
        assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert Path(summary["library"]).is_file() and summary["context_window_size"] == 768
    ids = prompt_ids(384)
    np.testing.assert_array_equal(Engine(out).prefill(ids), Engine(full).prefill(ids))


def test_tokenizer_model_only_checkpoint_gets_a_tokenizer_json(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    hf = tmp_path / "hf"
    make_llama(hf)
    (hf / "tokenizer.json").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(["The capital of France is Paris.", "Small language models run on phones."] * 50)
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(hf / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
    )
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    res = mlc_edge("gen-config", str(hf), "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    text = "The capital of France is Paris"
    assert ours.encode(text, add_special_tokens=False).ids == sp.encode(text)


# -- bad input: one line, non-zero exit, nothing left behind ------------------------------


def _break_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _truncate_weights(hf: Path) -> None:
    path = hf / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


BAD_INPUTS = {
    "missing config.json": (lambda hf: (hf / "config.json").unlink(), [], "config.json"),
    "unsupported architecture": (
        lambda hf: _break_config(hf, architectures=["MambaForCausalLM"]),
        [],
        "not supported",
    ),
    "truncated safetensors": (_truncate_weights, [], "truncated"),
    "weight shape does not fit config": (
        lambda hf: _break_config(hf, intermediate_size=96),
        [],
        "config.json implies",
    ),
    "unknown target": (lambda hf: None, ["--target", "tpu"], "unknown target"),
    "unknown preset": (lambda hf: None, ["--preset", "edge-9000"], "unknown preset"),
    "unknown quantization": (lambda hf: None, ["--quantization", "q4f16"], "unknown quant"),
}


@pytest.fixture(scope="module")
def pristine_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    make_llama(root / "hf")
    return root / "hf"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line(pristine_checkpoint, tmp_path, case):
    import shutil

    breaker, flags, expected = BAD_INPUTS[case]
    hf = tmp_path / "hf"
    shutil.copytree(pristine_checkpoint, hf)
    breaker(hf)
    out = tmp_path / "dist" / "bundle"
    res = mlc_edge("compile", str(hf), "-o", str(out), *flags)
    assert res.returncode != 0
    one_error_line(res.stderr, expected)
    assert not out.exists()
    leftovers = list((tmp_path / "dist").iterdir()) if (tmp_path / "dist").exists() else []
    assert leftovers == []


def test_run_refuses_a_missing_bundle(tmp_path):
    res = mlc_edge("run", str(tmp_path / "nope"), "hi")
    assert res.returncode != 0 and res.stderr.startswith("error:")
    assert "Traceback" not in res.stderr


def test_installed_package_carries_its_presets():
    from mlc_edge.config import load_preset, preset_names

    assert {"edge-512", "edge-768"} <= set(preset_names())
    assert load_preset("edge-768") == {
        "max_batch_size": 1,
        "prefill_chunk_size": 16,
        "context_window_size": 768,
    }
    assert os.path.basename(os.path.dirname(load_preset.__code__.co_filename)) == "config"
