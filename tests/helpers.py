"""Compile tiny checkpoints and compare them against transformers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mlc_edge.cli import main
from mlc_edge.runtime import Engine

PROMPT_LEN = 37  # > 2 prefill chunks of 16, so prefill is chunked and ends mid-chunk
DECODE_STEPS = 12


def opencl_missing() -> str | None:
    """Why this machine cannot run OpenCL kernels, or None when it can (PoCL in CI).

    CI installs PoCL and sets MLC_EDGE_REQUIRE_OPENCL=1: there a missing device is an
    error, so the OpenCL tests cannot be skipped quietly.
    """
    try:
        import pyopencl as cl

        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
        reason = None if devices else "no OpenCL device"
    except Exception as e:  # noqa: BLE001 - no pyopencl, no ICD loader, no platform
        reason = f"no OpenCL: {e}"
    if reason and os.environ.get("MLC_EDGE_REQUIRE_OPENCL") == "1":
        raise RuntimeError(f"MLC_EDGE_REQUIRE_OPENCL=1 but {reason}")
    return reason


def compile_bundle(model_dir: Path, out: Path, *flags: str) -> Path:
    try:
        main(["compile", str(model_dir), "-o", str(out), "--json", *flags])
    except SystemExit as e:  # main exits only on errors
        raise AssertionError(f"compile failed with exit code {e.code}") from e
    return out


def prompt_ids(vocab_size: int, seed: int = 0) -> list[int]:
    rng = np.random.RandomState(seed)
    return [int(i) for i in rng.randint(2, vocab_size, size=PROMPT_LEN)]


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def greedy_compare(engine: Engine, model, ids: list[int], steps: int = DECODE_STEPS):
    """Greedy-decode with both; returns (ours, theirs, max logit error per step)."""
    ours_tokens, theirs_tokens, errors = [], [], []
    engine.reset()
    ours = engine.prefill(ids)
    seq = list(ids)
    for step in range(steps + 1):
        theirs = reference_logits(model, seq)
        errors.append(float(np.abs(ours - theirs).max()))
        ours_tokens.append(int(np.argmax(ours)))
        theirs_tokens.append(int(np.argmax(theirs)))
        # Follow transformers' token so one early divergence does not cascade.
        seq.append(theirs_tokens[-1])
        if step < steps:
            ours = engine.decode(theirs_tokens[-1])
    return ours_tokens, theirs_tokens, errors


def assert_matches_fp32(engine: Engine, model, ids: list[int]) -> None:
    """The exact mode's check: over greedy decoding from ``ids`` (``greedy_compare``), every
    step's logits within 1e-4 of transformers' and the same tokens."""
    ours, theirs, errors = greedy_compare(engine, model, ids)
    assert max(errors) < 1e-4, errors
    assert ours == theirs


def top2_margins(model, ids: list[int], tokens: list[int]) -> list[float]:
    """The reference's gap between its best and second-best logit at each greedy step."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
    top2 = torch.topk(logits, 2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def expected_probabilities(logits: np.ndarray, temperature: float, active: int) -> np.ndarray:
    """numpy's ``softmax_with_temperature`` of one row: one-hot (ties share) when greedy."""
    x = logits.astype("float64")[:active]
    if temperature <= 1e-5:
        w = (x == x.max()).astype("float64")
    else:
        w = np.exp(x / temperature - (x / temperature).max())
    out = np.zeros(len(logits))
    out[:active] = w / w.sum()
    return out


# Greedy at 0, 1e-6 and the 1e-5 boundary; sampling at 0.7 and 1. Row 0 ties at 3.0.
TEMPERATURES = (0.0, 1e-6, 1e-5, 0.7, 1.0)


def softmax_cases(vocab: int, active: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[5, 1, vocab]`` (ties in rows 0 and 2; past ``active``, the largest values)
    and one temperature per row."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(len(TEMPERATURES), 1, vocab)).astype("float32")
    logits[0, 0, [3, 200]] = 7.0  # two maxima share the mass
    logits[2, 0, [5, 6, 7]] = 9.0  # three at the boundary temperature
    logits[:, 0, active:] = 50.0  # beyond the active vocabulary: ignored, probability 0
    return logits, np.array(TEMPERATURES, "float32")


def check_softmax(probs: np.ndarray, logits: np.ndarray, active: int) -> None:
    assert probs.shape == logits.shape and np.isfinite(probs).all()
    for row, t in enumerate(TEMPERATURES):
        expected = expected_probabilities(logits[row, 0], float(t), active)
        np.testing.assert_allclose(probs[row, 0], expected, rtol=1e-5, atol=1e-7)
    assert probs[0, 0, 3] == probs[0, 0, 200] == 0.5
    assert probs[1, 0].max() == 1.0 and probs[2, 0, 5] == np.float32(1 / 3)


def library_functions(library) -> set[str]:
    """The functions a VM library exports (what ``vm[name]`` finds): an executable, or the
    path of an exported ``.so``."""
    import re

    import tvm
    from tvm import relax

    if not isinstance(library, relax.VMExecutable):
        library = relax.VMExecutable(tvm.runtime.load_module(str(library)))
    return set(re.findall(r"^@([^\s:]+):$", library.as_text(), re.M))


def one_error_line(stderr: str, *words: str) -> str:
    """The one line a refused command wrote: it must be the only line, start with
    ``error: `` and hold each of ``words``. TVM's own ``Warning`` log lines do not count."""
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_verify_json(capsys, *args: str) -> tuple[int, dict]:
    """``mlc-edge verify ARGS --json`` in this process: its exit code and its JSON report."""
    import json

    try:
        main(["verify", *args, "--json"])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


def rows_of_tiles(tiles: np.ndarray) -> np.ndarray:
    """A ``qweight`` stored in CPU tiles ``[K/g, W/8, g * 8]`` back in rows ``[K, W]``,
    tile by tile (written apart from ``mlc_edge.quantization.int4.untile_qweight``): tile
    ``[t, u]`` holds words ``8u .. 8u + 7`` of rows ``t g .. t g + g - 1``, row after row."""
    groups, strips, span = tiles.shape
    size = span // 8
    rows = np.empty((groups * size, strips * 8), dtype=tiles.dtype)
    for t in range(groups):
        for u in range(strips):
            rows[t * size : (t + 1) * size, 8 * u : 8 * u + 8] = tiles[t, u].reshape(size, 8)
    return rows


def load_cache_rows(bundle: Path) -> dict[str, np.ndarray]:
    """A bundle's tensors (``load_tensor_cache``), every 4-bit ``qweight`` in rows: a CPU
    build on an AVX2 machine without VNNI stores them in tiles."""
    from mlc_edge.convert.tensor_cache import load_tensor_cache

    cache = load_tensor_cache(bundle)
    return {
        name: rows_of_tiles(a) if ".qweight" in name and a.ndim == 3 else a
        for name, a in cache.items()
    }
