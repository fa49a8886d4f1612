"""Android OpenCL: the phone library, its compile-time guards, the app's entry, the targets.

Nothing here runs on a GPU: the library is for an arm64 phone. The tests check what can be
checked on this machine: the .tar's objects and symbols, that every function became an
OpenCL kernel, that the guards refuse what the device would refuse, and the bundle files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import library_functions, one_error_line, opencl_missing
from model_shapes import LLAMA_3_2_1B
from tiny_models import make_llama

from mlc_edge.bundle.app_config import APP_CONFIG
from mlc_edge.cli import main
from mlc_edge.compiler.build import build_metadata, compile_model, compile_pipeline
from mlc_edge.compiler.contract import required_functions
from mlc_edge.compiler.passes import RequireKernels
from mlc_edge.compiler.targets import TARGETS, AndroidOpenCLTarget, get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.config.devices import DeviceLimits
from mlc_edge.errors import UserError
from mlc_edge.memory.plan import RUNTIME_OVERHEAD_BYTES
from mlc_edge.models.parameters import instantiate
from mlc_edge.runtime import Engine

LIB = "tiny"  # under 8 characters on purpose: TVM 0.27 mishandles such prefixes
ELF_MACHINE_AARCH64 = 183


def mlc_edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlc_edge", *args], capture_output=True, text=True, timeout=600
    )


def tiny_spec(hf: Path, **sizes: int) -> ModelSpec:
    preset = {**load_preset("edge-512"), **sizes}
    return ModelSpec.create(json.loads((hf / "config.json").read_text()), "q0f16t", preset)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("android")
    make_llama(root / "hf")
    return root / "hf"


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    """The tiny Llama compiled for android-opencl through the API, exported as a .tar."""
    spec = tiny_spec(checkpoint)
    executable, metadata = compile_model(spec, get_target("android-opencl"), LIB)
    tar = tmp_path_factory.mktemp("lib") / f"{LIB}.tar"
    executable.export_library(str(tar))
    return spec, executable, metadata, tar


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """The same through the CLI: ``compile MODEL_DIR --target android-opencl -o OUT``."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-llama-phone"
    try:
        main(["compile", str(checkpoint), "--target", "android-opencl", "-o", str(out), "--json"])
    except SystemExit as e:  # main exits only on errors
        raise AssertionError(f"compile failed with exit code {e.code}") from e
    return out, json.loads((out / APP_CONFIG).read_text())


# -- the library ---------------------------------------------------------------------------


def test_tar_holds_arm64_host_code_and_device_code(built):
    *_, tar = built
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        lib0 = tf.extractfile("lib0.o").read()
        devc = tf.extractfile(next(n for n in names if n.endswith("devc.o"))).read()
    assert "lib0.o" in names and any(n.endswith("devc.o") for n in names), names
    assert lib0[:4] == b"\x7fELF" and int.from_bytes(lib0[18:20], "little") == (ELF_MACHINE_AARCH64)
    # A system library: every symbol carries the prefix the app loads it by.
    for func in ("fused_rope", "rms_norm", "take", "apply_bitmask_inplace_tir"):
        assert f"__tvm_ffi_{LIB}_{func}".encode() in lib0, func
    assert b"__tvm_ffi_fused_rope" not in lib0 and b"__tvm_ffi_rms_norm" not in lib0
    # The VM's functions (prefill, decode, ...) and the kernels, packed under the prefix.
    assert f"{LIB}___tvm_ffi__library_bin".encode() in devc
    assert b"batch_prefill" in devc and f"{LIB}_fused_rope_kernel".encode() in devc


