"""Run prepared OpenCL launches on Oclgrind: the child process of mlc_edge/verify/oclgrind.py.

Run as a script (``python oclgrind_worker.py JOBS``, with the environment the parent sets:
``OCL_ICD_VENDORS`` naming Oclgrind's ICD library and the ``OCLGRIND_*`` switches of one
pass), so that it needs only numpy and pyopencl and its OpenCL loader sees Oclgrind alone:
an OpenCL loader reads its vendors once per process, and Oclgrind reads its switches when
a context is made. ``JOBS`` is a pickle the parent wrote: a list of jobs, each
``{"arrays": {name: ndarray}, "workspaces": {name: bytes}, "launches": [{"kernel",
"source", "args": [("buffer", name) | ("scalar", numpy scalar)], "global", "local"}]}``.
Every buffer is copied in (``COPY_HOST_PTR``): Oclgrind treats host memory it has not
seen written as uninitialised. Prints one JSON line per job: the sizes of Oclgrind's log
and of the traffic log after it (the parent splits the logs by job), and any error.
"""

from __future__ import annotations

import json
import os
import pickle
import sys


def _log_size(variable: str) -> int:
    path = os.environ.get(variable)
    return os.path.getsize(path) if path and os.path.exists(path) else 0


def main(jobs_path: str) -> None:
    import numpy as np
    import pyopencl as cl

    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    devices = [
        d for p in cl.get_platforms() if p.name.strip() == "Oclgrind" for d in p.get_devices()
    ]
    if not devices:
        print(json.dumps({"fatal": "the OpenCL loader found no Oclgrind platform"}), flush=True)
        sys.exit(2)
    context = cl.Context(devices[:1])
    queue = cl.CommandQueue(context)
    mf = cl.mem_flags
    programs: dict[str, object] = {}
    for index, job in enumerate(jobs):
        error = None
        try:
            buffers = {}
            for name, array in job["arrays"].items():
                array = np.ascontiguousarray(array)
                if array.nbytes == 0:
                    buffers[name] = cl.Buffer(context, mf.READ_WRITE, 4)
                else:
                    buffers[name] = cl.Buffer(
                        context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=array
                    )
            for name, nbytes in job["workspaces"].items():
                buffers[name] = cl.Buffer(context, mf.READ_WRITE, nbytes)
                cl.enqueue_fill_buffer(queue, buffers[name], np.uint8(0xFF), 0, nbytes)
            for launch in job["launches"]:
                source = launch["source"]
                if source not in programs:
                    programs[source] = cl.Program(context, source).build()
                kernel = cl.Kernel(programs[source], launch["kernel"])
                kernel.set_args(
                    *[
                        buffers[value] if kind == "buffer" else value
                        for kind, value in launch["args"]
                    ]
                )
                cl.enqueue_nd_range_kernel(queue, kernel, launch["global"], launch["local"])
                queue.finish()
        except Exception as e:  # noqa: BLE001 - reported to the parent, per job
            error = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(
            json.dumps(
                {
                    "job": index,
                    "error": error,
                    "log": _log_size("OCLGRIND_LOG"),
                    "traffic": _log_size("MLC_EDGE_TRAFFIC_LOG"),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
