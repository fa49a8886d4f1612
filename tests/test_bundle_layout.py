"""mlc_edge/bundle/layout.py: one reading of a bundle for every command.

Quick: a bundle here is gen-config's output (no weights, no compiled library) with
library files and build records written by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_llama

from mlc_edge.bundle import layout
from mlc_edge.cli import main
from mlc_edge.errors import UserError
from mlc_edge.verify import load_source


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    make_llama(root / "hf")
    out = root / "tiny"
    main(["gen-config", str(root / "hf"), "-o", str(out)])
    return out


def _library(bundle: Path, name: str, record: dict | None) -> Path:
    path = bundle / layout.LIB_DIR / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"")
    if record is not None:
        layout.build_record_path(path).write_text(json.dumps(record))
    return path


def _clear_libraries(bundle: Path) -> None:
    for path in (bundle / layout.LIB_DIR).glob("*"):
        path.unlink()


def test_verify_takes_the_target_from_the_build_record(bundle):
    # The file name says android-opencl; the record (what compile wrote) says adreno-750.
    _clear_libraries(bundle)
    _library(
        bundle,
        "tiny_q0f16t_android_opencl.tar",
        {"target": "android-opencl:adreno-750", "device": "opencl"},
    )
    source = load_source(bundle)
    assert source.target_name == "android-opencl:adreno-750"
    assert source.library == bundle / "lib" / "tiny_q0f16t_android_opencl.tar"
    assert source.prefix == "tiny_q0f16t_android_opencl_"
    # Without a record a system library is taken to be for the default phone target.
    _clear_libraries(bundle)
    _library(bundle, "tiny_q0f16t_android_opencl_adreno_750.tar", None)
    assert load_source(bundle).target_name == "android-opencl"


def test_one_rule_finds_the_library_this_machine_runs(bundle):
    _clear_libraries(bundle)
    with pytest.raises(UserError, match="no compiled library in .*: run `mlc-edge compile`"):
        layout.runnable_library(bundle)
    _library(bundle, "phone.tar", {"target": "android-opencl", "device": "opencl"})
    with pytest.raises(UserError, match=r"compiled for a phone \(phone.tar\)"):
        layout.runnable_library(bundle)
    # A bundle compiled for the phone and for this machine: each command finds its own.
    cpu = _library(bundle, "desk.so", None)
    found = layout.runnable_library(bundle)
    assert (found.path, found.target, found.device) == (cpu, "cpu", "cpu")
    assert [lib.name for lib in layout.libraries(bundle)] == ["desk.so", "phone.tar"]
    assert load_source(bundle).library == bundle / "lib" / "phone.tar"
    _library(bundle, "gpu.so", {"target": "cuda", "device": "cuda", "metadata": {"a": 1}})
    with pytest.raises(UserError, match="several libraries"):
        layout.runnable_library(bundle)
    (cuda,) = [lib for lib in layout.libraries(bundle) if lib.name == "gpu.so"]
    assert (cuda.target, cuda.device, cuda.metadata, cuda.model_lib) == (
        "cuda",
        "cuda",
        {"a": 1},
        "gpu",
    )


def test_a_bundle_a_model_folder_or_a_config_json(bundle, tmp_path):
    hf = bundle.parent / "hf"
    assert layout.is_bundle(bundle) and not layout.is_bundle(hf)
    chat = layout.read_chat_config(bundle)
    assert layout.read_model_config(bundle) == chat["model_config"]
    assert layout.read_model_config(hf) == json.loads((hf / "config.json").read_text())
    assert layout.read_model_config(hf / "config.json") == layout.read_model_config(hf)
    with pytest.raises(UserError, match=r"is not a bundle: it has no mlc-chat-config.json"):
        layout.read_chat_config(hf)
    with pytest.raises(
        UserError,
        match=r"give a bundle \(with mlc-chat-config.json\), a "
        r"Hugging Face model folder or a config.json",
    ):
        layout.read_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(UserError, match=r"config.json is not valid JSON \(.* at line 1\)"):
        layout.read_model_config(tmp_path)
    assert not layout.has_weights(bundle)
    with pytest.raises(UserError, match="tensor-cache.json is missing"):
        layout.tensor_records(bundle)


def test_shard_file_names():
    names = [layout.shard_file_name(i) for i in (0, 7, 123)]
    assert names == ["params_shard_0.bin", "params_shard_7.bin", "params_shard_123.bin"]
    assert all(layout.is_shard_file(n) for n in names)
    assert not any(
        layout.is_shard_file(n)
        for n in ("params_shard_.bin", "params_shard_1.bin.partial", "xparams_shard_1.bin")
    )


def test_the_runner_imports_no_bundle_writer():
    # The runner renders prompts with mlc_edge.conversation, not the writer's registry.
    code = (
        "import json, sys, mlc_edge.runtime.engine, mlc_edge.runtime.bench, mlc_edge.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mlc_edge.bundle'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert loaded <= {"mlc_edge.bundle", "mlc_edge.bundle.layout", "mlc_edge.bundle.integrity"}
    assert "mlc_edge.bundle.layout" in loaded
