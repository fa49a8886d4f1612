"""Time a Llama-3.2-1B layer's linear kernels on this machine's OpenCL device, per rule set.

The kernels are the ones ``mlc-edge compile --target android-opencl`` makes: decode GEMVs
(``[1, 1, K] x [K, N]``) and 16-token prefill chunks (``[1, seq_len, K] x [K, N]``,
``seq_len`` = 16) of the q/k/v, o, gate/up and down projections, run with the launch sizes
their host code uses (``mlc_edge.verify``). Each rule set's kernels are also checked
against the CPU once, so a fast wrong schedule shows as such.

Rule sets are compared side by side in one run: ``--rules NAME=module:attr`` (repeatable;
``attr`` is a list of dlight rules or a function returning one), the first is the baseline
of the ratio column. Default: TVM's stock dlight rules against ours, side by side
(``stock=mlc_edge.schedules.adreno:stock_rules``,
``adreno=mlc_edge.schedules.adreno:adreno_rules``).
From Python: ``benchmark_rule_sets({"stock": stock_rules(), "adreno": adreno_rules()})``.

GB/s counts the bytes a kernel must read and write (weights, activations, output) in the
dtypes it ran with: on a device without fp16 (PoCL, NVIDIA) the fp16 kernels run with
``half`` as ``float``, twice a phone's bytes. Device time comes from OpenCL profiling
events (median of the runs). Numbers from PoCL (the CPU) say nothing about a phone's GPU;
they compare rule sets on the same device.

``--compile`` also times ``mlc-edge compile --target android-opencl`` of a pruned
Llama-3.1-8B (hidden 3072, intermediate 9216, 24/8 heads, 32 layers, vocabulary 128256,
~4.3B parameters) from its config.json alone (a bundle folder holding only the
mlc-chat-config.json made from it: the library, no weights), with the child's peak memory.

``--quantization q0f16t,q4f16t`` runs each rule set's kernels for each scheme on the same
shapes: the 4-bit decode GEMV (packed words, scales, zero points read) beside the fp16 one.

    python benchmarks/opencl_kernels.py [--rules NAME=module:attr ...] [--lm-head]
                                        [--repeat 20] [--rounds 3] [--compile]
                                        [--quantization q0f16t,q4f16t] [--json-only]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from model_shapes import LLAMA_3_1_8B_PRUNED, LLAMA_3_2_1B_ONE_LAYER

PREFILL_CHUNK = 16
DEFAULT_RULES = [
    "stock=mlc_edge.schedules.adreno:stock_rules",
    "adreno=mlc_edge.schedules.adreno:adreno_rules",
]
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed_tokens")


def load_rules(spec: str) -> tuple[str, list[Any]]:
    """``NAME=module:attr`` → (name, rules)."""
    name, _, target = spec.partition("=")
    if not target:
        name, target = spec.rsplit(":", 1)[-1], spec
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    return name, list(value() if callable(value) else value)


def linear_functions(checker: Any) -> dict[str, tuple[str, dict[str, int]]]:
    """The decode GEMVs and prefill matmuls of the layer: label → (function, case).

    Found by their parameters, not their numbered names: a 2-D weight and an activation
    of one token (decode: every size static) or of ``seq_len`` tokens (prefill).
    """
    found: dict[str, tuple[str, dict[str, int]]] = {}
    for name in checker.funcs:
        if "matmul" not in name:
            continue
        params = checker.params(name)
        weights = [p for p in params if p.is_buffer and len(p.shape) == 2 and "weight" in p.name]
        if len(weights) != 1:
            continue
        projection = next((k for k in PROJECTIONS if k in weights[0].name), weights[0].name)
        if projection == "embed_tokens":  # tied embeddings: the output layer
            projection = "lm_head"
        shape_text = " ".join(str(d) for p in params if p.is_buffer for d in p.shape)
        if "batch_size" in shape_text:
            continue  # batch_decode / batch_prefill: the same kernels at batch 1
        if "seq_len" in shape_text:
            found[f"prefill {projection}"] = (name, {"seq_len": PREFILL_CHUNK})
        else:
            found[f"decode {projection}"] = (name, {})

    def order(label: str) -> tuple[bool, int]:
        phase, _, projection = label.partition(" ")
        rank = PROJECTIONS.index(projection) if projection in PROJECTIONS else len(PROJECTIONS)
        return phase != "decode", rank

    return {k: found[k] for k in sorted(found, key=order)}


def bytes_moved(checker: Any, name: str, case: dict[str, int]) -> int:
    """Bytes every buffer of the function holds, in the dtypes the device runs."""
    from mlc_edge.verify.inputs import shape_of

    total = 0
    for p in checker.params(name):
        if p.is_buffer:
            n = math.prod(shape_of(p, dict(case)))
            total += n * checker.runner.host_dtype(p.dtype).itemsize
    return total


def benchmark_rule_sets(
    rule_sets: dict[str, list[Any]],
    config: dict[str, Any] | None = None,
    repeat: int = 20,
    lm_head: bool = False,
    check: bool = True,
    rounds: int = 3,
    quantizations: tuple[str, ...] = ("q0f16t",),
) -> dict[str, Any]:
    """Time each rule set's linear kernels of one layer; returns rows and device info.

    The rule sets take turns on each kernel, ``rounds`` times, and each keeps its best
    median: a machine shared with other work slows whichever runs during a busy moment,
    and turns spread that over all rule sets instead of biasing one.
    """
    from mlc_edge.compiler.targets import get_target
    from mlc_edge.config import ModelSpec, load_preset
    from mlc_edge.verify import OpenCLRunner, model_checker

    target = get_target("android-opencl")
    runner = OpenCLRunner()
    checkers: dict[str, tuple[Any, float]] = {}
    # Several schemes (q0f16t,q4f16t): each rule set's kernels per scheme, on the same shapes;
    # the functions are matched by label, so the 4-bit GEMV sits beside the fp16 one.
    for quantization in quantizations:
        spec = ModelSpec.create(
            config or LLAMA_3_2_1B_ONE_LAYER, quantization, load_preset("edge-512")
        )
        for rules_name, rules in rule_sets.items():
            start = time.perf_counter()
            checker = model_checker(spec, target, runner=runner, rules=rules, only="matmul")
            name = f"{rules_name} {quantization}" if len(quantizations) > 1 else rules_name
            checkers[name] = (checker, time.perf_counter() - start)
    first = next(iter(checkers.values()))[0]
    labels = {
        label: found
        for label, found in linear_functions(first).items()
        if lm_head or "lm_head" not in label
    }
    best: dict[tuple[str, str], float] = {}
    functions = {
        rules_name: linear_functions(checker) for rules_name, (checker, _s) in checkers.items()
    }
    for label in labels:
        for _ in range(rounds):
            for rules_name, (checker, _s) in checkers.items():
                name, case = functions[rules_name][label]
                seconds = checker.time_function(name, case, repeat=repeat)
                key = (rules_name, label)
                best[key] = min(best.get(key, float("inf")), seconds)
    rows: list[dict[str, Any]] = []
    for rules_name, (checker, compile_s) in checkers.items():
        for label in labels:
            name, case = functions[rules_name][label]
            seconds = best[(rules_name, label)]
            nbytes = bytes_moved(checker, name, case)
            correct = checker.check_case(name, case).passed if check else None
            launches = checker.launches(name, checker.prepare(name, case))
            rows.append(
                {
                    "rules": rules_name,
                    "kernel": label,
                    "function": name,
                    "seconds": seconds,
                    "gb_per_s": nbytes / seconds / 1e9,
                    "bytes": nbytes,
                    "correct": correct,
                    "compile_s": compile_s,
                    "launches": [f"{k.kernel} {k.global_size}/{k.local_size}" for k in launches],
                }
            )
    base = {r["kernel"]: r["seconds"] for r in rows if r["rules"] == next(iter(checkers))}
    for r in rows:
        r["speedup_vs_first"] = base[r["kernel"]] / r["seconds"] if r["kernel"] in base else None
    return {"device": runner.info.describe(), "fp16_as_float": runner.as_float, "rows": rows}


def time_compile(config: dict[str, Any], target: str = "android-opencl") -> dict[str, Any]:
    """Wall time and peak memory of ``mlc-edge compile`` (library only) in a child."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "pruned-llama-4.3b"
        bundle.mkdir()
        sizes = {"context_window_size": 512, "prefill_chunk_size": 16, "max_batch_size": 1}
        chat = {
            "model_type": "llama",
            "quantization": "q0f16t",
            "model_config": {**config, **sizes, "tensor_parallel_shards": 1},
        }
        (bundle / "mlc-chat-config.json").write_text(json.dumps(chat))
        cmd = [
            sys.executable,
            "-m",
            "mlc_edge",
            "compile",
            str(bundle),
            "--target",
            target,
            "--json",
        ]
        # The compile runs under a small parent of its own, which reports the largest
        # RSS of its children: this process's other children (PoCL's linker) stay out.
        wrapper = (
            "import json, resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:],"
            " 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
        )
        start = time.perf_counter()
        outer = subprocess.run(
            [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True
        )
        wall = time.perf_counter() - start
        child = json.loads(outer.stdout)
        if child["rc"] != 0:
            raise RuntimeError(f"compile failed: {child['err'].strip()[-500:]}")
        proc_stdout = child["out"]
        summary = json.loads(proc_stdout.strip().splitlines()[-1])
        lib = Path(summary["library"])
        return {
            "model": "pruned Llama-3.1-8B (hidden 3072, intermediate 9216, 24/8 heads, "
            "32 layers, vocab 128256)",
            "target": target,
            "seconds": wall,
            "peak_rss_mib": child["maxrss_kib"] / 1024,  # KiB on Linux
            "library_mib": lib.stat().st_size / 2**20,
            "estimated_vram_mib": summary.get("app_config", {}).get("estimated_vram_bytes", 0)
            / 2**20,
        }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"device: {result['device']}"
        + (" (fp16 kernels run as float: bytes are fp32's)" if result["fp16_as_float"] else "")
    )
    print(
        f"{'rules':<16} {'kernel':<22} {'function':<22} {'time':>10} {'MB read':>8} "
        f"{'GB/s':>8} {'vs first':>8}  check"
    )
    for r in result["rows"]:
        ratio = f"{r['speedup_vs_first']:.2f}x" if r["speedup_vs_first"] else "-"
        check = {True: "ok", False: "WRONG", None: "-"}[r["correct"]]
        print(
            f"{r['rules']:<16} {r['kernel']:<22} {r['function']:<22} "
            f"{r['seconds'] * 1e6:>8.0f}us {r['bytes'] / 1e6:>8.2f} {r['gb_per_s']:>8.2f} "
            f"{ratio:>8}  {check}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rules",
        action="append",
        default=[],
        help="NAME=module:attr (repeatable); default: stock vs adreno rules",
    )
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns of the rule sets on each kernel (best median kept)",
    )
    ap.add_argument("--lm-head", action="store_true", help="also the 128256-row output layer")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time mlc-edge compile of the 4.3B pruned Llama config",
    )
    ap.add_argument(
        "--quantization",
        default="q0f16t",
        help="scheme(s), e.g. q0f16t,q4f16t: each rule set's kernels per scheme",
    )
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)

    specs = args.rules or DEFAULT_RULES
    rule_sets = dict(load_rules(s) for s in specs)
    result = benchmark_rule_sets(
        rule_sets,
        repeat=args.repeat,
        lm_head=args.lm_head,
        check=not args.no_check,
        rounds=args.rounds,
        quantizations=tuple(args.quantization.split(",")),
    )
    if args.compile:
        result["compile"] = time_compile(LLAMA_3_1_8B_PRUNED)
    if not args.json_only:
        print_table(result)
        if "compile" in result:
            c = result["compile"]
            print(
                f"mlc-edge compile {c['model']} for {c['target']}: {c['seconds']:.1f} s, "
                f"peak memory {c['peak_rss_mib']:.0f} MiB, library {c['library_mib']:.1f} MiB"
            )
    compact = {
        **result,
        "rows": [{k: v for k, v in r.items() if k != "launches"} for r in result["rows"]],
    }
    print(json.dumps({"benchmark": "opencl_kernels", "cpus": os.cpu_count(), **compact}))
    if any(r["correct"] is False for r in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