def test_every_device_function_is_an_opencl_kernel(built):
    spec, executable, _, _ = built
    opencl = executable.mod.imports[0].imports[0]
    assert opencl.kind == "opencl"
    source = opencl.inspect_source()
    kernels = set(re.findall(r"// Function: (\S+)", source))

    # The PrimFuncs as the schedules left them: each must have become kernel(s).
    target_spec = get_target("android-opencl")
    target = target_spec.tvm_target()
    model = instantiate(spec, target)
    mod, params, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    passes = list(
        compile_pipeline(
            target_spec, build_metadata(spec, model, params), {"seq_len": 16, "batch_size": 1}
        ).passes
    )
    names = [p.info.name for p in passes]
    with target:
        scheduled = tvm.transform.Sequential(passes[: names.index("ApplySchedules") + 1])(mod)
    prim_funcs = [
        gv.name_hint for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert len(prim_funcs) > 30
    missing = [f for f in prim_funcs if f"{LIB}_{f}_kernel" not in kernels]
    assert missing == []
    # The traps of the notes: unscheduled on arrival (Fallback), and our logit processors.
    for name in (
        "fused_rope",
        "tir_kv_cache_transpose_append",
        "apply_bitmask_inplace_tir",
        "apply_penalty_inplace_tir",
        "apply_logit_bias_inplace_tir",
    ):
        assert f"{LIB}_{name}_kernel" in kernels, name


def test_phone_library_exports_what_the_engine_requires(built):
    # OpenCL: the engine samples on the CPU, so no GPU sampler functions.
    _, executable, _, _ = built
    assert library_functions(executable) == required_functions("opencl")


def test_metadata_is_read_at_compile_time(built):
    spec, _, metadata, _ = built
    assert metadata["context_window_size"] == 512 and metadata["prefill_chunk_size"] == 16
    assert metadata["memory_usage"]["prefill"] > 0
    assert [p["name"] for p in metadata["params"]][0] == "model.embed_tokens.weight"


# -- the bundle and the app's entry ----------------------------------------------------------


def test_phone_bundle_has_the_tar_and_the_app_entry(bundle):
    out, app = bundle
    lib_name = "hf_q0f16t_android_opencl"
    assert (out / "lib" / f"{lib_name}.tar").is_file()
    assert not list((out / "lib").glob("*.so"))
    assert (out / "mlc-chat-config.json").is_file() and (out / "tensor-cache.json").is_file()

    (entry,) = app["model_list"]
    # MLCChat's ModelRecord: model_url is a non-null String (the app crashes without it).
    assert set(entry) == {"model_id", "model_lib", "model_url", "estimated_vram_bytes"}
    assert entry["model_id"] == "tiny-llama-phone" and entry["model_lib"] == lib_name
    # No --model-url: the documented placeholder, which parses as a URL and never resolves.
    url = urllib.parse.urlparse(entry["model_url"])
    assert url.scheme == "https" and url.hostname.endswith(".invalid")
    assert url.path.endswith("/tiny-llama-phone")

    cache = json.loads((out / "tensor-cache.json").read_text())
    weights = sum(r["nbytes"] for shard in cache["records"] for r in shard["records"])
    assert weights == cache["metadata"]["ParamBytes"]
    # 3 layers x 2 kv heads x head_dim 16 x (512 tokens + TVM's extra page of 16) x (k, v)
    # x fp16, then float32 logits over the vocabulary and the runtime's fixed overhead
    kv = 3 * 2 * 16 * (512 + 16) * 2 * 2
    vocab = json.loads((out / "mlc-chat-config.json").read_text())["vocab_size"]
    temps = entry["estimated_vram_bytes"] - weights - kv - vocab * 4 - RUNTIME_OVERHEAD_BYTES
    assert 0 < temps < weights  # max(memory_usage): a few KiB for a 16-token chunk


def test_app_entry_is_the_memory_plan_total(built, tmp_path):
    from mlc_edge.bundle.app_config import estimated_vram_bytes
    from mlc_edge.memory.sources import plan_for

    _, _, metadata, _ = built
    # No tensor cache: the weights are summed from _metadata.params.
    weights = sum(int(np.prod(p["shape"])) * 2 for p in metadata["params"])
    expected = (
        weights
        + 3 * 2 * 16 * (512 + 16) * 2 * 2
        + max(metadata["memory_usage"].values())
        + metadata["active_vocab_size"] * 4
        + RUNTIME_OVERHEAD_BYTES
    )
    assert estimated_vram_bytes(tmp_path, metadata, "float16") == expected
    # The same number `mlc-edge memory` prints for the model.
    plan = plan_for(metadata, "edge-512", "android-opencl", "float16", None, None)
    assert plan.total_bytes == expected


def test_app_entry_of_a_4bit_bundle_is_its_memory_plan_total(checkpoint, built, tmp_path):
    """q4f16t-hf: the entry counts the packed int32 words, scales and zero points as stored
    (from the tensor cache or, before conversion, from _metadata.params), the same total
    `mlc-edge memory` plans, and below q0f16t's by the weights saved."""
    from mlc_edge.bundle.app_config import estimated_vram_bytes
    from mlc_edge.memory.sources import plan_for

    preset = load_preset("edge-512")
    spec = ModelSpec.create(
        json.loads((checkpoint / "config.json").read_text()), "q4f16t-hf", preset
    )
    _, metadata = compile_model(spec, get_target("android-opencl"), "hf_q4f16t_android_opencl")
    main(["convert", str(checkpoint), "-o", str(tmp_path / "w"), "--quantization", "q4f16t-hf"])
    cache = json.loads((tmp_path / "w" / "tensor-cache.json").read_text())
    stored = {r["name"]: r for shard in cache["records"] for r in shard["records"]}
    assert stored["model.layers.0.mlp.down_proj.qweight"]["dtype"] == "int32"
    weights = sum(r["nbytes"] for r in stored.values())
    by_shape = {
        p["name"]: int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
        for p in metadata["params"]
    }
    assert by_shape == {name: r["nbytes"] for name, r in stored.items()}
    expected = (
        weights
        + 3 * 2 * 16 * (512 + 16) * 2 * 2
        + max(metadata["memory_usage"].values())
        + metadata["active_vocab_size"] * 4
        + RUNTIME_OVERHEAD_BYTES
    )
    assert estimated_vram_bytes(tmp_path / "w", metadata, "float16") == expected
    (tmp_path / "none").mkdir()
    assert estimated_vram_bytes(tmp_path / "none", metadata, "float16") == expected
    plan = plan_for(metadata, "edge-512", "android-opencl", "float16", None, None)
    assert plan.total_bytes == expected
    _, _, fp16_metadata, _ = built
    fp16_weights = sum(int(np.prod(p["shape"])) * 2 for p in fp16_metadata["params"])
    assert weights < fp16_weights
    assert estimated_vram_bytes(tmp_path / "none", fp16_metadata, "float16") - expected == (
        fp16_weights
        - weights
        + max(fp16_metadata["memory_usage"].values())
        - max(metadata["memory_usage"].values())
    )


def test_run_says_a_phone_bundle_is_for_a_phone(bundle):
    out, _ = bundle
    with pytest.raises(UserError, match="compiled for a phone"):
        Engine(out)


# -- the guards ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NoSchedules(AndroidOpenCLTarget):
    """A target whose rules schedule nothing: the functions stay plain loops."""

    def schedule_rules(self) -> list:
        return []


def _fields(target) -> dict:
    return {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}


def test_guard_refuses_a_function_left_as_host_code(checkpoint):
    target = _NoSchedules(**_fields(get_target("android-opencl")))
    with pytest.raises(UserError, match=r"function '\w+' was not made into a GPU kernel"):
        compile_model(tiny_spec(checkpoint), target, LIB)


def test_guard_names_the_unscheduled_function():
    from mlc_edge.compiler.logit_processor import logit_processor_funcs

    cpu_loop = logit_processor_funcs(tvm.target.Target({"kind": "llvm"}))
    mod = tvm.IRModule({"apply_bitmask_inplace_tir": cpu_loop["apply_bitmask_inplace"]})
    with pytest.raises(UserError) as err:
        RequireKernels("android-opencl")(mod)
    message = str(err.value)
    assert "'apply_bitmask_inplace_tir'" in message and "logits" in message
    assert "blockIdx/threadIdx" in message
    gpu = logit_processor_funcs(get_target("android-opencl").tvm_target())
    RequireKernels("android-opencl")(
        tvm.IRModule({"apply_bitmask_inplace_tir": gpu["apply_bitmask_inplace"]})
    )


def test_guard_refuses_work_groups_above_the_device_limit(checkpoint):
    base = get_target("android-opencl:adreno-740")
    small = base.with_limits(base.limits.replace(max_work_group_size=64))
    with pytest.raises(
        UserError,
        match=r"function '\w+' uses work-groups of \d+ threads .* "
        r"allows at most 64",
    ):
        compile_model(tiny_spec(checkpoint), small, LIB)


def test_guard_names_a_weight_above_the_largest_allocation(checkpoint):
    base = get_target("android-opencl")
    small = base.with_limits(base.limits.replace(max_mem_alloc_bytes=40_000))
    with pytest.raises(UserError) as err:
        compile_model(tiny_spec(checkpoint), small, LIB)
    # The 384 x 64 fp16 tables (49,152 bytes) are split to fit; gate/up, 64 x 320 fp16 =
    # 40,960 bytes, is a weight no split applies to (tests/test_split_vocab.py).
    assert (
        "weight 'model.layers.0.mlp.gate_up_proj.weight' (64x320 float16) is 40,960 bytes"
    ) in str(err.value)
    assert "40,000 bytes" in str(err.value)


def test_guard_names_a_planned_buffer_above_the_largest_allocation(checkpoint):
    # A 256-token chunk: the MLP's [1, 256, 320] fp16 activations (160 KiB) outgrow the
    # largest weight (48 KiB), and the limit sits between them.
    base = get_target("android-opencl")
    small = base.with_limits(base.limits.replace(max_mem_alloc_bytes=100_000))
    spec = tiny_spec(checkpoint, prefill_chunk_size=256)
    with pytest.raises(
        UserError,
        match=r"function '\w*prefill' plans a buffer of 163,840 "
        r"bytes \(for a 1xseq_lenx320 float16 tensor",
    ):
        compile_model(spec, small, LIB)


def test_qwen2_7b_shaped_output_layer_is_split_from_config_alone(tmp_path):
    # 152064 x 3584 fp16 = 1039.5 MiB > the 1024 MiB CL_DEVICE_MAX_MEM_ALLOC_SIZE of Adreno:
    # compiled in two pieces of 76032 rows (tests/test_split_vocab.py runs split models).
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 1,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    }
    spec = ModelSpec.create(config, "q0f16t", load_preset("edge-512"))
    _, metadata = compile_model(spec, get_target("android-opencl:adreno-740"), "qwen2_7b")
    shapes = {p["name"]: p["shape"] for p in metadata["params"]}
    assert "model.embed_tokens.weight" not in shapes and "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight.1"] == [76032, 3584]
    assert shapes["lm_head.weight.1"] == [3584, 76032]


