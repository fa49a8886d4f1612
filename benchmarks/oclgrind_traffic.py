"""Bytes each linear kernel of a decode step and a prefill chunk requests, per rule set,
counted exactly on Oclgrind (``mlc-edge verify --traffic``'s machinery), and the
predicted whole-model decode tokens/s on each Adreno from the bytes of one decode step.

The model: one layer of Llama-3.2-1B (hidden 2048, intermediate 8192, 32/8 heads of 64,
tied 128256 x 2048 embedding), totals scaled to its 16 layers. ``--vocab`` scales the
vocabulary down (Oclgrind runs ~5M multiply-adds a second; the full lm_head is 262M):
then the lm_head row and the predictions are for that vocabulary, and the script says
so. ``--steps decode`` skips the prefill chunk (16 tokens: 16x the work).

The rule sets: TVM's stock dlight rules and ours (``mlc_edge.schedules.adreno``). They
schedule the model's kernels; the KV cache kernels we replace (RoPE, append, merge:
``mlc_edge/models/{rope_kernel,kv_cache_kernels}.py``) are ours under both. The minimum
of a kernel is each byte it needs read once (its distinct bytes); the predicted tokens/s
is bandwidth / bytes of one decode step: a prediction, not a measurement. A function
Oclgrind could not run is listed as not counted, and the prediction says it is too high.

    python benchmarks/oclgrind_traffic.py [--steps decode,prefill] [--vocab N] [--small]
                                          [--rules stock,adreno]

Prints, per step, the linear layers and every kernel (one column per rule set), then
the predictions and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from model_shapes import LLAMA_3_2_1B_ONE_LAYER

MODEL_LAYERS = 16
# --small: the same layer scaled down 4x in width (a prefill chunk of the full layer is
# ~1G multiply-adds: minutes on Oclgrind); its ratios show the schedules' access
# patterns, its bytes and predictions are not Llama-3.2-1B's.
SMALL = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
}


def measure(rules_name: str, steps: tuple[str, ...], config: dict[str, Any]) -> dict[str, Any]:
    from mlc_edge.schedules.adreno import adreno_rules, stock_rules

    from mlc_edge.compiler.targets import get_target
    from mlc_edge.config import ModelSpec, load_preset
    from mlc_edge.verify import default_sizes, model_checker
    from mlc_edge.verify.oclgrind import OclgrindHost
    from mlc_edge.verify.traffic import measure_traffic

    rules = {"stock": stock_rules, "adreno": adreno_rules}[rules_name]()
    target = get_target("android-opencl")
    spec = ModelSpec.create(config, "q0f16t", load_preset(target.default_preset))
    start = time.perf_counter()
    checker = model_checker(spec, target, default_sizes(spec), OclgrindHost(), rules=rules)
    report = measure_traffic(
        checker,
        steps,
        int(spec.runtime_sizes["prefill_chunk_size"]),
        MODEL_LAYERS,
        1,
        progress=lambda line: print(f"  {rules_name} {line}", file=sys.stderr, flush=True),
    )
    return {"rules": rules_name, "seconds": round(time.perf_counter() - start, 1), "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="decode,prefill")
    parser.add_argument("--vocab", type=int, default=LLAMA_3_2_1B_ONE_LAYER["vocab_size"])
    parser.add_argument("--rules", default="stock,adreno")
    parser.add_argument(
        "--small",
        action="store_true",
        help="hidden 512, intermediate 2048, 8/2 heads, vocabulary 2048",
    )
    args = parser.parse_args()
    steps = tuple(s for s in args.steps.split(",") if s)
    config = {**LLAMA_3_2_1B_ONE_LAYER, "vocab_size": args.vocab, **(SMALL if args.small else {})}
    results = [measure(r, steps, config) for r in args.rules.split(",")]

    if args.small:
        shape = (
            "a Llama-3.2-1B layer scaled down (hidden 512, intermediate 2048, 8/2 heads "
            "of 64, vocabulary 2048): ratios only, its bytes are not the 1B model's"
        )
    elif args.vocab != LLAMA_3_2_1B_ONE_LAYER["vocab_size"]:
        shape = f"one Llama-3.2-1B layer, vocabulary scaled to {args.vocab}"
    else:
        shape = "one Llama-3.2-1B layer (tied 128256 x 2048 embedding)"
    print(
        f"{shape}; totals x{MODEL_LAYERS} layers; bytes counted on Oclgrind, fp16 as on the phone"
    )
    rows = []
    for step in steps:
        per_rules = {
            r["rules"]: next(x for x in r["report"].steps if x.step == step) for r in results
        }
        print(f"\n{step}: linear layers, bytes requested / minimum (weight + activation once)")
        print(
            f"{'function':<28} "
            + " ".join(f"{r['rules'] + ' bytes':>14} {'ratio':>6}" for r in results)
        )
        # each linear layer (function) with all its kernels (stock pads first); a function
        # one rule set could not count shows as such, not as a missing row
        layers = {name: {x.function: x for x in s.linear_layers()} for name, s in per_rules.items()}
        functions = list(dict.fromkeys(f for by_name in layers.values() for f in by_name))
        for function in functions:
            cells, lm_head = [], False
            for r in results:
                layer = layers[r["rules"]].get(function)
                if layer is None:
                    cells.append(f"{'not counted':>21}")
                    continue
                lm_head = lm_head or layer.lm_head
                cells.append(f"{layer.loaded:>14,} {layer.ratio:>6.3f}")
                rows.append(
                    {
                        "step": step,
                        "rules": r["rules"],
                        "function": function,
                        "kernels": [k.kernel for k in layer.kernels],
                        "bytes_loaded": layer.loaded,
                        "minimum": layer.minimum,
                        "ratio": round(layer.ratio, 4),
                        "lm_head": layer.lm_head,
                    }
                )
            label = function + (" (lm_head)" if lm_head else "")
            print(f"{label:<28} " + " ".join(cells))
        print(f"\n{step}: every kernel, bytes loaded / minimum (its distinct bytes), per call")
        print(
            f"{'kernel':<36} "
            + " ".join(f"{r['rules'] + ' bytes':>14} {'ratio':>6}" for r in results)
        )
        kernels = {name: {k.kernel: k for k in s.kernels} for name, s in per_rules.items()}
        for kernel in dict.fromkeys(k for by_name in kernels.values() for k in by_name):
            cells = []
            for r in results:
                k = kernels[r["rules"]].get(kernel)
                cells.append(f"{'-':>21}" if k is None else f"{k.loaded:>14,} {k.ratio:>6.3f}")
            print(f"{kernel:<36} " + " ".join(cells))
        for name, s in per_rules.items():
            for function, why in s.not_counted.items():
                if why != "not a kernel of this library":
                    print(f"  {name}: not counted: {function}: {why}")
    predictions = {}
    print(
        "\npredicted decode tokens/s of the whole model (bandwidth / bytes of one decode "
        "step; a prediction, not measured on a phone)"
    )
    for r in results:
        step = next((x for x in r["report"].steps if x.step == "decode"), None)
        if step is None:
            continue
        missing = [
            f for f, why in step.not_counted.items() if why != "not a kernel of this library"
        ]
        predictions[r["rules"]] = {
            "bytes_per_step": round(step.total_bytes()),
            "minimum_per_step": round(step.minimum_bytes()),
            "gpus": r["report"].predictions(),
            "not_counted": missing,
        }
        cells = ", ".join(
            f"{p['gpu']} {p['predicted_decode_tok_s']:.1f}" for p in r["report"].predictions()
        )
        print(
            f"  {r['rules']:<8} {step.total_bytes() / 1e6:,.1f} MB/step "
            f"(minimum {step.minimum_bytes() / 1e6:,.1f} MB): {cells}"
            + (f" (tok/s too high: {', '.join(missing)} not counted)" if missing else "")
        )
    print(
        json.dumps(
            {
                "benchmark": "oclgrind_traffic",
                "model": "llama-3.2-1b-small-layer" if args.small else "llama-3.2-1b-1-layer",
                "vocab_size": config["vocab_size"],
                "config": config,
                "model_layers": MODEL_LAYERS,
                "steps": list(steps),
                "rows": rows,
                "predictions": predictions,
                "seconds": {r["rules"]: r["seconds"] for r in results},
            }
        )
    )


if __name__ == "__main__":
    main()
