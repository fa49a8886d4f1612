"""4-bit weights (q4f16t-hf, q4f32t-hf): the packed layout, conversion, the compiled model.

The test's own packer and unpacker are written from AutoAWQ's GEMM format description
(nibble i of a word holds column 0,2,4,6,1,3,5,7[i] of its group of 8), independently of
``mlc_edge.quantization.int4``, and the compiled model is checked against transformers
running the weights that the bundle's tensors stand for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from helpers import (
    assert_matches_fp32,
    compile_bundle,
    greedy_compare,
    load_cache_rows,
    one_error_line,
    prompt_ids,
    rows_of_tiles,
    top2_margins,
)
from tiny_models import make_llama, make_model
from tvm.target.codegen import llvm_get_system_cpu, target_has_features

from mlc_edge.cli import main
from mlc_edge.config import ModelSpec
from mlc_edge.convert.tensor_cache import load_tensor_cache
from mlc_edge.memory.plan import records_from_metadata, weight_breakdown
from mlc_edge.memory.sources import tensor_cache_records
from mlc_edge.models.hf_config import RuntimeSizes
from mlc_edge.models.parameters import parameter_list
from mlc_edge.quantization.int4 import dequantize, pack_int4, quantize_rtn, unpack_int4
from mlc_edge.runtime import Engine

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i <- column ORDER[i]
_HAS_AVX2 = target_has_features(
    "avx2", tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()})
)


def awq_pack(values: np.ndarray) -> np.ndarray:
    """The format description, one column at a time (slow, obviously right)."""
    rows, cols = values.shape
    out = np.zeros((rows, cols // 8), dtype=np.int64)
    for word in range(cols // 8):
        for nibble in range(8):
            out[:, word] |= values[:, 8 * word + ORDER[nibble]].astype(np.int64) << (4 * nibble)
    return out.astype(np.uint32).view(np.int32)


def awq_unpack(words: np.ndarray) -> np.ndarray:
    words = words.view(np.uint32).astype(np.int64)
    rows, packed = words.shape
    out = np.zeros((rows, packed * 8), dtype=np.int64)
    for word in range(packed):
        for nibble in range(8):
            out[:, 8 * word + ORDER[nibble]] = (words[:, word] >> (4 * nibble)) & 15
    return out


def reference_dequantize(cache: dict, base: str, group: int) -> np.ndarray:
    """``[out, in]`` fp32 of a bundle's 4-bit layer, by the test's own unpacker."""
    q = awq_unpack(cache[f"{base}.qweight"])
    z = np.repeat(awq_unpack(cache[f"{base}.qzeros"]), group, axis=0)
    s = np.repeat(cache[f"{base}.scales"].astype(np.float32), group, axis=0)
    return ((q - z) * s).T.astype(np.float32)


def test_packing_matches_the_format_by_hand():
    # Row 0..7: nibble i holds column ORDER[i] -> nibbles 0,2,4,6,1,3,5,7 from the bottom.
    assert pack_int4(np.arange(8, dtype=np.uint8)[None]).view(np.uint32)[0, 0] == 0x75316420
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, size=(5, 24))
    packed = pack_int4(values)
    assert packed.dtype == np.int32 and packed.shape == (5, 3)
    np.testing.assert_array_equal(packed, awq_pack(values))
    np.testing.assert_array_equal(unpack_int4(packed), values)
    np.testing.assert_array_equal(awq_unpack(packed), values)
    # The test's packer and unpacker agree with each other too (top nibbles set: sign bit).
    high = np.full((2, 8), 15)
    np.testing.assert_array_equal(awq_unpack(awq_pack(high)), high)


def test_round_to_nearest_matches_a_reference_per_group():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 16)).astype(np.float32)  # [K, N], groups of 32 along K
    w[32:, 3] = 0.0  # an all-zero group
    out = quantize_rtn(w, 32, "float32")
    for g in range(2):
        block = w[32 * g : 32 * (g + 1)]
        for n in range(16):
            col = block[:, n]
            hi, lo = max(col.max(), 0.0), min(col.min(), 0.0)
            s = np.float32((hi - lo) / 15)
            assert out["scales"][g, n] == s
            step = max(s, 1e-8)
            z = np.clip(np.round(-lo / step), 0, 15)
            q = np.clip(np.round(col / step) + z, 0, 15)
            assert awq_unpack(out["qzeros"])[g, n] == z
            np.testing.assert_array_equal(awq_unpack(out["qweight"])[32 * g : 32 * (g + 1), n], q)
    # Quantized a group at a time (bounded temporaries): the same tensors.
    chunked = quantize_rtn(w, 32, "float32", rows_per_chunk=32)
    for part in out:
        np.testing.assert_array_equal(chunked[part], out[part])
    back = dequantize(out["qweight"], out["qzeros"], out["scales"], 32)
    # Round to nearest: within half a step of every weight (ranges hold 0, so no clipping).
    step = np.repeat(out["scales"], 32, axis=0)
    assert (np.abs(back - w) <= step / 2 + 1e-6).all()
    assert (back[32:, 3] == 0).all()


def _hf_weights_from_bundle(bundle, model, group: int) -> dict[str, torch.Tensor]:
    """The transformers weights that the bundle's 4-bit tensors stand for: each fused
    layer split back into its checkpoint parts by the family's weight map."""
    from mlc_edge.models import find_family

    cache = load_cache_rows(bundle)
    hf_config = json.loads((bundle / "mlc-chat-config.json").read_text())["model_config"]
    family = find_family(hf_config)
    mapping = family.weight_map(family.config_class.from_hf(hf_config, RuntimeSizes(1, 16, 64)))
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    state = {}
    for name in cache:
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        if f"{base}.weight" not in mapping:  # a tied model's 4-bit head: test_int4_head.py
            assert base == "lm_head", base
            continue
        hf_names = mapping[f"{base}.weight"].hf_names
        w = reference_dequantize(cache, base, group)
        rows = np.cumsum([shapes[h][0] for h in hf_names])[:-1]
        for h, chunk in zip(hf_names, np.split(w, rows), strict=True):
            assert chunk.shape == shapes[h], (h, chunk.shape)
            state[h] = torch.from_numpy(np.ascontiguousarray(chunk))
    assert state
    return state


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_int4")
    return make_llama(path / "hf"), path