# -- targets -------------------------------------------------------------------------------


def test_vulkan_is_listed_but_refused_in_one_line(checkpoint, tmp_path):
    out = tmp_path / "dist" / "vk"
    res = mlc_edge("compile", str(checkpoint), "--target", "vulkan", "-o", str(out))
    assert res.returncode != 0
    one_error_line(res.stderr, "vulkan", "target.build.vulkan")
    assert "Traceback" not in res.stderr and not (tmp_path / "dist").exists()


def test_targets_json_lists_every_target_with_limits():
    res = mlc_edge("targets", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["targets"]}
    assert (
        set(rows)
        == set(TARGETS)
        >= {
            "cpu",
            "android-opencl",
            "android-opencl:adreno-740",
            "android-opencl:adreno-750",
            "android-opencl:adreno-830",
            "vulkan",
        }
    )
    assert rows["vulkan"]["can_build"] is False and "vulkan" in rows["vulkan"]["build_problem"]
    assert rows["android-opencl"]["can_build"] is True
    assert rows["android-opencl"]["runs_here"] is False
    for name in ("android-opencl:adreno-740", "android-opencl:adreno-830"):
        limits = rows[name]["limits"]
        assert limits["max_mem_alloc_bytes"] == 1024 * 2**20
        assert limits["max_work_group_size"] >= limits["schedule_threads"]
    assert rows["android-opencl:adreno-750"]["limits"]["memory_bandwidth_gb_s"] == 76.8
    for row in rows.values():
        assert row["default_preset"] == "edge-512"
    text = mlc_edge("targets")
    assert text.returncode == 0 and "android-opencl:adreno-740" in text.stdout


