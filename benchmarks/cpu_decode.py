"""mlc-edge's CPU build against transformers (PyTorch eager) on the same weights.

A Llama-3.2-1B-shaped model with random weights is saved as a Hugging Face checkpoint,
compiled by mlc-edge for the CPU (q0f32t: same fp32 math as PyTorch; q0f16t: half the
bytes), and both run the same prompt with the same number of threads. Prints a table and
one JSON line.

    python benchmarks/cpu_decode.py [--layers 16] [--threads 2] [--prompt 64] [--decode 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def make_checkpoint(path: Path, layers: int):
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA_3_2_1B, "num_hidden_layers": layers})
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    # Speed does not depend on the text: a word-level tokenizer is enough for the bundle.
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return model


def time_transformers(model, prompt: list[int], steps: int) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        start = time.perf_counter()
        for _ in range(steps):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        decode = time.perf_counter() - start
    return len(prompt) / prefill, steps / decode


def mlc_edge_timer(bundle: Path, prompt: list[int], steps: int):
    """Load ``bundle`` (warmed up) and return a function timing one round: prefill
    ``prompt``, then ``steps`` greedy decode steps, from an empty cache; (prefill, decode)
    tok/s. The weights are in memory once loaded: the bundle's files may go."""
    import numpy as np

    from mlc_edge.runtime import Engine

    engine = Engine(bundle)
    engine.prefill(prompt[:16])  # warm-up: first calls allocate
    engine.decode(1)

    def one_round() -> tuple[float, float]:
        engine.reset()
        start = time.perf_counter()
        logits = engine.prefill(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            logits = engine.decode(int(np.argmax(logits)))
        decode = time.perf_counter() - start
        return len(prompt) / prefill, steps / decode

    return one_round


def time_mlc_edge(bundle: Path, prompt: list[int], steps: int) -> tuple[float, float]:
    return mlc_edge_timer(bundle, prompt, steps)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--schemes", default="q0f32t,q0f16t")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlc-edge-bench-"))
    prompt = [int(i) for i in torch.randint(1000, 100000, (args.prompt,))]
    try:
        print(
            f"building a random Llama-3.2-1B-shaped checkpoint ({args.layers} layers) ...",
            file=sys.stderr,
        )
        model = make_checkpoint(work / "hf", args.layers)
        rows = {}
        for scheme in args.schemes.split(","):
            bundle = work / scheme
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mlc_edge",
                    "compile",
                    str(work / "hf"),
                    "--target",
                    "cpu",
                    "--quantization",
                    scheme,
                    "-o",
                    str(bundle),
                    "--context-window-size",
                    str(args.prompt + args.decode + 16),
                    "--json",
                ],
                check=True,
            )
            rows[f"mlc-edge {scheme}"] = time_mlc_edge(bundle, prompt, args.decode)
            shutil.rmtree(bundle)
        rows["transformers fp32 eager"] = time_transformers(model, prompt, args.decode)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = rows["transformers fp32 eager"][1]
    print(f"\n{'engine':<26}{'prefill tok/s':>15}{'decode tok/s':>14}{'decode vs torch':>17}")
    for name, (prefill, decode) in rows.items():
        print(f"{name:<26}{prefill:>15.2f}{decode:>14.2f}{decode / base:>16.2f}x")
    print(
        json.dumps(
            {
                "benchmark": "cpu_decode",
                "layers": args.layers,
                "threads": args.threads,
                "prompt_tokens": args.prompt,
                "decode_tokens": args.decode,
                "results": {
                    k: {"prefill_tok_s": round(p, 3), "decode_tok_s": round(d, 3)}
                    for k, (p, d) in rows.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
