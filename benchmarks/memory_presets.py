"""GPU memory of the edge presets against MLC-LLM's default settings, from config shapes.

For each model (config.json shapes only, no weights) the library is compiled in memory
for android-opencl under edge-512, edge-768 and MLC's defaults (context = the model's
max_position_embeddings, prefill chunk = min(context, 8192), batch 1; see
``mlc_edge.memory.sources``); prints peak total and planned temporaries per setting, as a
table and one JSON line.

    python benchmarks/memory_presets.py [--target android-opencl]
"""

from __future__ import annotations

import argparse
import json
import time

from model_shapes import LLAMA_3_1_8B_PRUNED, LLAMA_3_2_1B, QWEN2_5_1_5B

from mlc_edge.memory import plan_from_config

MiB = 1 << 20

MODELS = {
    "Llama-3.2-1B": LLAMA_3_2_1B,
    "Qwen2.5-1.5B": QWEN2_5_1_5B,
    "Llama-3.1-8B pruned 4.3B": LLAMA_3_1_8B_PRUNED,
}
SETTINGS = ("edge-512", "edge-768", "mlc-default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="android-opencl")
    args = parser.parse_args()
    results = []
    for model, config in MODELS.items():
        for setting in SETTINGS:
            start = time.perf_counter()
            plan = plan_from_config(config, args.target, setting, "q0f16t", {})
            results.append(
                {
                    "model": model,
                    "setting": setting,
                    "context_window_size": plan.context_window_size,
                    "prefill_chunk_size": plan.prefill_chunk_size,
                    "kv_tokens": plan.kv_tokens,
                    "weights_bytes": plan.weights.total,
                    "kv_cache_bytes": plan.kv_cache_bytes,
                    "temporaries_bytes": plan.temp_max_bytes,
                    "total_bytes": plan.total_bytes,
                    "loads_5GiB_floor": plan.loads[0].loads,
                    "loads_16GiB_floor": plan.loads[1].loads,
                    "compile_s": round(time.perf_counter() - start, 1),
                }
            )
    print(
        f"\n{'model':<26}{'setting':<13}{'chunk/context':>15}{'KV tokens':>11}"
        f"{'temps MiB':>11}{'total MiB':>12}{'vs default':>12}  loads 5/16 GiB"
    )
    for r in results:
        base = next(
            x for x in results if x["model"] == r["model"] and x["setting"] == "mlc-default"
        )
        saved = base["total_bytes"] - r["total_bytes"]
        loads = "/".join("yes" if r[k] else "no" for k in ("loads_5GiB_floor", "loads_16GiB_floor"))
        print(
            f"{r['model']:<26}{r['setting']:<13}"
            f"{r['prefill_chunk_size']:>7}/{r['context_window_size']:<7}"
            f"{r['kv_tokens']:>11}{r['temporaries_bytes'] / MiB:>11.1f}"
            f"{r['total_bytes'] / MiB:>12.1f}{-saved / MiB:>+12.1f}  {loads}"
        )
    print(json.dumps({"benchmark": "memory_presets", "target": args.target, "results": results}))


if __name__ == "__main__":
    main()