def test_device_limits_ship_as_package_data():
    names = ("default", "adreno-740", "adreno-750", "adreno-830")
    limits = {n: DeviceLimits.load(n) for n in names}
    assert all(lim.name == n for n, lim in limits.items())
    assert limits["default"].max_work_group_size <= min(
        lim.max_work_group_size for lim in limits.values()
    )
    target = get_target("android-opencl:adreno-750").tvm_target()
    assert target.kind.name == "opencl" and "adreno" in target.keys
    assert target.host.attrs["mtriple"] == "aarch64-linux-android"
    assert int(target.attrs["max_num_threads"]) == limits["adreno-750"].schedule_threads


def test_a_new_adreno_is_one_device_file(tmp_path, monkeypatch):
    """A device description with ``"target": "android-opencl"`` is a target of its own,
    with its limits, its work-group cap in the schedules, and the Adreno rules."""
    import shutil

    from mlc_edge.compiler import targets
    from mlc_edge.config import devices

    shipped = devices._device_dir()
    for name in ("default", "adreno-750"):
        shutil.copy(Path(str(shipped.joinpath(f"{name}.json"))), tmp_path)
    data = json.loads((tmp_path / "adreno-750.json").read_text())
    data.update(
        name="adreno-999",
        gpu="Qualcomm Adreno 999",
        schedule_threads=128,
        max_mem_alloc_bytes=2 << 30,
    )
    (tmp_path / "adreno-999.json").write_text(json.dumps(data))
    monkeypatch.setattr(devices, "_device_dir", lambda: tmp_path)
    found = targets.known_targets()
    assert set(found) - set(TARGETS) == {"android-opencl:adreno-999"}
    assert set(TARGETS) - set(found) == {"android-opencl:adreno-740", "android-opencl:adreno-830"}
    new = found["android-opencl:adreno-999"]
    assert new.limits.max_mem_alloc_bytes == 2 << 30 and "Adreno 999" in new.description
    assert int(new.tvm_target().attrs["max_num_threads"]) == 128
    assert "adreno" in new.tvm_target().keys
    rules = new.schedule_rules()
    assert rules[0].tuning.gpu == "adreno-999" and rules[0].tuning.max_threads == 128