def _load_into(model, state: dict[str, torch.Tensor]):
    import copy

    model = copy.deepcopy(model)
    missing = set(state) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    return model.eval()


def _assert_greedy_tokens_match(bundle, model) -> None:
    """The bundle's greedy tokens are transformers' on the weights its 4-bit tensors stand
    for, on every decisive step (top-2 margin over 0.05), and nearly every step is one."""
    reference = _load_into(model, _hf_weights_from_bundle(bundle, model, 32))
    ids = prompt_ids(model.config.vocab_size, seed=1)
    ours, theirs, _ = greedy_compare(Engine(bundle), reference, ids)
    decisive = [i for i, m in enumerate(top2_margins(reference, ids, theirs)) if m > 0.05]
    assert len(decisive) >= len(theirs) - 2
    assert [ours[i] for i in decisive] == [theirs[i] for i in decisive]


def test_q4f32t_matches_transformers_on_the_dequantized_weights(tiny_llama):
    model, path = tiny_llama
    bundle = compile_bundle(path / "hf", path / "q4f32t-hf", "--quantization", "q4f32t-hf")
    cache = load_cache_rows(bundle)
    assert cache["model.layers.0.self_attn.qkv_proj.qweight"].dtype == np.int32
    assert cache["lm_head.weight"].dtype == np.float32  # the output layer stays float
    assert "model.layers.0.self_attn.qkv_proj.weight" not in cache
    reference = _load_into(model, _hf_weights_from_bundle(bundle, model, 32))
    # The quantization is real: the weights moved, so the reference is not the fp32 model.
    ids = prompt_ids(model.config.vocab_size)
    with torch.no_grad():
        drift = reference(torch.tensor([ids])).logits - model(torch.tensor([ids])).logits
    assert float(drift.abs().max()) > 1e-2
    assert_matches_fp32(Engine(bundle), reference, ids)


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("Qwen2", {}),  # q/k/v biases, tied embeddings
        # Phi-2's shape with a hidden size groups of 32 divide: head_dim 20, partial RoPE.
        ("Phi", {"hidden_size": 160, "num_attention_heads": 8, "num_key_value_heads": 8}),
    ],
)
def test_q4f32t_other_families_match_transformers(tmp_path, family, overrides):
    model = make_model(family, tmp_path / "hf", **overrides)
    bundle = compile_bundle(tmp_path / "hf", tmp_path / "b", "--quantization", "q4f32t-hf")
    reference = _load_into(model, _hf_weights_from_bundle(bundle, model, 32))
    assert_matches_fp32(Engine(bundle), reference, prompt_ids(384))


