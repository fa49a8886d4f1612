"""4-bit decode on this CPU: mlc-edge ``q4f16t`` and ``q4f16t-hf`` vs ``q0f16t`` vs llama.cpp
``Q4_0``.

One random Llama-3.2-1B-shaped checkpoint (``model_shapes.LLAMA_3_2_1B``, fewer layers with
``--layers``) is saved as a Hugging Face checkpoint; mlc-edge compiles it for the CPU in
each scheme (``q4f16t``: the tied output layer a 4-bit copy of the fp16 table;
``q4f16t-hf``: the fp16 table is the output layer),
and the same weights are written as a llama.cpp GGUF in Q4_0 (gguf-py's numpy
quantizer; every matrix, the tied embedding included, in Q4_0; norms in F32; q/k rows
permuted as llama.cpp's converter does). All engines are loaded (and warmed up) first;
then, ``--rounds`` times, each in turn prefills the same prompt and decodes ``--decode``
tokens greedily from an empty cache, with the same thread count. Each engine's best round
is reported (the JSON line has every round): on a shared machine a single round of one
engine can land in a slow spell, which once swung llama.cpp's decode between 26 and 35
tok/s from run to run.

Decode reads every weight once a token (but of an embedding table that the output layer
does not share, one row: ``q4f16t``'s fp16 table is left out), so its ceiling is
bandwidth / those bytes. The bandwidth is that of a plain read with the same thread count
(``read_bandwidth``: 512 MiB, more than the caches hold, in order, through TVM's thread
pool as the GEMVs run; a numpy copy, one thread, was below what llama.cpp reached), timed
in every round beside the engines, its best round counting as theirs do: on a shared
machine it moves by a fifth from minute to minute. llama.cpp comes from
``pip install llama-cpp-python`` (not a project dependency); without it the script says so
and runs the others. The instruction sets it was built for are printed with the results:
its default build is native, and on a CPU with AMX its batched prompt path crashed here
(``llama_cpp_batches_work``), in which case only its decode is timed. A build without AMX
(``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON ..."``) times both.

``--split`` also times, on their own, the GEMVs one decode step runs: one layer's four
4-bit linear layers (q/k/v, o, gate/up, down), the tied fp16 lm_head and the 4-bit lm_head
of ``q4f16t``, each cycling through copies of its weights larger than the caches, so the
step's time can be split into layers and lm_head (attention, norms and sampling are left
out).

    python benchmarks/int4_cpu.py [--layers 4] [--threads 2] [--prompt 64] [--decode 32]
                                  [--rounds 5] [--split]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cpu_decode import mlc_edge_timer
from cpu_gemv import build, sample
from model_shapes import LLAMA_3_2_1B

from mlc_edge.memory.sources import tensor_cache_records
from mlc_edge.runtime.bench import cpu_name


def make_checkpoint(path: Path, layers: int) -> dict[str, np.ndarray]:
    """Random fp16 weights saved as a HF checkpoint; returns them as float32 numpy."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {**LLAMA_3_2_1B, "num_hidden_layers": layers, "torch_dtype": "float16"}
    model = LlamaForCausalLM(LlamaConfig(**config)).eval().half()
    model.save_pretrained(path, safe_serialization=True)
    # Speed does not depend on the text: a word-level tokenizer is enough for the bundle.
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's rope pairs dims (2i, 2i+1); HF's pairs (i, i + d/2): reorder the rows.
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf_q4_0(path: Path, weights: dict[str, np.ndarray], layers: int) -> int:
    """The same weights as a llama.cpp GGUF, matrices in Q4_0. Returns the tensor bytes."""
    import gguf

    c = LLAMA_3_2_1B
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = c["vocab_size"]
    # A sentencepiece-style vocabulary of placeholders: llama.cpp needs the 256 byte tokens.
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"t{i}".encode() for i in range(vocab - len(tokens))]
    types += [1] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    nbytes = 0

    def add(name: str, arr: np.ndarray) -> None:
        nonlocal nbytes
        if arr.ndim == 2:
            data = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            data = arr.astype(np.float32)
            w.add_tensor(name, data)
        nbytes += data.nbytes

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"])
        add(
            f"blk.{i}.attn_q.weight",
            _permute_qk(weights[p + "self_attn.q_proj.weight"], c["num_attention_heads"]),
        )
        add(
            f"blk.{i}.attn_k.weight",
            _permute_qk(weights[p + "self_attn.k_proj.weight"], c["num_key_value_heads"]),
        )
        add(f"blk.{i}.attn_v.weight", weights[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", weights[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", weights[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", weights[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return nbytes


def llama_cpp_batches_work(gguf_path: Path, prompt: list[int], threads: int) -> bool:
    """Whether llama.cpp evaluates ``prompt`` in one batch without crashing, tried in a
    child process. On an Intel Xeon with AMX, the build ``pip install llama-cpp-python``
    makes (0.3.36, native: its AMX kernels on) segfaulted here in its batched matmul on
    this benchmark's 64-token prompt, while one token at a time ran."""
    code = (
        "import sys; from llama_cpp import Llama; "
        f"m = Llama(sys.argv[1], n_ctx={len(prompt) + 16}, n_batch={len(prompt) + 16}, "
        f"n_threads={threads}, n_threads_batch={threads}, verbose=False); "
        "m.eval([int(t) for t in sys.argv[2:]])"
    )
    args = [sys.executable, "-c", code, str(gguf_path), *map(str, prompt)]
    return subprocess.run(args, capture_output=True).returncode == 0


def llama_cpp_timer(
    gguf_path: Path, prompt: list[int], steps: int, threads: int, batched: bool = True
):
    """llama.cpp's model (warmed up) and a function timing one round, as
    ``cpu_decode.mlc_edge_timer``'s. It maps the GGUF: the file must stay. Not
    ``batched`` (see ``llama_cpp_batches_work``), the prompt goes in a token at a time
    and the round's prefill speed is None: only decode is comparable."""
    from llama_cpp import Llama

    n_ctx = len(prompt) + steps + 16  # n_batch = n_ctx: .scores has a row per position
    llm = Llama(
        str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def feed(tokens: list[int]) -> None:
        for batch in [tokens] if batched else [[t] for t in tokens]:
            llm.eval(batch)

    feed(prompt[:16])  # warm-up
    llm.eval([1])

    def one_round() -> tuple[float | None, float]:
        llm.reset()
        start = time.perf_counter()
        feed(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        decode = time.perf_counter() - start
        return (len(prompt) / prefill if batched else None), steps / decode

    return one_round


def llama_cpp_system_info() -> str:
    """The instruction sets llama.cpp was built for, as it reports them."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return " ".join(f.strip() for f in info.split("|") if f.strip().endswith("= 1"))


def _int4_gemv(k: int, n: int, layout: Any, target: Any) -> Any:
    """A relax VM whose ``decode`` is ``[1, 1, K] x`` a 4-bit ``[K, N]`` weight (fp16) stored
    in ``layout``, built like the model's layers (FuseInt4Matmul, the CPU rules, shape
    functions noalias)."""
    import tvm
    from mlc_edge.schedules.cpu import cpu_rules
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import spec
    from tvm.s_tir import dlight as dl

    from mlc_edge.compiler.build import fuse_into_tir
    from mlc_edge.compiler.passes import MarkShapeFuncsNoAlias
    from mlc_edge.quantization.int4 import Int4KNLinear

    class Layer(nn.Module):
        def __init__(self) -> None:
            self.lin = Int4KNLinear(k, n, False, "float16", layout)

        def decode(self, x: nn.Tensor) -> nn.Tensor:
            return self.lin(x)

    model = Layer()
    model.to("float16")
    mod, _ = model.export_tvm(
        spec={"decode": {"x": spec.Tensor([1, 1, k], "float16"), "$": {"param_mode": "plain"}}}
    )
    mod = fuse_into_tir()(mod)
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    pipeline = tvm.transform.Sequential(
        [relax.get_pipeline("default_build"), MarkShapeFuncsNoAlias()]
    )
    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    return relax.VirtualMachine(ex, tvm.cpu())


def decode_split(threads: int, cold_bytes: int = 256 * 2**20) -> dict[str, float]:
    """Seconds per call of one layer's 4-bit GEMVs (group 32), of the tied fp16 lm_head
    GEMV (MatmulNK, q4f16t-hf) and of the 4-bit lm_head (q4f16t), weights cycled through
    copies larger than ``cold_bytes``; the 4-bit weights in the layout the model's are (CPU
    tiles where this CPU's kernel reads them so)."""
    import tvm
    from mlc_edge.schedules.cpu.int4_gemv_avx2 import reads_tiles
    from tvm.target.codegen import llvm_get_system_cpu

    from mlc_edge.quantization.int4 import PART_NAMES, Int4Layout

    c = LLAMA_3_2_1B
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * c["head_dim"]
    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": threads}
    )
    dev = tvm.cpu()
    x = tvm.runtime.tensor(np.zeros((1, 1, hidden), np.float16), dev)
    times: dict[str, float] = {}
    group = 32
    layout = Int4Layout(group, tiles=reads_tiles(target, group, "float16"))
    for name, (k, n) in {
        "layer.qkv": (hidden, qkv),
        "layer.o": (hidden, hidden),
        "layer.gate_up": (hidden, 2 * inter),
        "layer.down": (inter, hidden),
        "lm_head_int4": (hidden, vocab),
    }.items():
        f = _int4_gemv(k, n, layout, target)["decode"]
        xk = x if k == hidden else tvm.runtime.tensor(np.zeros((1, 1, k), np.float16), dev)
        stored = layout.shapes(k, n)
        dtypes = ("int32", "int32", "float16")
        shapes = [(stored[p], d) for p, d in zip(PART_NAMES, dtypes, strict=True)]
        nbytes = sum(int(np.prod(shape)) * np.dtype(d).itemsize for shape, d in shapes)
        copies = [
            [tvm.runtime.tensor(np.zeros(shape, d), dev) for shape, d in shapes]
            for _ in range(max(1, cold_bytes // nbytes))
        ]
        times[name] = min(
            sample(lambda i, f=f, xk=xk, w=copies: f(xk, *w[i % len(w)]), 0.3) for _ in range(3)
        )
    f = build(hidden, vocab, "float16", target, True, nk=True, noalias_fix=True)["decode"]
    w = tvm.runtime.tensor(np.zeros((vocab, hidden), np.float16), dev)  # > the caches itself
    times["lm_head"] = min(sample(lambda i: f(x, w), 0.3) for _ in range(3))
    times["layer"] = sum(v for key, v in times.items() if key.startswith("layer."))
    return times


def read_bandwidth(threads: int, nbytes: int = 512 * 2**20) -> Callable[[], float]:
    """A function returning the bytes/s of one plain read of ``nbytes`` (int32 vectors,
    xor-ed into 4 registers a core) with ``threads`` cores, built with TVM for this CPU and
    run by TVM's thread pool as the GEMVs are: what a decode step can stream at most."""
    import tvm
    from tvm.script import tirx as T
    from tvm.target.codegen import llvm_get_system_cpu

    n = nbytes // 4
    per = n // threads

    @T.prim_func
    def read(a: T.Buffer((n,), "int32"), out: T.Buffer((threads, 16), "int32")):
        T.func_attr({"global_symbol": "read", "tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((64,), "int32", scope="local")
            for u in T.unroll(4):
                acc[T.ramp(u * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
            for i in range(per // 64):
                for u in T.unroll(4):
                    acc[T.ramp(u * 16, 1, 16)] = (
                        acc[T.ramp(u * 16, 1, 16)] ^ a[T.ramp(t * per + i * 64 + u * 16, 1, 16)]
                    )
            # the result is stored, so the reads cannot be left out
            out[t, T.ramp(0, 1, 16)] = (
                acc[T.ramp(0, 1, 16)]
                ^ acc[T.ramp(16, 1, 16)]
                ^ acc[T.ramp(32, 1, 16)]
                ^ acc[T.ramp(48, 1, 16)]
            )

    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": threads}
    )
    f = tvm.compile(read, target=target)
    data = tvm.runtime.tensor(np.ones(n, "int32"))
    out = tvm.runtime.tensor(np.zeros((threads, 16), "int32"))
    f(data, out)  # warm-up: the pool starts, the pages are touched

    def one_read() -> float:
        start = time.perf_counter()
        f(data, out)
        return nbytes / (time.perf_counter() - start)

    return one_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of prefill + decode, each engine in turn; the best round counts",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="also time one layer's 4-bit GEMVs and the fp16 and 4-bit lm_head GEMVs on their own",
    )
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    have_llama_cpp = False
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlc-edge-int4-"))
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(1000, 100000, args.prompt)]
    # a round's timer; weight bytes; bytes a decode step reads
    engines: dict[str, tuple[Any, int, int]] = {}
    try:
        print(
            f"building a random Llama-3.2-1B-shaped checkpoint ({args.layers} layers) ...",
            file=sys.stderr,
        )
        weights = make_checkpoint(work / "hf", args.layers)
        for scheme in ("q4f16t", "q4f16t-hf", "q0f16t"):
            bundle = work / scheme
            print(f"compiling mlc-edge {scheme} ...", file=sys.stderr)
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
                stdout=subprocess.DEVNULL,
            )
            records = tensor_cache_records(bundle)
            assert records is not None
            own_head = any(name.startswith("lm_head") for name, _ in records)
            engines[f"mlc-edge {scheme}"] = (
                mlc_edge_timer(bundle, prompt, args.decode),
                sum(n for _, n in records),
                sum(n for name, n in records if not (own_head and "embed_tokens" in name)),
            )
            shutil.rmtree(bundle)
        have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
        if not have_llama_cpp:
            print(
                "llama.cpp: missing (pip install llama-cpp-python to compare); timed mlc-edge only",
                file=sys.stderr,
            )
        else:
            print("writing the Q4_0 GGUF ...", file=sys.stderr)
            nbytes = write_gguf_q4_0(work / "model-q4_0.gguf", weights, args.layers)
            del weights
            llama_cpp_batched = llama_cpp_batches_work(
                work / "model-q4_0.gguf", prompt, args.threads
            )
            if not llama_cpp_batched:
                print(
                    "llama.cpp: its batched prompt evaluation crashed in this build; the "
                    "prompt goes in a token at a time and only its decode is timed",
                    file=sys.stderr,
                )
            engines["llama.cpp Q4_0"] = (
                llama_cpp_timer(
                    work / "model-q4_0.gguf",
                    prompt,
                    args.decode,
                    args.threads,
                    batched=llama_cpp_batched,
                ),
                nbytes,
                nbytes,  # its output layer is the tied Q4_0 table
            )
        one_read = read_bandwidth(args.threads)
        # Rounds in turn, so that a slow spell of the machine hits every engine alike.
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        reads: list[float] = []  # the plain read's bytes/s, a round's best of 3
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds} ...", file=sys.stderr)
            reads.append(max(one_read() for _ in range(3)))
            for name, (timer, _, _) in engines.items():
                rounds[name].append(timer())
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    bandwidth = max(reads)
    llama_cpp_build = llama_cpp_system_info() if have_llama_cpp else None
    cpu = cpu_name()
    print(
        f"\n{cpu}; {args.layers} of 16 layers, {args.threads} threads, prompt "
        f"{args.prompt}, decode {args.decode}, best of {args.rounds} rounds; a plain read with "
        f"{args.threads} threads: {bandwidth / 1e9:.2f} GB/s (rounds: "
        f"{min(reads) / 1e9:.1f} to {bandwidth / 1e9:.1f})"
    )
    if llama_cpp_build:
        print(f"llama.cpp built with: {llama_cpp_build}")
    print(
        f"{'engine':<20}{'weights MiB':>12}{'read/token MiB':>15}{'prefill tok/s':>15}"
        f"{'decode tok/s':>14}{'ceiling tok/s':>15}{'of ceiling':>12}"
    )
    results = {}
    for name, (_, nbytes, read) in engines.items():
        timed = [p for p, _ in rounds[name] if p is not None]
        prefill = max(timed) if timed else None
        decode = max(d for _, d in rounds[name])
        ceiling = bandwidth / read
        shown = f"{prefill:>15.2f}" if prefill is not None else f"{'not timed':>15}"
        print(
            f"{name:<20}{nbytes / 2**20:>12.1f}{read / 2**20:>15.1f}{shown}"
            f"{decode:>14.2f}{ceiling:>15.2f}{decode / ceiling:>11.0%}"
        )
        results[name] = {
            "weight_bytes": nbytes,
            "decode_read_bytes": read,
            "prefill_tok_s": round(prefill, 3) if prefill is not None else None,
            "decode_tok_s": round(decode, 3),
            "decode_share_of_bandwidth_ceiling": round(decode / ceiling, 4),
            "decode_tok_s_rounds": [round(d, 3) for _, d in rounds[name]],
        }
    ratios = None
    if have_llama_cpp:
        # Per round, the engines ran back to back: the ratio is less exposed to the
        # machine's slow spells than the best rounds are.
        ratios = sorted(
            ours[1] / theirs[1]  # decode tok/s
            for ours, theirs in zip(
                rounds["mlc-edge q4f16t"], rounds["llama.cpp Q4_0"], strict=True
            )
        )
        print(
            f"q4f16t / llama.cpp Q4_0 decode, per round: median {statistics.median(ratios):.2f}"
            f" (from {ratios[0]:.2f} to {ratios[-1]:.2f})"
        )
    split = None
    if args.split:
        print("timing the decode GEMVs on their own ...", file=sys.stderr)
        split = decode_split(args.threads)
        layers_s = args.layers * split["layer"]
        for scheme, head in (("q4f16t", "lm_head_int4"), ("q4f16t-hf", "lm_head")):
            total = layers_s + split[head]
            kind = "4-bit" if head == "lm_head_int4" else "fp16"
            print(
                f"decode GEMVs alone ({scheme}): {args.layers} layers x "
                f"{split['layer'] * 1e3:.2f} ms = {layers_s * 1e3:.1f} ms ({layers_s / total:.0%}),"
                f" {kind} lm_head {split[head] * 1e3:.1f} ms ({split[head] / total:.0%})"
            )
        print(
            "per layer: "
            + ", ".join(
                f"{key[6:]} {v * 1e3:.2f} ms"
                for key, v in split.items()
                if key.startswith("layer.")
            )
        )
    print(
        json.dumps(
            {
                "benchmark": "int4_cpu",
                "layers": args.layers,
                "threads": args.threads,
                "prompt_tokens": args.prompt,
                "decode_tokens": args.decode,
                "rounds": args.rounds,
                "read_bandwidth_bytes_s": round(bandwidth),
                "read_bandwidth_bytes_s_rounds": [round(b) for b in reads],
                "cpu": cpu,
                "llama_cpp": have_llama_cpp,
                "llama_cpp_build": llama_cpp_build,
                "results": results,
                "q4f16t_over_llama_cpp_decode_sorted": (
                    [round(r, 3) for r in ratios] if ratios else None
                ),
                "decode_split_s": (
                    {key: round(v, 6) for key, v in split.items()} if split else None
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