# -- the GPU logit processors, run by an OpenCL implementation on the CPU (PoCL) -------------


def _opencl_kernels() -> dict[str, str]:
    """Each GPU logit processor's OpenCL program, by kernel name."""
    from mlc_edge.compiler.logit_processor import logit_processor_funcs

    target = tvm.target.Target({"kind": "opencl", "device": "adreno"}, host={"kind": "llvm"})
    funcs = logit_processor_funcs(target)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    # Without CSE the scalar arguments are the TIR size variables, passed here by name.
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        source = tvm.tirx.build(mod, target=target).imports[0].inspect_source()
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"// Function: (\S+)\n(.*?)(?=// Function:|\Z)", source, re.S)
    }


def test_gpu_logit_processors_match_numpy():
    if reason := opencl_missing():
        pytest.skip(reason)
    import pyopencl as cl

    # not Oclgrind (a simulator, from .[dev]; its ICD may come first)
    platform = next(p for p in cl.get_platforms() if p.name.strip() != "Oclgrind")
    ctx = cl.Context(platform.get_devices())
    queue = cl.CommandQueue(ctx)
    programs = _opencl_kernels()

    def run(name: str, threads: int, buffers: dict, sizes: dict) -> np.ndarray:
        kernel = f"{name}_kernel"
        (signature,) = re.findall(rf"__kernel void {kernel}\(([^)]*)\)\s*\{{", programs[kernel])
        args, device = [], {}
        for arg in signature.split(","):
            arg_name = arg.split()[-1]
            if arg_name.endswith("_ptr"):
                host = buffers[arg_name[: -len("_ptr")]]
                device[arg_name] = cl.Buffer(
                    ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=host
                )
                args.append(device[arg_name])
            else:
                args.append(np.int32(sizes[arg_name]))
        program = cl.Program(ctx, programs[kernel]).build()
        # The TIR's launch: ceil(threads / 256) work-groups of 256.
        getattr(program, kernel)(queue, (-(-threads // 256) * 256,), (256,), *args)
        out = np.empty_like(buffers["logits"])
        cl.enqueue_copy(queue, out, device["logits_ptr"])
        queue.finish()
        return out

    vocab = 1000  # not a multiple of 256: the last work-group is partly idle
    logits = np.random.default_rng(0).normal(size=(2, vocab)).astype("float32")

    got = run(
        "apply_logit_bias_inplace",
        2,
        {
            "logits": logits.copy(),
            "pos2seq_id": np.array([0, 1], "int32"),
            "token_ids": np.array([5, 999], "int32"),
            "logit_bias": np.array([2.0, -3.0], "float32"),
        },
        {"num_token": 2, "vocab_size": vocab},
    )
    expected = logits.copy()
    expected[0, 5] += 2.0
    expected[1, 999] -= 3.0
    np.testing.assert_allclose(got, expected)

    penalties = np.array([[0.5, 0.25, 1.5]], "float32")
    got = run(
        "apply_penalty_inplace",
        2,
        {
            "logits": logits.copy(),
            "seq_ids": np.array([1], "int32"),
            "pos2seq_id": np.array([0, 0], "int32"),
            "token_ids": np.array([3, 9], "int32"),
            "token_cnt": np.array([2, 1], "int32"),
            "penalties": penalties,
        },
        {"num_token": 2, "vocab_size": vocab},
    )
    expected = logits.copy()
    for tok, cnt in ((3, 2), (9, 1)):
        v = expected[1, tok] - (0.5 + cnt * 0.25)
        expected[1, tok] = v * 1.5 if v < 0 else v / 1.5
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    bitmask = np.zeros((2, (vocab + 31) // 32), "int32")
    bitmask[0, 0] = 0b101  # tokens 0 and 2 allowed in row 0
    bitmask[1, :] = -1  # row 1: everything allowed
    got = run(
        "apply_bitmask_inplace",
        2 * vocab,
        {"logits": logits.copy(), "seq_ids": np.array([0, 1], "int32"), "bitmask": bitmask},
        {"num_seq": 2, "vocab_size": vocab},
    )
    assert np.all(got[0, [1] + list(range(3, vocab))] < -1e30)
    np.testing.assert_array_equal(got[0, [0, 2]], logits[0, [0, 2]])
    np.testing.assert_array_equal(got[1], logits[1])


def test_llama_3_2_1b_shapes_compile_from_config_alone():
    """Real shapes (Llama-3.2-1B: tied 128256 x 2048 embedding, GQA, llama3 rope): every
    function becomes kernels within the generic Adreno limits."""
    spec = ModelSpec.create(LLAMA_3_2_1B, "q0f16t", load_preset("edge-768"))
    executable, metadata = compile_model(spec, get_target("android-opencl"), "llama_3_2_1b")
    kernels = re.findall(
        r"// Function: (\S+)", executable.mod.imports[0].imports[0].inspect_source()
    )
    assert "llama_3_2_1b_fused_rope_kernel" in kernels and len(kernels) > 40
    assert metadata["kv_cache"]["num_hidden_layers"] == 16
    # A 16-token chunk's gate/up activations: 16 x 2*8192 fp16 = 512 KiB, decode's 1/16.
    usage = metadata["memory_usage"]
    assert usage["prefill"] >= 16 * 2 * 8192 * 2 > usage["decode"] > 0
