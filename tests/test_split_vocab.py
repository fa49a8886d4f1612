"""An embedding / output layer larger than the device's largest buffer, split along the
vocabulary into pieces that fit, computes what the whole table computes.

Tiny models get an artificially small allocation limit on the CPU target, so both tables
split into 3 pieces (the last one shorter): compiled and converted through the CLI, run
with the runtime's Engine and compared with transformers (logits and greedy tokens), the
tensor cache checked piece by piece against the checkpoint. A Qwen2-7B-shaped config
(152064 x 3584 fp16 = 1039.5 MiB) compiles for android-opencl with every weight and
planned buffer within 1024 MiB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    compile_bundle,
    greedy_compare,
    one_error_line,
    opencl_missing,
    prompt_ids,
)
from tiny_models import make_model, tiny_config

from mlc_edge.bundle.steps import require_weights_match
from mlc_edge.cli import main
from mlc_edge.compiler.build import compile_model
from mlc_edge.compiler.targets import TARGETS, get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.convert.tensor_cache import load_tensor_cache
from mlc_edge.errors import UserError
from mlc_edge.memory import make_plan, table
from mlc_edge.models.parameters import TablePiece, parameter_list, table_pieces
from mlc_edge.models.vocab import piece_ranges, vocab_pieces
from mlc_edge.runtime import Engine

MiB = 1 << 20
VOCAB = 1000  # tiny models' hidden 64, fp32: 256-byte rows, a 256,000-byte table
# Above the largest other weight (gate/up: 64 x 320 fp32 = 81,920 bytes), below a third of
# the table: 351 rows fit, so 3 pieces of 336 rows (a multiple of 16), the last 328.
LIMIT = 90_000
# Phi (hidden 80: 320-byte rows) has a larger fc1 (80 x 320 fp32 = 102,400 bytes): 343 rows
# fit the limit that fc1 needs, the same 3 pieces.
PHI_LIMIT = 110_000
PIECES = (336, 336, 328)

# Qwen2-7B's published config.json, one layer (the kernels do not depend on the count).
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 1,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
}


# -- the split ------------------------------------------------------------------------------


def test_pieces_fit_cover_the_vocabulary_and_keep_kernel_friendly_sizes():
    # Qwen2-7B: two equal pieces of 76032 rows (594 x 128), 519.75 MiB each.
    assert vocab_pieces(152064, 3584, "float16", 1024 * MiB) == (76032, 76032)
    assert PIECES == vocab_pieces(VOCAB, 64, "float32", LIMIT)
    for vocab, hidden, dtype, limit in [
        (152064, 3584, "float16", 256 * MiB),
        (128256, 3072, "float32", 1024 * MiB),
        (151936, 1536, "float16", 100 * MiB),
        (VOCAB, 64, "float32", 20_000),
    ]:
        pieces = vocab_pieces(vocab, hidden, dtype, limit)
        row = hidden * np.dtype(dtype).itemsize
        assert sum(pieces) == vocab and len(pieces) > 1
        assert max(pieces) * row <= limit
        assert len(set(pieces[:-1])) == 1 and 0 < pieces[-1] <= pieces[0]
        if limit >= 128 * row * 2:  # room for 128-row multiples: the rows are
            assert pieces[0] % 128 == 0
    assert piece_ranges(PIECES) == [(0, 336), (336, 672), (672, 1000)]
    # No limit, a table that fits, or not even one row that fits (the guard's case): whole.
    assert vocab_pieces(VOCAB, 64, "float32", None) == (VOCAB,)
    assert vocab_pieces(VOCAB, 64, "float32", VOCAB * 256) == (VOCAB,)
    assert vocab_pieces(VOCAB, 64, "float32", 255) == (VOCAB,)


@pytest.mark.parametrize(
    "quantization, head_piece",
    [
        ("q0f16t", lambda rows: (64, rows)),
        ("q0f32t", lambda rows: (64, rows)),
        ("q0f16", lambda rows: (rows, 64)),
    ],
)
def test_each_scheme_stores_the_pieces_in_its_layout(quantization, head_piece):
    hf = {**tiny_config("Llama", vocab_size=VOCAB).to_dict(), "architectures": ["LlamaForCausalLM"]}
    spec = ModelSpec.create(hf, quantization, load_preset("edge-512"))
    itemsize = np.dtype(spec.scheme.dtype).itemsize
    limit = LIMIT * itemsize // 4  # the same 3 pieces in fp16 and fp32
    split = spec.for_device(limit)
    assert spec.for_device(None) is spec and split.for_device(limit // 2) is split
    shapes = {n: s for n, s, _ in parameter_list(split)}
    for i, rows in enumerate(PIECES):
        assert shapes[f"model.embed_tokens.weight.{i}"] == (rows, 64)
        assert shapes[f"lm_head.weight.{i}"] == head_piece(rows)
    assert "model.embed_tokens.weight" not in shapes and "lm_head.weight" not in shapes
    assert [n for n in shapes if "embed" not in n and "lm_head" not in n] == [
        n for n, _, _ in parameter_list(spec) if "embed" not in n and "lm_head" not in n
    ]


@pytest.mark.parametrize("family, tied", [("Llama", False), ("Qwen2", True)])
def test_the_model_declares_each_pieces_rows(family, tied):
    """The converter takes each piece's rows from the model definition."""
    hf = {
        **tiny_config(family, vocab_size=VOCAB, tie_word_embeddings=tied).to_dict(),
        "architectures": [f"{family}ForCausalLM"],
    }
    spec = ModelSpec.create(hf, "q0f32t", load_preset("edge-512"))
    assert table_pieces(spec) == {}
    tables = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert table_pieces(spec.for_device(LIMIT)) == {
        f"{table}.{i}": TablePiece(table, rows)
        for table in tables
        for i, rows in enumerate(piece_ranges(PIECES))
    }


