"""fp16 error of one Llama-3.2-1B layer's matmul kernels, TVM's stock rules vs ours.

The kernels of ``batch_decode`` and ``batch_prefill`` (the functions MLC's engine calls;
the tied 128256 x 2048 lm_head included) run in real fp16 on an OpenCL device with
``cl_khr_fp16`` (default: Intel's CPU runtime, ``mlc-edge verify --device intel``) and
are compared with the fp32 reference computed from the same fp16 inputs
(``mlc_edge.verify``): the error is max|kernel - reference| / max|reference| of the
output, for inputs uniform in [-1, 1] (what ``verify`` uses) and in [0, 1) (all
positive: no cancellation, the partial sums grow with K). The fp16 output rounding alone
is up to 2^-11 = 4.9e-4; ``verify``'s tolerance is 4 x 2^-11 = 1.95e-3.

Sizes: ``batch_size`` 1 (a phone runs one sequence), prefill chunks of 16 tokens.

    python benchmarks/fp16_error.py [--device intel] [--json-only]

Prints a table and one JSON line (``{"benchmark": "fp16_error", ...}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
from model_shapes import LLAMA_3_2_1B_ONE_LAYER

from mlc_edge.verify.devices import prepare_environment

prepare_environment()  # before pyopencl: Intel's runtime from pip is found

ENTRY_POINTS = ("batch_decode", "batch_prefill")
CHUNK = 16
INPUTS = {"U[-1,1]": False, "U[0,1)": True}  # name -> all positive


def called_functions(module: Any, entry: str) -> list[str]:
    """The PrimFuncs a Relax function calls (``call_tir``), in call order."""
    import tvm_ffi
    from tvm import relax
    from tvm.ir import GlobalVar

    func = module[entry]
    names: list[str] = []

    def on_call(call: relax.Call) -> None:
        if call.args and isinstance(call.args[0], GlobalVar):
            name = call.args[0].name_hint
            if name not in names:
                names.append(name)

    tvm_ffi.structural_walk(func.body, [(relax.Call, on_call)])
    return names


def matmul_kernels(spec: Any, target: Any) -> dict[str, list[str]]:
    """Entry point -> the matmul PrimFuncs it calls (names as FuseTIR made them)."""
    from mlc_edge.compiler.build import scheduled_module

    unscheduled, _ = scheduled_module(spec, target)
    return {
        entry: [n for n in called_functions(unscheduled, entry) if "matmul" in n]
        for entry in ENTRY_POINTS
    }


def weight_of(checker: Any, name: str) -> str:
    weights = [
        p for p in checker.params(name) if p.is_buffer and len(p.shape) == 2 and "weight" in p.name
    ]
    if not weights:
        return "?"
    shape = "x".join(str(int(d)) for d in weights[0].shape)
    kind = next(
        (
            k
            for k in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")
            if k in weights[0].name
        ),
        "",
    )
    return f"{'lm_head (tied)' if kind == 'embed_tokens' else kind} [{shape}]"


def fp16_error(checker: Any, name: str, positive: bool) -> float:
    """Largest relative error over the function's test cases."""
    from mlc_edge.verify import compare

    worst = 0.0
    for case in checker.cases(name):
        prepared = checker.prepare(name, case)
        written = set(checker.written(name))
        if positive:
            for key, array in prepared.arrays.items():
                if key not in written and array.dtype.kind == "f":
                    prepared.arrays[key] = np.abs(array)
        ref = checker.run_reference(name, prepared)
        got, _ = checker.run_function(name, prepared)
        for buf, expected in ref.items():
            worst = max(worst, compare(got[buf], expected)[1])
    return worst


def measure(device: str) -> dict[str, Any]:
    from mlc_edge.schedules.adreno import adreno_rules, stock_rules

    from mlc_edge.compiler.targets import get_target
    from mlc_edge.config import ModelSpec, load_preset
    from mlc_edge.verify import OpenCLRunner, Sizes, model_checker

    runner = OpenCLRunner(device=device)
    if runner.as_float:
        raise SystemExit(
            f"error: {runner.info.describe()} has no cl_khr_fp16: give a "
            "device with real fp16 (--device intel)"
        )
    spec = ModelSpec.create(LLAMA_3_2_1B_ONE_LAYER, "q0f16t", load_preset("edge-512"))
    target = get_target("android-opencl")
    kernels = matmul_kernels(spec, target)
    wanted = sorted({n for names in kernels.values() for n in names})
    only = "^(" + "|".join(wanted) + ")$"
    sizes = Sizes(
        vocab_size=spec.config.vocab_size,
        seq_lens=(CHUNK,),
        context_window_size=spec.runtime_sizes["context_window_size"],
    )
    checkers = {
        rules_name: model_checker(spec, target, sizes, runner, rules, only)
        for rules_name, rules in (("stock", stock_rules()), ("ours", adreno_rules()))
    }
    rows = []
    for entry, names in kernels.items():
        for name in names:
            row: dict[str, Any] = {
                "entry": entry,
                "function": name,
                "weight": weight_of(checkers["ours"], name),
            }
            for rules_name, checker in checkers.items():
                for label, positive in INPUTS.items():
                    row[f"{rules_name} {label}"] = fp16_error(checker, name, positive)
                print(f"  {entry} {name} {rules_name}: done", file=sys.stderr)
            rows.append(row)
    return {
        "device": runner.info.describe(),
        "model": "Llama-3.2-1B, one layer, tied",
        "batch_size": 1,
        "prefill_chunk": CHUNK,
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"fp16 error (max|err| / max|ref|), {result['model']}, on {result['device']}")
    columns = [f"{r} {i}" for r in ("stock", "ours") for i in INPUTS]
    print(f"{'entry':<14} {'function':<24} {'weight':<30} " + " ".join(f"{c:>14}" for c in columns))
    for row in result["rows"]:
        print(
            f"{row['entry']:<14} {row['function']:<24} {row['weight']:<30} "
            + " ".join(f"{row[c]:>14.2e}" for c in columns)
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="intel", help="an OpenCL device with cl_khr_fp16")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    result = measure(args.device)
    if not args.json_only:
        print_table(result)
    print(json.dumps({"benchmark": "fp16_error", **result}))


if __name__ == "__main__":
    main()
