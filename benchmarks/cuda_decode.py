"""mlc-edge's CUDA build against transformers (PyTorch eager, fp16) on the same GPU and
the same random weights, and against the memory-bandwidth limit of decode.

A Llama-3.2-1B-shaped model (16 layers, hidden 2048, GQA 32/8, vocab 128256, tied
embeddings), fp16, ``q0f16t``. Two steps, because the GPU machine need not have the TVM
compiler:

    # 1. here (TVM compiler + nvcc, no GPU needed): the bundle's library for CUDA, no
    #    weights, plus a runtime-only TVM for the GPU machine's Python (3.12 there)
    pip download apache-tvm-ffi==0.1.15.post2 --no-deps --only-binary=:all: \\
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d /tmp/whl
    python benchmarks/cuda_decode.py prepare -o gpu-bench \\
        --tvm-ffi-wheel /tmp/whl/apache_tvm_ffi-*.whl

    # 2. on the GPU machine (torch + transformers; tvm from gpu-bench/runtime). To carry
    #    it with the checkout, make gpu-bench git-ignored (.git/info/exclude): it is ~28 MB
    #    (runtime 25 MB, library 1.7 MB); the 2.5 GB of weights are made there.
    PYTHONPATH=gpu-bench/runtime:. python3 benchmarks/cuda_decode.py run gpu-bench

``run`` makes the random model with transformers on the GPU (seeded), writes the bundle's
weights from it (``weights-recipe.json`` says which checkpoint tensors make each bundle
parameter and whether it is transposed, as ``mlc-edge convert`` would), checks mlc-edge's
logits against transformers', then times both: pp N (prefill from an empty cache, in the
bundle's chunks) and tg N (N single-token decode steps from an empty cache), mean ± std over
``-r`` repetitions after a warm-up. The ceiling is the GPU's memory bandwidth (spec sheet by
name, and a measured device-to-device copy) over the weight bytes one decode step reads.
Given no ``prepare``d folder and the compiler at hand, ``run`` prepares it first.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LLAMA_3_2_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

# Peak DRAM bandwidth in GB/s from the vendors' spec sheets, by a piece of the device name.
BANDWIDTH_GB_S = {
    "H200": 4800,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "H100": 3350,
    "GH200": 4000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "RTX 5090": 1792,
}


# -- step 1: prepare (needs the TVM compiler and nvcc) -------------------------------------
def prepare(
    out: Path,
    layers: int,
    context: int,
    chunk: int,
    target: str,
    seed: int,
    tvm_ffi_wheel: Path | None,
) -> dict[str, Any]:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf-config"
    hf.mkdir(exist_ok=True)
    hf_config = {**LLAMA_3_2_1B, "num_hidden_layers": layers}
    # config.json only: no weights here.
    LlamaConfig(**hf_config, architectures=["LlamaForCausalLM"]).save_pretrained(hf)
    # Speed does not depend on the text: a word-level tokenizer is enough for the bundle.
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(hf / "tokenizer.json"))
    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    sizes = ["--context-window-size", str(context), "--prefill-chunk-size", str(chunk)]
    mlc = [sys.executable, "-m", "mlc_edge"]
    subprocess.run([*mlc, "gen-config", str(hf), "-o", str(bundle), *sizes], check=True)
    start = time.perf_counter()
    subprocess.run([*mlc, "compile", str(bundle), "--target", target, "--json"], check=True)
    compile_s = time.perf_counter() - start
    recipe = weights_recipe(bundle)
    recipe.update(seed=seed, hf_config=hf_config)
    (out / "weights-recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")

    from mlc_edge.runtime.pack import pack_runtime

    runtime = pack_runtime(out / "runtime", tvm_ffi_wheel)
    library = next((bundle / "lib").glob("*.so"))
    carried = (
        runtime["bytes"]
        + library.stat().st_size
        + sum(f.stat().st_size for f in bundle.glob("*.json"))
    )
    summary = {
        "bundle": str(bundle),
        "library": library.name,
        "library_bytes": library.stat().st_size,
        "compile_s": round(compile_s, 1),
        "runtime": runtime,
        "carried_bytes": carried,
    }
    print(json.dumps(summary))
    if carried >= 64 * 2**20:
        print(f"warning: {carried / 2**20:.1f} MiB to carry, over 64 MiB", file=sys.stderr)
    return summary


def weights_recipe(bundle: Path) -> dict[str, Any]:
    """Per bundle parameter, in load order: the checkpoint tensors (concatenated on axis 0)
    and whether the scheme transposes it, from mlc-edge's own weight map and scheme."""
    from mlc_edge.config import ModelSpec
    from mlc_edge.models.parameters import parameter_list

    spec = ModelSpec.from_chat_config(json.loads((bundle / "mlc-chat-config.json").read_text()))
    mapping = spec.family.weight_map(spec.config)
    transposes = spec.scheme.linear_weight_layout == "KN"
    params = []
    for name, shape, dtype in parameter_list(spec):
        source = mapping[name]
        params.append(
            {
                "name": name,
                "shape": list(shape),
                "dtype": dtype,
                "hf_names": list(source.hf_names),
                "transpose": bool(source.is_linear_weight and transposes),
            }
        )
    return {"quantization": spec.scheme.name, "params": params}