def test_the_cpu_target_has_no_limit_and_does_not_split():
    spec = ModelSpec.create(QWEN2_7B, "q0f16t", load_preset("edge-512"))
    assert get_target("cpu").limits is None
    names = [n for n, _, _ in parameter_list(spec)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names


# -- tiny models, split, against transformers -------------------------------------------------


def _limited_cpu(limit: int):
    """This machine's CPU target with a ``limit``-byte largest allocation."""
    phone = get_target("android-opencl").limits
    return get_target("cpu").with_limits(phone.replace(max_mem_alloc_bytes=limit))


@dataclass
class Split:
    hf: Any  # the transformers model
    out: Path  # the bundle
    tied: bool
    limit: int
    hidden: int


@pytest.fixture(
    scope="module",
    params=[("Llama", False, LIMIT), ("Qwen2", True, LIMIT), ("Phi", False, PHI_LIMIT)],
    ids=["llama-untied", "qwen2-tied", "phi-untied-bias"],
)
def split_bundle(request, tmp_path_factory) -> Split:
    """``mlc-edge compile MODEL_DIR --target cpu`` where the CPU has a small largest
    allocation (q0f32t, for exact comparisons)."""
    family, tied, limit = request.param
    root = tmp_path_factory.mktemp(family)
    hf = make_model(family, root / "hf", vocab_size=VOCAB, tie_word_embeddings=tied)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TARGETS, "cpu", _limited_cpu(limit))
        out = compile_bundle(
            root / "hf", root / "bundle", "--target", "cpu", "--quantization", "q0f32t"
        )
    return Split(hf, out, tied, limit, hf.config.hidden_size)


def test_split_model_matches_transformers(split_bundle):
    engine = Engine(split_bundle.out)
    ours, theirs, errors = greedy_compare(engine, split_bundle.hf, prompt_ids(VOCAB))
    assert ours == theirs
    assert max(errors) < 1e-4


def test_embed_equals_take_on_the_whole_table(split_bundle):
    import tvm

    hf, out = split_bundle.hf, split_bundle.out
    engine = Engine(out)
    # Every piece's first and last row, and ids spread over the whole vocabulary.
    ids = sorted({0, 335, 336, 337, 671, 672, 673, 998, 999, *range(5, VOCAB, 97)})
    table = hf.get_input_embeddings().weight.detach().numpy()
    chunk = engine.prefill_chunk_size  # the most tokens embed is compiled for
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        got = engine.vm["embed"](
            tvm.runtime.tensor(np.array(part, dtype="int32")), engine.params
        ).numpy()
        np.testing.assert_array_equal(got, table[part])


def test_tensor_cache_holds_the_pieces_and_no_whole_table(split_bundle):
    hf, out, tied = split_bundle.hf, split_bundle.out, split_bundle.tied
    cache = load_tensor_cache(out)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    tables = {"model.embed_tokens.weight": False}  # name -> stored transposed ([in, out])
    if not tied:
        tables["lm_head.weight"] = True
    for name, transposed in tables.items():
        assert name not in cache
        for i, (start, stop) in enumerate(piece_ranges(PIECES)):
            rows = state[name][start:stop]
            np.testing.assert_array_equal(cache[f"{name}.{i}"], rows.T if transposed else rows)
        assert f"{name}.{len(PIECES)}" not in cache
    if tied:
        assert not any(n.startswith("lm_head") for n in cache)
    # Within the limit, every weight of the bundle; and the library's list is the cache's.
    assert max(a.nbytes for a in cache.values()) <= split_bundle.limit
    metadata = Engine(out).metadata
    assert [p["name"] for p in metadata["params"]] == list(cache)


