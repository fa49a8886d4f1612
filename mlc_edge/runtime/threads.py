"""How many threads TVM's CPU thread pool runs: one per physical core this process may use.

TVM reads ``TVM_NUM_THREADS`` once, when its pool starts. Unset, TVM takes half the logical
CPUs on x86, on the guess that each core runs two hardware threads. Where cores have one
(many cloud VMs; this project's 2-core test machine), that is half the cores: a 2-core
machine decoded on one (a 16-layer 4-bit Llama-3.2-1B: 22 instead of 39 tok/s). Counting
the cores themselves is what llama.cpp's ``-t`` default does too. A value the user set is
kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

SYSFS_CPUS = Path("/sys/devices/system/cpu")


def physical_cores(cpus: Iterable[int] | None = None, sysfs: Path = SYSFS_CPUS) -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on), from
    each CPU's ``topology`` (package and core id); each CPU counts as a core where the
    topology cannot be read."""
    if cpus is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cpus = sorted(affinity(0)) if affinity else range(os.cpu_count() or 1)
    cpus = list(cpus)
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def default_thread_count() -> None:
    """``TVM_NUM_THREADS`` = ``physical_cores()`` unless set; call before TVM's pool starts
    (before the first kernel runs)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