def test_q4f16t_greedy_tokens_match_on_decisive_steps(tiny_llama):
    model, path = tiny_llama
    bundle = compile_bundle(path / "hf", path / "q4f16t-hf", "--quantization", "q4f16t-hf")
    cache = load_cache_rows(bundle)
    assert cache["model.layers.0.mlp.down_proj.scales"].dtype == np.float16
    _assert_greedy_tokens_match(bundle, model)


def _tiles_forced(monkeypatch, tiles: bool) -> None:
    """The CPU target stores 4-bit weights in tiles (or rows) whatever this CPU is."""
    from mlc_edge.compiler.targets import CpuTarget

    monkeypatch.setattr(CpuTarget, "reads_int4_tiles", lambda self, scheme: tiles)


@pytest.mark.skipif(not _HAS_AVX2, reason="the tiles' kernel needs AVX2")
def test_q4f16t_in_cpu_tiles_holds_the_same_words_and_runs(tiny_llama, monkeypatch, capsys):
    """A CPU bundle with its qweights in tiles: the words of the bundle in rows, reordered
    (checked by the tests' own tile reader), the layout recorded in the chat config, and the
    compiled model (the AVX2 kernel reading tiles, prefill through the inlined
    dequantization) matches transformers' greedy tokens on decisive steps."""
    model, path = tiny_llama
    _tiles_forced(monkeypatch, False)
    rows = compile_bundle(path / "hf", path / "q4f16t-rows", "--quantization", "q4f16t")
    _tiles_forced(monkeypatch, True)
    tiled = compile_bundle(path / "hf", path / "q4f16t-tiles", "--quantization", "q4f16t")
    stored_rows, stored_tiles = load_tensor_cache(rows), load_tensor_cache(tiled)
    qweights = [n for n in stored_rows if n.endswith(".qweight")]
    assert qweights and sorted(stored_rows) == sorted(stored_tiles)
    for name in qweights:
        assert stored_rows[name].ndim == 2 and stored_tiles[name].ndim == 3, name
        np.testing.assert_array_equal(rows_of_tiles(stored_tiles[name]), stored_rows[name])
    chat = json.loads((tiled / "mlc-chat-config.json").read_text())
    assert chat["model_config"]["int4_cpu_tiles"] is True
    assert (
        "int4_cpu_tiles"
        not in json.loads((rows / "mlc-chat-config.json").read_text())["model_config"]
    )
    _assert_greedy_tokens_match(tiled, model)
    # Its library is rebuilt in tiles; a phone's kernels read rows: one line.
    main(["compile", str(tiled), "--target", "cpu", "--model-lib", "again", "--json"])
    assert (tiled / "lib" / "again.so").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compile", str(tiled), "--target", "android-opencl", "--model-lib", "phone"])
    one_error_line(capsys.readouterr().err, "CPU tiles", "android-opencl")
    assert not list((tiled / "lib").glob("phone*"))