def test_bundle_records_the_split_and_recompiles_with_it(split_bundle):
    out = split_bundle.out
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat["model_config"]["max_alloc_bytes"] == split_bundle.limit
    # Recompiled from the bundle for the plain CPU (no limit), it keeps the pieces.
    spec = ModelSpec.from_chat_config(chat)
    require_weights_match(spec, out)
    assert [n for n, _, _ in parameter_list(spec) if "embed" in n] == [
        f"model.embed_tokens.weight.{i}" for i in range(3)
    ]


def test_memory_plan_counts_the_pieces(split_bundle):
    out, tied, limit, hidden = (
        split_bundle.out,
        split_bundle.tied,
        split_bundle.limit,
        split_bundle.hidden,
    )
    metadata = Engine(out).metadata
    plan = make_plan(
        metadata, label="bundle", target="cpu", kv_dtype="float32", max_alloc_bytes=limit
    )
    assert plan.weights.embedding == VOCAB * hidden * 4
    assert plan.weights.embedding_pieces == 3
    assert plan.weights.output_pieces == (0 if tied else 3)
    # The largest weight is a piece (the tiny model's KV pages, not checked here, are
    # larger than this artificial limit).
    assert plan.weights.largest_bytes == 336 * hidden * 4 <= limit
    assert plan.weights.largest_name.endswith(".weight.0")
    assert plan.temp_max_bytes <= limit
    assert any("weights: embedding" in line and "in 3 pieces" in line for line in table([plan]))


def test_whole_weights_compiled_for_a_limit_that_splits_are_refused(split_bundle, tmp_path, capsys):
    """A bundle converted without a target keeps whole tables: compiling it for a device
    that needs them split says how to make it, in one line, and writes no library."""
    out = split_bundle.out
    plain = tmp_path / "plain"
    for step in ("gen-config", "convert"):
        main(
            [step, str(out.parent / "hf"), "-o", str(plain), "--quantization", "q0f32t"]
            + (["--json"] if step == "convert" else [])
        )
    assert (
        "max_alloc_bytes"
        not in json.loads((plain / "mlc-chat-config.json").read_text())["model_config"]
    )
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TARGETS, "cpu", _limited_cpu(split_bundle.limit))
        with pytest.raises(SystemExit) as exit_info:
            main(["compile", str(plain), "--target", "cpu"])
    assert exit_info.value.code == 1
    line = one_error_line(capsys.readouterr().err, "mlc-edge compile MODEL_DIR --target")
    assert line.startswith("error: the bundle's embedding/output layer")
    assert not (plain / "lib").exists()


def test_stepwise_bundle_for_the_target_splits_like_compile(split_bundle, tmp_path):
    """``gen-config --target`` + ``convert --target`` + ``compile BUNDLE --target`` give the
    tensor cache and library that ``compile MODEL_DIR --target`` gives."""
    out = split_bundle.out
    steps = tmp_path / "steps"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TARGETS, "cpu", _limited_cpu(split_bundle.limit))
        for step in ("gen-config", "convert"):
            main(
                [
                    step,
                    str(out.parent / "hf"),
                    "-o",
                    str(steps),
                    "--quantization",
                    "q0f32t",
                    "--target",
                    "cpu",
                ]
                + (["--json"] if step == "convert" else [])
            )
        compile_bundle(steps, steps, "--target", "cpu")
    assert (
        json.loads((steps / "mlc-chat-config.json").read_text())["model_config"]["max_alloc_bytes"]
        == split_bundle.limit
    )
    stepwise, whole = load_tensor_cache(steps), load_tensor_cache(out)
    assert set(stepwise) == set(whole) and "model.embed_tokens.weight.2" in stepwise
    ids = prompt_ids(VOCAB)
    np.testing.assert_allclose(Engine(steps).prefill(ids), Engine(out).prefill(ids), atol=1e-6)


# -- the guard still refuses what no split helps -----------------------------------------------


def test_pieces_split_for_a_larger_limit_are_refused_with_the_fix(split_bundle):
    out, hidden = split_bundle.out, split_bundle.hidden
    spec = ModelSpec.from_chat_config(json.loads((out / "mlc-chat-config.json").read_text()))
    smaller = _limited_cpu(336 * hidden * 4 - 1)
    with pytest.raises(UserError) as err:
        compile_model(spec, smaller, "tiny")
    message = str(err.value)
    assert (
        f"weight 'model.embed_tokens.weight.0' (336x{hidden} float32) is {336 * hidden * 4:,} bytes"
    ) in message
    assert "make the bundle for this target" in message


