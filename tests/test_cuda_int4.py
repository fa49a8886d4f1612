"""4-bit weights on CUDA, compile only (no GPU needed): the CUDA source TVM writes for the
4-bit kernels shows the dequantization fused into the matmuls (each packed word unpacked
in registers, fp32 accumulators, no unpacked weight stored anywhere but in registers),
and with CUDA 13's nvcc the model library builds (skipped without it, as the other CUDA
build tests are)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from tiny_models import make_llama

from mlc_edge.compiler.build import compile_model, export
from mlc_edge.compiler.cuda import kernel_sources
from mlc_edge.compiler.targets import get_target
from mlc_edge.config import ModelSpec, load_preset

SHIFTS = {0, 4, 8, 12, 16, 20, 24, 28}  # the 8 nibbles of a 32-bit word


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory) -> dict:
    """One layer of a tiny Llama whose sizes groups of 32 and 128 both divide."""
    path = tmp_path_factory.mktemp("cuda_int4") / "hf"
    make_llama(path, hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    return json.loads((path / "config.json").read_text())


def _arrays(source: str) -> dict[str, tuple[str, bool]]:
    """Arrays a kernel declares: name -> (element type, whether in __shared__ memory)."""
    found = re.findall(r"(__shared__ )?alignas\(\d+\) (\w+) (\w+)\[\d+\];", source)
    return {name: (dtype, bool(shared)) for shared, dtype, name in found}


def _parameters(source: str) -> dict[str, str]:
    """Pointer parameters: name -> element type."""
    head = source.split("{", 1)[0]
    return {name: dtype for dtype, name in re.findall(r"(\w+)\* __restrict__ (\w+)", head)}


def unpacking_problems(name: str, source: str) -> list[str]:
    """What is wrong with a 4-bit kernel's CUDA source (empty when all is well)."""
    problems = []
    params = _parameters(source)
    arrays = _arrays(source)
    (qweight,) = [p for p in params if "qweight" in p]
    # One word of qweight at a time into a register, its 8 nibbles shifted out of it.
    words = [
        a
        for a, (dtype, shared) in arrays.items()
        if "qweight" in a and dtype == "int" and not shared
    ]
    if len(words) != 1:
        problems.append(f"{name}: no register copy of {qweight}'s words: {sorted(arrays)}")
    else:
        shifts = {int(s) for s in re.findall(rf"\({words[0]}\[0\] >> (\d+)\) & 15", source)}
        if shifts != SHIFTS:
            problems.append(f"{name}: unpacks nibbles {sorted(shifts)} of {words[0]}")
    if re.search(rf"{qweight}\[[^\]]*\] >>", source):
        problems.append(f"{name}: unpacks the words from global memory")
    # Every unpacked value lands in a register (a non-shared local array) only.
    for line in source.splitlines():
        if "& 15)" not in line:
            continue
        target = re.match(r"\s*(\w+)\[", line)
        if not target or target.group(1) not in arrays or arrays[target.group(1)][1]:
            problems.append(
                f"{name}: an unpacked weight is stored outside registers: {line.strip()[:120]}"
            )
    # fp32 accumulation: every running sum `x[i] = (x[i] + ...` is a float register.
    sums = set(re.findall(r"(\w+)\[\w+\] = \(\1\[\w+\] \+", source))
    if not sums:
        problems.append(f"{name}: no accumulation found")
    for acc in sums:
        if arrays.get(acc) != ("float", False):
            problems.append(f"{name}: accumulates in {acc}, {arrays.get(acc)}, not fp32 registers")
    # The kernel writes its output parameter and nothing else in global memory.
    written = {
        p
        for p in params
        if re.search(rf"(^|\W){p}\[[^\]]*\] = |\*\(\w+\*\)\({p} \+[^;]*\) = ", source)
    }
    if len(written) != 1 or any(
        part in p for p in written for part in ("qweight", "qzeros", "scales")
    ):
        problems.append(f"{name}: writes {sorted(written)} in global memory")
    return problems


def fused_4bit_kernels(executable) -> dict[str, str]:
    """The CUDA source of the kernels that read packed words, by name, after checking
    they are the 12 fused ones: qkv, o, gate_up and down in decode, prefill and
    batch_decode, each the dequantization and the matmul in one kernel, and that no
    kernel is a dequantization alone."""
    kernels = kernel_sources(executable)
    packed = {n: s for n, s in kernels.items() if any("qweight" in p for p in _parameters(s))}
    assert len(packed) == 12, sorted(packed)
    assert all("dequantize_int4" in n and "matmul" in n for n in packed), sorted(packed)
    assert not [n for n in kernels if n.startswith("dequantize")]
    return packed


@pytest.mark.parametrize("quantization", ["q4f16t-hf", "q4f16t-g128-hf", "q4f32t-hf"])
def test_4bit_cuda_kernels_unpack_words_in_registers(hf_config, quantization):
    """The kernels as CUDA source (no nvcc needed: ``CudaTarget(nvcc=False)``)."""
    spec = ModelSpec.create(hf_config, quantization, load_preset("edge-512"))
    source_only = dataclasses.replace(get_target("cuda"), nvcc=False)
    executable, _ = compile_model(spec, source_only, "tiny")  # RequireFusedDequantize holds
    packed = fused_4bit_kernels(executable)
    problems = [p for name, source in packed.items() for p in unpacking_problems(name, source)]
    assert not problems, problems
    # TVM's CUDA code generator writes a float32x8 constant this way; nvcc refuses it.
    assert not [n for n, s in packed.items() if "make_ulonglong4(" in s]


@pytest.mark.parametrize("quantization", ["q4f16t-hf", "q4f32t-hf"])
def test_4bit_cuda_library_builds_with_nvcc(hf_config, tmp_path, quantization):
    """``mlc-edge compile --target cuda --quantization q4f16t-hf``'s build (nvcc compiles every
    kernel, no GPU needed; q4f16t-g128-hf's kernels differ from q4f16t-hf's in the group size)."""
    target = get_target("cuda")
    problem = target.build_problem()
    if problem:
        pytest.skip(f"the cuda target cannot be built here: {problem}")
    spec = ModelSpec.create(hf_config, quantization, load_preset("edge-512"))
    executable, _ = compile_model(spec, target, "tiny")
    packed = fused_4bit_kernels(executable)  # what nvcc compiled
    assert not [p for name, source in packed.items() for p in unpacking_problems(name, source)]
    library = tmp_path / "tiny.so"
    export(executable, library)
    target.check_library(library)  # a fatbin, no CUDA source
