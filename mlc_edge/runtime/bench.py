"""``mlc-edge bench``: prompt processing and text generation speed, the way llama.cpp's
``llama-bench`` measures and prints it.

    pp N   the KV cache emptied, N random tokens prefilled in chunks of the bundle's
           ``prefill_chunk_size`` (as the runtime does); N / seconds
    tg N   the KV cache emptied, N decode steps of one random token each (llama-bench
           also generates from an empty context); N / seconds

Each test runs once untimed (warm-up: first calls allocate and load kernels), then
``repetitions`` timed times; t/s is the mean ± sample standard deviation of the
repetitions' tokens/s. Token ids are drawn uniformly from the vocabulary with a fixed seed.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import layout
from ..errors import UserError
from .engine import Engine

# The fields of one result (one test), in the order --json / --csv print them.
FIELDS = (
    "model",
    "model_type",
    "model_lib",
    "quantization",
    "target",
    "backend",
    "device",
    "n_params",
    "size",
    "threads",
    "test",
    "n_prompt",
    "n_gen",
    "prefill_chunk_size",
    "context_window_size",
    "repetitions",
    "avg_ts",
    "stddev_ts",
    "samples_ts",
    "avg_ns",
    "stddev_ns",
    "samples_ns",
    "test_time",
)


@dataclass
class BenchResult:
    model: str  # the bundle's folder name
    model_type: str
    model_lib: str
    quantization: str
    target: str  # the compile target of the library (cpu, cuda, ...)
    backend: str  # CPU or CUDA, as llama-bench's backend column
    device: str  # the CPU or GPU name
    n_params: int
    size: int  # bytes of weights
    threads: int
    test: str  # "pp64" or "tg32"
    n_prompt: int
    n_gen: int
    prefill_chunk_size: int
    context_window_size: int
    repetitions: int
    samples_ns: list[int] = field(default_factory=list)
    test_time: str = ""

    @property
    def tokens(self) -> int:
        return self.n_prompt + self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return float(np.mean(self.samples_ts))

    @property
    def stddev_ts(self) -> float:
        # Sample standard deviation, as llama-bench (0 for a single repetition).
        ts = self.samples_ts
        return float(np.std(ts, ddof=1)) if len(ts) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            avg_ts=round(self.avg_ts, 3),
            stddev_ts=round(self.stddev_ts, 3),
            samples_ts=[round(t, 3) for t in self.samples_ts],
            avg_ns=int(np.mean(self.samples_ns)),
            stddev_ns=int(np.std(self.samples_ns, ddof=1)) if len(self.samples_ns) > 1 else 0,
        )
        return {k: data[k] for k in FIELDS}


def parse_counts(value: str, flag: str) -> list[int]:
    """``"16,64"`` → [16, 64]; 0 entries are dropped (llama-bench's "skip this test")."""
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} '{value}': give token counts like 16,64") from None
    if any(c < 0 for c in counts):
        raise UserError(f"{flag} '{value}': token counts must be 0 (skip) or more")
    return [c for c in counts if c > 0]


def check_counts(
    n_prompt: list[int], n_gen: list[int], repetitions: int, context_window_size: int
) -> None:
    """Refuse what cannot run, before any weights are loaded."""
    if repetitions < 1:
        raise UserError("-r/--repetitions must be at least 1")
    if not n_prompt and not n_gen:
        raise UserError("nothing to run: give -p/--n-prompt or -n/--n-gen a count above 0")
    for flag, counts in (("-p/--n-prompt", n_prompt), ("-n/--n-gen", n_gen)):
        too_long = [c for c in counts if c > context_window_size]
        if too_long:
            raise UserError(
                f"{flag} {too_long[0]} exceeds the bundle's context window of "
                f"{context_window_size} tokens; use at most {context_window_size} or compile "
                "with a larger --context-window-size"
            )


def bundle_context_window(bundle: Path) -> int:
    return int(layout.read_chat_config(bundle)["context_window_size"])


def cpu_name() -> str:
    """This machine's CPU as /proc/cpuinfo names it (else what ``platform`` knows)."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _device_name(engine: Engine) -> str:
    if engine.device.dlpack_device_type() == 1:  # kDLCPU
        return cpu_name()
    return str(engine.device.device_name)


def _time_prompt(engine: Engine, ids: list[int]) -> int:
    engine.reset()
    start = time.perf_counter_ns()
    engine.prefill(ids)  # returns host logits: the device has finished
    return time.perf_counter_ns() - start


def _time_generation(engine: Engine, ids: list[int]) -> int:
    engine.reset()
    start = time.perf_counter_ns()
    for token in ids:
        engine.decode(token)
    return time.perf_counter_ns() - start


def run_bench(
    engine: Engine,
    n_prompt: list[int],
    n_gen: list[int],
    repetitions: int,
    threads: int,
    seed: int = 0,
) -> list[BenchResult]:
    """Run the pp tests then the tg tests; one result each."""
    check_counts(n_prompt, n_gen, repetitions, engine.context_window_size)
    rng = np.random.default_rng(seed)
    vocab = int(engine.metadata["active_vocab_size"])
    n_params, size = layout.weight_totals(engine.bundle)
    target = engine.library_target
    common = dict(
        model=engine.bundle.absolute().name,
        model_type=str(engine.metadata["model_type"]),
        model_lib=engine.library.stem,
        quantization=str(engine.metadata["quantization"]),
        target=target,
        backend="CUDA" if engine.device.dlpack_device_type() == 2 else "CPU",
        device=_device_name(engine),
        n_params=n_params,
        size=size,
        threads=threads,
        prefill_chunk_size=engine.prefill_chunk_size,
        context_window_size=engine.context_window_size,
        repetitions=repetitions,
    )
    tests = [("pp", n, _time_prompt) for n in n_prompt] + [
        ("tg", n, _time_generation) for n in n_gen
    ]
    results = []
    for kind, n, timer in tests:
        result = BenchResult(
            **common,
            test=f"{kind}{n}",
            n_prompt=n if kind == "pp" else 0,
            n_gen=n if kind == "tg" else 0,
            test_time=datetime.datetime.now(datetime.UTC).isoformat(),
        )
        timer(engine, [int(t) for t in rng.integers(0, vocab, n)])  # warm-up
        for _ in range(repetitions):
            result.samples_ns.append(timer(engine, [int(t) for t in rng.integers(0, vocab, n)]))
        results.append(result)
    engine.reset()
    return results


def _human_size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _human_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def markdown(results: list[BenchResult]) -> str:
    """llama-bench's table: model | size | params | backend | threads | test | t/s."""
    header = ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = [
        [
            f"{r.model_type} {r.quantization} ({r.model})",
            _human_size(r.size),
            _human_params(r.n_params),
            r.backend,
            str(r.threads),
            r.test,
            f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
        ]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    numeric = {1, 2, 4, 5, 6}

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "| "
        + " | ".join("-" * (w - 1) + (":" if i in numeric else "-") for i, w in enumerate(widths))
        + " |"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def as_json(results: list[BenchResult]) -> str:
    return json.dumps([r.as_dict() for r in results], indent=2)


def as_csv(results: list[BenchResult]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = r.as_dict()
        # One cell per list, values separated by ';' (llama-bench quotes its lists too).
        row["samples_ts"] = ";".join(str(v) for v in row["samples_ts"])
        row["samples_ns"] = ";".join(str(v) for v in row["samples_ns"])
        writer.writerow(row)
    return out.getvalue()