# -- step 2: run (GPU machine: torch, transformers, a runtime-only TVM is enough) ----------
# "cpu" (--device cpu, with a bundle prepared with --target cpu) smoke-tests this script
# where there is no GPU; its numbers are not the point.
DEVICE = "cuda"


def synchronize() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_model(recipe: dict[str, Any]) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe["seed"])
    with torch.device(DEVICE):
        model = LlamaForCausalLM(LlamaConfig(**recipe["hf_config"])).to(torch.float16).eval()
    return model


def write_weights(model: Any, recipe: dict[str, Any], bundle: Path) -> None:
    """The bundle's tensor-cache from the model's tensors, as the recipe says."""
    import torch

    from mlc_edge.convert.tensor_cache import TensorCacheWriter

    for old in bundle.glob("params_shard_*.bin"):
        old.unlink()
    state = model.state_dict()
    with torch.no_grad(), TensorCacheWriter(bundle) as writer:
        for p in recipe["params"]:
            tensor = torch.cat([state[h] for h in p["hf_names"]], dim=0)
            if p["transpose"]:
                tensor = tensor.T
            array = tensor.contiguous().to(getattr(torch, p["dtype"])).cpu().numpy()
            if list(array.shape) != p["shape"]:
                raise SystemExit(f"{p['name']}: made {array.shape}, the bundle wants {p['shape']}")
            writer.add(p["name"], array)
        writer.finish()


def check_logits(engine: Any, model: Any, vocab: int, n: int = 64, steps: int = 16) -> dict:
    """mlc-edge vs transformers on one random prompt: the largest logit difference and
    how many greedy tokens agree (following transformers' tokens)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(0, vocab, n)]
    engine.reset()
    ours = engine.prefill(ids)
    errors, agree, spread = [], 0, []
    with torch.no_grad():
        for step in range(steps + 1):
            theirs = model(torch.tensor([ids], device=DEVICE)).logits[0, -1].float().cpu().numpy()
            errors.append(float(np.abs(ours - theirs).max()))
            spread.append(float(theirs.max() - theirs.min()))
            token = int(theirs.argmax())
            agree += int(int(ours.argmax()) == token)
            ids.append(token)
            if step < steps:
                ours = engine.decode(token)
    engine.reset()
    return {
        "max_logit_error": max(errors),
        "logit_range": min(spread),
        "greedy_agree": agree,
        "greedy_steps": steps + 1,
    }


def time_transformers(
    model: Any, vocab: int, n_prompt: int, n_gen: int, reps: int, seed: int = 0
) -> dict[str, list[float]]:
    """Tokens/s samples of the same pp / tg tests with transformers eager."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)

    def ids(n: int) -> Any:
        return torch.tensor(rng.integers(0, vocab, (1, n)), device=DEVICE)

    def pp() -> float:
        prompt = ids(n_prompt)
        synchronize()
        start = time.perf_counter()
        model(prompt, use_cache=True)
        synchronize()
        return n_prompt / (time.perf_counter() - start)

    def tg() -> float:
        tokens = ids(n_gen)
        synchronize()
        start = time.perf_counter()
        past = None
        for i in range(n_gen):
            past = model(tokens[:, i : i + 1], past_key_values=past, use_cache=True).past_key_values
        synchronize()
        return n_gen / (time.perf_counter() - start)

    samples: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, run in ((f"pp{n_prompt}", pp), (f"tg{n_gen}", tg)):
            run()  # warm-up
            samples[name] = [run() for _ in range(reps)]
    return samples


def gpu_bandwidth() -> tuple[str, float | None, float]:
    """(device name, spec-sheet GB/s or None, measured device-to-device copy GB/s)."""
    import platform

    import torch

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else (platform.processor() or "CPU")
    spec = next((v for k, v in BANDWIDTH_GB_S.items() if k in name), None)
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    synchronize()
    measured = 10 * 2 * src.numel() / (time.perf_counter() - start) / 1e9  # read + write
    del src, dst
    return name, spec, measured


def decode_bytes(recipe: dict[str, Any]) -> int:
    """Weight bytes one decode step reads: every parameter, except that an untied
    embedding table is only gathered from (one row); a tied one is read as the output
    layer."""
    tied = recipe["hf_config"].get("tie_word_embeddings", False)
    total = 0
    for p in recipe["params"]:
        nbytes = 2 if p["dtype"] == "float16" else 4
        for d in p["shape"]:
            nbytes *= d
        if "embed_tokens" in p["name"] and not tied:
            nbytes = nbytes // p["shape"][0]
        total += nbytes
    return total