def test_which_cpus_store_4bit_weights_in_tiles():
    """Tiles where the AVX2 kernel serves the layer: fp16 groups of 16 or 32 on an AVX2
    CPU without VNNI; rows for VNNI CPUs, other CPUs, fp32 compute and groups of 128, and
    for every GPU target."""
    from mlc_edge.schedules.cpu.int4_gemv_avx2 import reads_tiles

    from mlc_edge.compiler.build import spec_for_target
    from mlc_edge.compiler.targets import CpuTarget, get_target

    def cpu(mcpu: str, mtriple: str = "x86_64-linux-gnu") -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": mtriple})

    assert reads_tiles(cpu("znver3"), 32, "float16")
    assert reads_tiles(cpu("haswell"), 16, "float16")
    assert not reads_tiles(cpu("icelake-server"), 32, "float16")  # VNNI: its kernels
    assert not reads_tiles(cpu("znver3"), 128, "float16")
    assert not reads_tiles(cpu("znver3"), 32, "float32")
    assert not reads_tiles(cpu("cortex-a76", "aarch64-linux-gnu"), 32, "float16")

    sizes = {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 64}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
    }
    host = CpuTarget(name="cpu", description="")
    for scheme, tiled in (("q4f16t", True), ("q4f32t", False), ("q0f16t", False)):
        spec = ModelSpec.create(config, scheme, sizes)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CpuTarget, "tvm_target", lambda self: cpu("znver3"))
            built = spec_for_target(spec, host)
        layout = built.scheme.int4_layout
        assert (layout is not None and layout.tiles) == tiled, scheme
        qweights = [shape for name, shape, _ in parameter_list(built) if "qweight" in name]
        assert all(len(shape) == (3 if tiled else 2) for shape in qweights), scheme
    phone = spec_for_target(ModelSpec.create(config, "q4f16t", sizes), get_target("android-opencl"))
    assert not phone.scheme.int4_layout.tiles


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("Qwen2", {}),
        ("Phi", {"hidden_size": 160, "num_attention_heads": 8, "num_key_value_heads": 8}),
        # Every layer's words fill 16-lane registers (16 to 64 words): on an AVX-512 VNNI
        # CPU each decode GEMV is schedules/cpu/int4_gemv_vnni_bytes.py's (15-bit
        # activations).
        ("Llama", {"hidden_size": 128, "intermediate_size": 256}),
    ],
    ids=["Qwen2", "Phi", "Llama-vnni-shapes"],
)
def test_q4f16t_other_families_greedy_tokens_match_on_decisive_steps(tmp_path, family, overrides):
    model = make_model(family, tmp_path / "hf", **overrides)
    bundle = compile_bundle(tmp_path / "hf", tmp_path / "b", "--quantization", "q4f16t-hf")
    _assert_greedy_tokens_match(bundle, model)


@pytest.mark.parametrize(
    "overrides, quantization, message",
    [
        ({"hidden_size": 48}, "q4f16t", "48 inputs, not a multiple of the group size 32"),
        ({"hidden_size": 128}, "q4f16t-g128", "160 inputs, not a multiple of the group size 128"),
        ({"intermediate_size": 98}, "q4f16t", "196 outputs, not a multiple of 8"),
        # a 4-bit output layer: the scheme that keeps it in floats is the way out
        ({"vocab_size": 388}, "q4f16t", "388 outputs (the vocabulary, or a piece of it)"),
        ({"vocab_size": 388}, "q4f32t", "use q4f32t-hf, which keeps it in float32"),
    ],
)
def test_layers_that_do_not_fit_the_layout_get_one_line(
    tmp_path, capsys, overrides, quantization, message
):
    make_llama(tmp_path / "hf", **overrides)
    capsys.readouterr()  # transformers' own progress lines
    with pytest.raises(SystemExit) as e:
        main(
            [
                "compile",
                str(tmp_path / "hf"),
                "-o",
                str(tmp_path / "b"),
                "--quantization",
                quantization,
            ]
        )
    assert e.value.code != 0
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "b").exists()


