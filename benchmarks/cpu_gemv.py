"""Time the CPU linear layers: our schedule rules vs unscheduled TVM vs numpy.

Shapes (``x @ W`` with ``W: [K, N]``, the model's KN layout): decode GEMV
``[1, 1, 2048] x [2048, 8192]`` and ``[1, 1, 8192] x [8192, 2048]``, and a 16-row prefill
chunk (symbolic ``seq_len``, as the model compiles it) on the same weights; fp32 and fp16.

The machine may be shared, so the implementations are timed in interleaved rounds (each
round waits for the CPUs to be idle) and each keeps its best round. GB/s counts the weight
bytes only, what a GEMV has to stream. numpy runs fp32 (its fp16 matmul has no BLAS path and
is ~100x slower), so the fp16 rows compare our fp16 kernels with the fp32 baseline.

Usage::

    python benchmarks/cpu_gemv.py [--threads 2] [--rounds 10] [--cold] [--skip-stock]

By default each weight is reused call after call, like numpy's usual benchmark, and can stay
in a large L3. ``--cold`` cycles through enough copies of each weight to exceed the caches, so
the weights come from DRAM as they do for a whole model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

SHAPES = [(2048, 8192), (8192, 2048)]
PREFILL_ROWS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per timing sample")
    ap.add_argument("--cold", action="store_true", help="rotate weights larger than the caches")
    ap.add_argument("--cold-mb", type=int, default=768, help="bytes of weight copies, --cold")
    ap.add_argument("--skip-stock", action="store_true", help="skip unscheduled TVM (slow)")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument(
        "--layouts",
        default="KN,NK",
        help="KN: W stored [K, N] (MatmulKN); NK: W stored [N, K] as nn.Linear (MatmulNK)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="pause before each sample: OpenBLAS and TVM pool threads spin after a call\n"
        "and would take the cores from the next implementation",
    )
    ap.add_argument(
        "--noalias-fix",
        action="store_true",
        help="mark the VM shape functions tirx.noalias before codegen: TVM 0.27 compiles every\n"
        "kernel of a module without noalias when one PrimFunc lacks it (the shape function\n"
        "here), which costs the prefill kernel ~1.8x (see schedules/cpu/__init__.py)",
    )
    ap.add_argument(
        "--no-wait-idle",
        action="store_true",
        help="do not wait for other processes to leave the CPUs before each round",
    )
    return ap.parse_args(argv)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def wait_idle(max_wait: float = 10.0, window: float = 0.2, idle: float = 0.9) -> None:
    """On a shared machine, wait (bounded) until the CPUs are mostly idle."""
    if not os.path.exists("/proc/stat"):
        return
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        i0, t0 = _cpu_times()
        time.sleep(window)
        i1, t1 = _cpu_times()
        if t1 > t0 and (i1 - i0) / (t1 - t0) >= idle:
            return


def sample(fn: Callable[[int], Any], min_time: float) -> float:
    """Seconds per call over one batch of calls lasting at least min_time (after a warm-up)."""
    fn(0)
    reps, start = 0, time.perf_counter()
    while True:
        fn(reps)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / reps


def build(
    k: int,
    n: int,
    dtype: str,
    target: Any,
    schedule: bool,
    nk: bool = False,
    noalias_fix: bool = False,
) -> Any:
    """A relax VM with ``decode`` ([1, 1, K]) and ``prefill`` ([1, seq_len, K]) x W[K, N]
    (or x W[N, K]^T with ``nk``, fused by FuseTransposeMatmul as in the model build)."""
    import tvm
    from mlc_edge.schedules.cpu import cpu_rules
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec
    from tvm.s_tir import dlight as dl

    from mlc_edge.compiler.build import fuse_into_tir

    class Linear(nn.Module):
        def __init__(self) -> None:
            self.w = nn.Parameter((n, k) if nk else (k, n), dtype)

        def decode(self, x: nn.Tensor) -> nn.Tensor:
            return op.matmul(x, op.permute_dims(self.w) if nk else self.w)

        def prefill(self, x: nn.Tensor) -> nn.Tensor:
            return self.decode(x)

    plain = {"param_mode": "plain"}
    mod, _ = Linear().export_tvm(
        spec={
            "decode": {"x": spec.Tensor([1, 1, k], dtype), "$": plain},
            "prefill": {"x": spec.Tensor([1, "seq_len", k], dtype), "$": plain},
        }
    )
    mod = fuse_into_tir()(mod)
    if schedule:
        with target:
            mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    pipeline = relax.get_pipeline("default_build")
    if noalias_fix:
        from mlc_edge.compiler.passes import MarkShapeFuncsNoAlias

        pipeline = tvm.transform.Sequential([pipeline, MarkShapeFuncsNoAlias()])
    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    return relax.VirtualMachine(ex, tvm.cpu())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import tvm
    from tvm.target.codegen import llvm_get_system_cpu

    cpu = llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": args.threads})
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    print(
        f"threads={args.threads} cpu={cpu} "
        f"weights={'cold (rotating copies)' if args.cold else 'hot (reused)'}",
        flush=True,
    )
    print(
        f"{'case':8s} {'MxKxN':>15s} {'weights':8s} {'layout':6s} {'impl':11s} "
        f"{'ms':>9s} {'GB/s':>8s}"
    )

    def copies(nbytes: int) -> int:
        return max(1, (args.cold_mb << 20) // nbytes) if args.cold else 1

    for k, n in SHAPES:
        w32 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        np_ws = [w32] + [w32.copy() for _ in range(copies(w32.nbytes) - 1)]
        for dtype, layout in itertools.product(args.dtypes.split(","), args.layouts.split(",")):
            nk = layout == "NK"
            wd = w32.astype(dtype)
            if nk:
                wd = np.ascontiguousarray(wd.T)
            tvm_ws = [tvm.runtime.tensor(wd, dev) for _ in range(copies(wd.nbytes))]
            vms = {"ours": build(k, n, dtype, target, True, nk, args.noalias_fix)}
            if not args.skip_stock:
                vms["stock"] = build(k, n, dtype, target, schedule=False, nk=nk)
            for case, rows in (("decode", 1), ("prefill", PREFILL_ROWS)):
                xd = rng.standard_normal((1, rows, k)).astype(dtype)
                x_tvm = tvm.runtime.tensor(xd, dev)
                x32 = xd.astype(np.float32)
                ref = x32[0] @ w32
                fns: dict[str, Callable[[int], Any]] = {}
                errs: dict[str, float] = {"numpy_fp32": 0.0}
                for name, vm in vms.items():
                    f = vm[case]
                    out = f(x_tvm, tvm_ws[0]).numpy()[0].astype(np.float32)
                    errs[name] = float(np.abs(out - ref).max() / np.abs(ref).max())
                    if name == "ours":  # (stock fp16 accumulates in fp16: a few % off)
                        tol = 1e-4 if dtype == "float32" else 2e-3
                        assert errs[name] < tol, (name, case, dtype, layout, errs[name])
                    fns[name] = lambda i, f=f, x=x_tvm, ws=tvm_ws: f(x, ws[i % len(ws)])
                fns["numpy_fp32"] = lambda i, x=x32, ws=np_ws: np.matmul(x, ws[i % len(ws)])
                best = {name: float("inf") for name in fns}
                for r in range(args.rounds):
                    if not args.no_wait_idle:
                        wait_idle()
                    for name, fn in fns.items():
                        if name == "stock" and r > 0:
                            continue  # scalar single-thread code: one sample says enough
                        time.sleep(args.settle)
                        best[name] = min(best[name], sample(fn, args.min_time))
                for name, sec in best.items():
                    w_dtype = "float32" if name == "numpy_fp32" else dtype
                    wbytes = k * n * np.dtype(w_dtype).itemsize
                    row = {
                        "case": case,
                        "rows": rows,
                        "K": k,
                        "N": n,
                        "dtype": w_dtype,
                        "layout": "KN" if name == "numpy_fp32" else layout,
                        "impl": name,
                        "ms": round(sec * 1e3, 4),
                        "weight_GBps": round(wbytes / sec / 1e9, 2),
                        "speedup_vs_numpy_fp32": round(best["numpy_fp32"] / sec, 3),
                        "max_rel_err": float(f"{errs[name]:.3g}"),
                    }
                    results.append(row)
                    print(
                        f"{case:8s} {f'{rows}x{k}x{n}':>15s} {w_dtype:8s} {row['layout']:6s} "
                        f"{name:11s} "
                        f"{row['ms']:9.3f} {row['weight_GBps']:8.2f}  "
                        f"(x{row['speedup_vs_numpy_fp32']:.2f} vs numpy fp32)",
                        flush=True,
                    )
    return {
        "benchmark": "cpu_gemv",
        "threads": args.threads,
        "cpu": cpu,
        "weights": "cold" if args.cold else "hot",
        "noalias_fix": args.noalias_fix,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Thread counts must be set before numpy / TVM start their pools (imports are lazy).
    for var in ("TVM_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