def run(out: Path, n_prompt: int, n_gen: int, reps: int, args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    if not (out / "weights-recipe.json").is_file():
        print(
            f"{out} is not prepared: preparing it (needs the TVM compiler and nvcc) ...",
            file=sys.stderr,
        )
        prepare(
            out, args.layers, args.context, args.chunk, args.target, args.seed, args.tvm_ffi_wheel
        )
    recipe = json.loads((out / "weights-recipe.json").read_text())
    bundle = out / "bundle"
    print("making the random model and the bundle's weights ...", file=sys.stderr)
    model = make_model(recipe)
    write_weights(model, recipe, bundle)

    from mlc_edge.runtime import Engine
    from mlc_edge.runtime.bench import run_bench

    engine = Engine(bundle, device=DEVICE)
    vocab = int(engine.metadata["active_vocab_size"])
    check = check_logits(engine, model, vocab)
    ours = {r.test: r.samples_ts for r in run_bench(engine, [n_prompt], [n_gen], reps, 1)}
    del engine
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    theirs = time_transformers(model, vocab, n_prompt, n_gen, reps)
    name, spec_bw, measured_bw = gpu_bandwidth()
    per_token = decode_bytes(recipe)
    bandwidth = spec_bw or measured_bw
    ceiling = bandwidth * 1e9 / per_token

    rows = {
        f"mlc-edge {DEVICE} ({recipe['quantization']})": ours,
        "transformers fp16 eager": theirs,
    }
    tg, pp = f"tg{n_gen}", f"pp{n_prompt}"
    print(
        f"\n{name}: weights read per decode step {per_token / 2**30:.2f} GiB; "
        f"bandwidth {bandwidth:.0f} GB/s ({'spec sheet' if spec_bw else 'measured'}; "
        f"copy measured {measured_bw:.0f} GB/s) -> decode ceiling {ceiling:.1f} tok/s"
    )
    print(
        f"correctness: max |logit diff| {check['max_logit_error']:.4f} (logit range "
        f"{check['logit_range']:.2f}), greedy tokens agree "
        f"{check['greedy_agree']}/{check['greedy_steps']}"
    )
    print(f"\n{'engine':<28}{pp + ' tok/s':>20}{tg + ' tok/s':>20}{'of ceiling':>12}")
    for label, s in rows.items():
        print(
            f"{label:<28}{np.mean(s[pp]):>12.1f} ± {np.std(s[pp], ddof=1):<5.1f}"
            f"{np.mean(s[tg]):>12.1f} ± {np.std(s[tg], ddof=1):<5.1f}"
            f"{np.mean(s[tg]) / ceiling:>11.0%}"
        )
    print(
        json.dumps(
            {
                "benchmark": "cuda_decode",
                "gpu": name,
                "layers": recipe["hf_config"]["num_hidden_layers"],
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "repetitions": reps,
                "prefill_chunk_size": json.loads((bundle / "mlc-chat-config.json").read_text())[
                    "prefill_chunk_size"
                ],
                "decode_weight_bytes": per_token,
                "bandwidth_gb_s": bandwidth,
                "bandwidth_spec_gb_s": spec_bw,
                "bandwidth_copy_gb_s": round(measured_bw, 1),
                "decode_ceiling_tok_s": round(ceiling, 2),
                "correctness": check,
                "results": {
                    k: {
                        t: {
                            "avg_ts": round(float(np.mean(v)), 2),
                            "stddev_ts": round(float(np.std(v, ddof=1)), 2),
                        }
                        for t, v in s.items()
                    }
                    for k, s in rows.items()
                },
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for step in ("prepare", "run"):
        p = sub.add_parser(step)
        p.add_argument("out", type=Path, nargs="?", default=Path("gpu-bench"))
        p.add_argument("-o", "--output", type=Path, default=None, help="same as OUT")
        p.add_argument("--layers", type=int, default=16)
        p.add_argument("--context", type=int, default=1024, help="context window size")
        p.add_argument("--chunk", type=int, default=128, help="prefill chunk size")
        p.add_argument("--target", default="cuda", help="cuda, cuda:sm_90, ...")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--tvm-ffi-wheel",
            type=Path,
            default=None,
            help="apache-tvm-ffi wheel for the GPU machine's Python",
        )
        if step == "run":
            p.add_argument("-p", "--n-prompt", type=int, default=128)
            p.add_argument("-n", "--n-gen", type=int, default=128)
            p.add_argument("-r", "--repetitions", type=int, default=5)
            p.add_argument(
                "--device",
                choices=["cuda", "cpu"],
                default="cuda",
                help="cpu: smoke-test the script (prepare with --target cpu)",
            )
    args = parser.parse_args()
    out = args.output or args.out
    if args.step == "prepare":
        prepare(
            out, args.layers, args.context, args.chunk, args.target, args.seed, args.tvm_ffi_wheel
        )
    else:
        global DEVICE
        DEVICE = args.device
        run(out, args.n_prompt, args.n_gen, args.repetitions, args)


if __name__ == "__main__":
    main()