# -- Qwen2-7B shapes, compile only -------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_7b():
    spec = ModelSpec.create(QWEN2_7B, "q0f16t", load_preset("edge-512"))
    target = get_target("android-opencl:adreno-740")
    executable, metadata = compile_model(spec, target, "qwen2_7b")
    return executable, metadata, target.limits.max_mem_alloc_bytes


def test_qwen2_7b_output_layer_compiles_for_android_in_pieces(qwen2_7b):
    executable, metadata, limit = qwen2_7b
    assert limit == 1024 * MiB
    params = {p["name"]: p for p in metadata["params"]}
    assert "lm_head.weight" not in params and "model.embed_tokens.weight" not in params
    assert [params[f"lm_head.weight.{i}"]["shape"] for i in range(2)] == [[3584, 76032]] * 2
    assert [params[f"model.embed_tokens.weight.{i}"]["shape"] for i in range(2)] == [
        [76032, 3584]
    ] * 2
    for p in metadata["params"]:
        assert np.prod(p["shape"], dtype=np.int64) * np.dtype(p["dtype"]).itemsize <= limit
    assert max(metadata["memory_usage"].values()) <= limit
    # The embedding is one kernel reading from both pieces.
    source = executable.mod.imports[0].imports[0].inspect_source()
    assert (
        "qwen2_7b_split_take_kernel(__global int* restrict input_ids_ptr, "
        "__global half* restrict model_embed_tokens_weight_0_ptr, "
        "__global half* restrict model_embed_tokens_weight_1_ptr"
    ) in source


def test_qwen2_7b_memory_plan_fits_and_says_so(qwen2_7b):
    _, metadata, limit = qwen2_7b
    plan = make_plan(
        metadata,
        label="edge-512",
        target="android-opencl:adreno-740",
        kv_dtype="float16",
        max_alloc_bytes=limit,
    )
    assert plan.weights.embedding == plan.weights.output_layer == 152064 * 3584 * 2
    assert plan.weights.embedding_pieces == plan.weights.output_pieces == 2
    name, size = plan.largest_buffer
    assert size == 76032 * 3584 * 2 and plan.fits_max_alloc
    assert plan.as_dict()["weights"]["output_pieces"] == 2
    lines = table([plan])
    assert any("weights: output layer" in line and "in 2 pieces" in line for line in lines)


# -- the split kernels on an OpenCL device (PoCL) ----------------------------------------------


@pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))
def test_split_kernels_pass_on_opencl(tmp_path):
    """The phone's kernels of a split model (fp16, Adreno schedules) on PoCL: the
    embedding's one kernel against take on the whole table, with ids at every piece's
    edges; each piece's logits and their concatenation against the CPU."""
    import tvm

    from mlc_edge.verify import model_checker

    make_model("Llama", tmp_path / "hf", vocab_size=VOCAB, num_hidden_layers=1)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    base = get_target("android-opencl")
    limit = LIMIT // 2  # fp16: 128-byte rows, the same 3 pieces
    target = base.with_limits(base.limits.replace(max_mem_alloc_bytes=limit))
    spec = ModelSpec.create(hf_config, "q0f16t", load_preset("edge-512")).for_device(limit)
    assert len([n for n, _, _ in parameter_list(spec) if n.startswith("lm_head")]) == 3
    checker = model_checker(spec, target, only=r"^(split_take|fused_concatenate\w*|matmul\d*)$")

    prepared = checker.prepare("split_take", {"seq_len": 16})
    # verify's own inputs put ids on both sides of every boundary (then random ones)
    assert prepared.arrays["input_ids"][:4].tolist() == [335, 336, 671, 672]
    assert all(r.passed for r in checker.check("split_take"))
    ids = np.array(
        [0, 335, 336, 337, 671, 672, 673, 999, 998, 500, 100, 800, 1, 334, 670, 2], dtype="int32"
    )
    prepared.arrays["input_ids"][:] = ids
    got, launches = checker.run_function("split_take", prepared)
    whole = np.concatenate([prepared.arrays[f"model_embed_tokens_weight_{i}"] for i in range(3)])
    assert whole.shape == (VOCAB, 64) and len(launches) == 1
    np.testing.assert_array_equal(got["split_take"], whole[ids])

    # The output layer's kernels: the pieces' matmuls (336 / 328 columns), the concatenation.
    def vocab_sized(name: str) -> bool:
        dims = {
            int(d)
            for p in checker.params(name)
            if p.is_buffer
            for d in p.shape or ()
            if isinstance(d, int | tvm.tirx.IntImm)
        }
        return bool(dims & {336, 328, VOCAB})

    names = [n for n in checker.funcs if n == "split_take" or vocab_sized(n)]
    assert any(n.startswith("fused_concatenate") for n in names)
    assert sum(n.startswith("matmul") for n in names) >= 2
    for name in names:
        for result in checker.check(name):
            assert result.passed, result.as_dict()