def test_memory_counts_the_packed_tensors(tiny_llama):
    """``memory`` plans from the parameter list (config.json) and from tensor-cache.json
    agree on qweight + qzeros + scales, and the layers come out ~3.5x smaller than fp16."""
    model, path = tiny_llama
    hf_config = json.loads((path / "hf" / "config.json").read_text())
    sizes = {"context_window_size": 512, "prefill_chunk_size": 16, "max_batch_size": 1}
    plans = {}
    for scheme in ("q0f16t", "q4f16t-hf"):
        spec = ModelSpec.create(hf_config, scheme, sizes)
        params = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in parameter_list(spec)]
        plans[scheme] = weight_breakdown(records_from_metadata({"params": params}))
        main(
            ["convert", str(path / "hf"), "-o", str(path / f"w-{scheme}"), "--quantization", scheme]
        )
        assert weight_breakdown(tensor_cache_records(path / f"w-{scheme}")) == plans[scheme]
    # 4 bits + an fp16 scale and a 4-bit zero per 32 weights (4.625 bits), plus the norms.
    ratio = plans["q4f16t-hf"].layers / plans["q0f16t"].layers
    cfg = model.config
    linear = (
        cfg.num_hidden_layers
        * cfg.hidden_size
        * (cfg.hidden_size * 2 + 2 * cfg.hidden_size // 2 + 3 * cfg.intermediate_size)
    )
    assert plans["q4f16t-hf"].layers == linear * 4.625 / 8 + cfg.num_hidden_layers * 2 * 64 * 2
    assert 0.28 < ratio < 0.3, ratio
    assert plans["q4f16t-hf"].output_layer == plans["q0f16t"].output_layer  # lm_head stays fp16


def _tiny_int4_module():
    from tvm.relax.frontend import nn

    from mlc_edge.quantization import get_scheme

    scheme = get_scheme("q4f16t-hf")

    class TwoLayers(nn.Module):
        def __init__(self):
            self.up = scheme.linear(64, 32, bias=True)
            self.down = scheme.linear(32, 64)

        def forward(self, x):
            return self.down(nn.op.silu(self.up(x)))

    model = TwoLayers()
    model.to("float16")
    spec = {
        "forward": {
            "x": nn.spec.Tensor([1, "n", 64], "float16"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    return model.export_tvm(spec=spec)[0]


def test_dequantization_is_fused_into_the_matmul_and_the_guard_trips_without():
    import tvm
    from mlc_edge.schedules.cpu import cpu_rules

    from mlc_edge.compiler.build import ApplySchedules, fuse_into_tir
    from mlc_edge.compiler.passes import RequireFusedDequantize
    from mlc_edge.compiler.passes.require_fused_dequantize import functions_writing_dequantized
    from mlc_edge.errors import UserError

    fused = fuse_into_tir()(_tiny_int4_module())
    names = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # One function per layer: the dequantization, fp16 -> fp32, the matmul, fp32 -> fp16.
    names_with_dequantize = sorted(n for n in names if "dequantize" in n)
    assert names_with_dequantize == [
        "fused_dequantize_int41_relax_astype_relax_matmul_relax_astype",
        "fused_dequantize_int4_relax_astype_relax_matmul_relax_astype",
    ]
    assert functions_writing_dequantized(fused) == []
    RequireFusedDequantize()(fused)
    # Without FuseInt4Matmul, FuseOps leaves the dequantization a kernel of its own.
    without = tvm.transform.Sequential(list(fuse_into_tir().passes)[1:])(_tiny_int4_module())
    assert functions_writing_dequantized(without) == ["dequantize_int4", "dequantize_int41"]
    with pytest.raises(UserError, match="writes a dequantized 4-bit weight"):
        RequireFusedDequantize()(without)
    # After the schedule rules not even a global intermediate may hold the weight: the
    # unscheduled fused functions still have one, the CPU rules inline it.
    assert functions_writing_dequantized(fused, scheduled=True) == names_with_dequantize
    with tvm.target.Target({"kind": "llvm"}):
        scheduled = ApplySchedules(cpu_rules())(fused)
    assert functions_writing_dequantized(scheduled, scheduled=True) == []
    RequireFusedDequantize(scheduled=True)(scheduled)


def test_which_targets_build_4bit_is_a_property_of_the_target():
    from mlc_edge.compiler.targets import TARGETS

    builds = {name: t.builds_int4 for name, t in TARGETS.items()}
    assert not builds.pop("vulkan")  # never built: no Vulkan code generator in this TVM
    assert all(builds.values()), builds  # cpu, android-opencl[:adreno-NNN], cuda[:sm_NN]
    assert {n.split(":")[0] for n in builds} == {"cpu", "android-opencl", "cuda"}
    # `mlc-edge targets --json` says it
    assert TARGETS["cpu"].describe()["builds_int4"] is True
    assert TARGETS["vulkan"].describe()["builds_int4"] is False


def test_a_target_without_4bit_kernels_refuses_in_one_line(
    tiny_llama, tmp_path, capsys, monkeypatch
):
    import dataclasses

    from mlc_edge.compiler import targets

    # A target that declares no 4-bit kernels (as a new one does until they are checked).
    plain = dataclasses.replace(targets.TARGETS["cpu"], builds_int4=False)
    monkeypatch.setitem(targets.TARGETS, "cpu", plain)
    _, path = tiny_llama
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(
            [
                "compile",
                str(path / "hf"),
                "-o",
                str(tmp_path / "b"),
                "--target",
                "cpu",
                "--quantization",
                "q4f16t-hf",
            ]
        )
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [
        "error: q4f16t-hf is not supported on cpu yet: its 4-bit matmul kernels are built and "
        "checked for android-opencl, cuda only; use one of those, or --quantization q0f16t "
        "for this target"
    ], err
    assert not (tmp_path / "b").exists()


def test_every_4bit_opencl_kernel_passes_verify(tiny_llama, capsys):
    """android-opencl: the fused dequantize + matmul kernels of decode, prefill and
    batch_decode against the CPU, from config.json alone (one layer)."""
    from helpers import opencl_missing, run_verify_json

    if opencl_missing():
        pytest.skip(opencl_missing())
    _, path = tiny_llama
    code, report = run_verify_json(
        capsys,
        str(path / "hf" / "config.json"),
        "--quantization",
        "q4f16t-hf",
        "--num-hidden-layers",
        "1",
        "--seq-lens",
        "1,16",
    )
    assert code == 0 and report["passed"], [r for r in report["results"] if r["status"] == "FAIL"]
    int4 = {r["function"] for r in report["results"] if "dequantize_int4" in r["function"]}
    # qkv, o, gate_up and down: in decode, prefill and batch_decode each.
    assert len(int4) == 12, sorted(int4)
    assert not [n for n in report["not_checked"] if "dequantize" in n["function"]]


# -- AWQ checkpoints as they are ------------------------------------------------------------

AWQ_CONFIG = {
    "quant_method": "awq",
    "bits": 4,
    "group_size": 32,
    "zero_point": True,
    "version": "gemm",
}
AWQ_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def make_awq_checkpoint(model, path, group: int = 32):
    """A tiny AutoAWQ GEMM checkpoint of ``model``'s shape: random 4-bit values, zero
    points and fp16 scales, packed by ``awq_pack``. Returns (the fp32 transformers model
    running the weights they stand for, the checkpoint's tensors)."""
    import copy

    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    tensors = {
        n: p.detach().numpy().copy() for n, p in model.state_dict().items() if "rotary" not in n
    }
    reference = copy.deepcopy(model).eval()
    state = reference.state_dict()
    for i in range(model.config.num_hidden_layers):
        for linear in AWQ_LINEARS:
            name = f"model.layers.{i}.{linear}"
            out, k = tensors.pop(f"{name}.weight").shape
            q = rng.integers(0, 16, size=(k, out))
            z = rng.integers(0, 16, size=(k // group, out))
            s = rng.uniform(0.01, 0.03, size=(k // group, out)).astype(np.float16)
            tensors[f"{name}.qweight"] = awq_pack(q)
            tensors[f"{name}.qzeros"] = awq_pack(z)
            tensors[f"{name}.scales"] = s
            # The independent unpacker reads back what the packer wrote.
            np.testing.assert_array_equal(awq_unpack(tensors[f"{name}.qweight"]), q)
            w = (q - np.repeat(z, group, axis=0)) * np.repeat(s.astype(np.float32), group, 0)
            state[f"{name}.weight"].copy_(torch.from_numpy(w.T.astype(np.float32)))
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    for extra in ("tokenizer.json",):
        (path / extra).write_bytes((path.parent / "hf" / extra).read_bytes())
    config = json.loads((path.parent / "hf" / "config.json").read_text())
    config["quantization_config"] = {**AWQ_CONFIG, "group_size": group}
    (path / "config.json").write_text(json.dumps(config))
    return reference, tensors


@pytest.fixture(scope="module")
def awq_checkpoint(tiny_llama):
    model, path = tiny_llama
    reference, tensors = make_awq_checkpoint(model, path / "awq")
    return reference, tensors, path / "awq"


def test_awq_checkpoint_runs_with_its_bits_unchanged(awq_checkpoint):
    reference, tensors, path = awq_checkpoint
    bundle = compile_bundle(path, path.parent / "awq-q4f32t-hf", "--quantization", "q4f32t-hf")
    cache = load_cache_rows(bundle)
    layer = "model.layers.1"
    # The bits as they are: o_proj's words byte for byte, q/k/v's side by side.
    assert cache[f"{layer}.self_attn.o_proj.qweight"].tobytes() == (
        tensors[f"{layer}.self_attn.o_proj.qweight"].tobytes()
    )
    for part in ("qweight", "qzeros"):
        qkv = np.concatenate([tensors[f"{layer}.self_attn.{p}_proj.{part}"] for p in "qkv"], axis=1)
        np.testing.assert_array_equal(cache[f"{layer}.self_attn.qkv_proj.{part}"], qkv)
    np.testing.assert_array_equal(
        cache[f"{layer}.mlp.down_proj.scales"],
        tensors[f"{layer}.mlp.down_proj.scales"].astype(np.float32),
    )
    ids = prompt_ids(reference.config.vocab_size)
    assert_matches_fp32(Engine(bundle), reference, ids)


def test_awq_fp16_scales_are_stored_unchanged(awq_checkpoint, tmp_path, capsys):
    """``-hf`` keeps the checkpoint's float output layer: no notice of a re-quantized one."""
    _, tensors, path = awq_checkpoint
    capsys.readouterr()
    main(["convert", str(path), "-o", str(tmp_path / "b"), "--quantization", "q4f16t-hf"])
    assert "output layer" not in capsys.readouterr().err
    cache = load_cache_rows(tmp_path / "b")
    name = "model.layers.0.mlp.gate_up_proj"
    for part in ("qweight", "qzeros", "scales"):
        joined = np.concatenate(
            [tensors[f"model.layers.0.mlp.{p}_proj.{part}"] for p in ("gate", "up")], axis=1
        )
        assert cache[f"{name}.{part}"].tobytes() == joined.tobytes()


@pytest.mark.parametrize(
    "change, quantization, message",
    [
        ({"version": "gemv"}, "q4f16t", "AWQ version 'gemv' is not supported"),
        ({"version": "exllama"}, "q4f16t", "AWQ version 'exllama' is not supported"),
        ({"bits": 8}, "q4f16t", "AWQ checkpoints with 8-bit weights are not supported"),
        (
            {"quant_method": "gptq", "desc_act": True},
            "q4f16t",
            "GPTQ checkpoints with act-order (desc_act) are not supported",
        ),
        ({"quant_method": "bitsandbytes"}, "q4f16t", "quant_method 'bitsandbytes' is not"),
        ({}, "q4f16t-g128", "the AWQ checkpoint's group size is 32 but q4f16t-g128 uses 128"),
        (
            {},
            "q0f16t",
            "is AWQ-quantized (4-bit, groups of 32) and cannot be stored as q0f16t: use "
            "--quantization q4f16t",
        ),
    ],
)
def test_awq_kinds_we_refuse_get_one_line(
    awq_checkpoint, tmp_path, capsys, change, quantization, message
):
    _, _, path = awq_checkpoint
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["convert", str(path), "-o", str(tmp_path / "b"), "--quantization", quantization])
    finally:
        config["quantization_config"] = AWQ_CONFIG
        (path / "config.json").write_text(json.dumps(config))
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "b").exists()
