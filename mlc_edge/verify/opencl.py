"""Run TVM's OpenCL kernels on this machine's OpenCL device with pyopencl.

PoCL (the CPU) or an NVIDIA GPU's OpenCL run the kernels written for Adreno; neither has
``cl_khr_fp16``, so fp16 kernels run with ``half`` rewritten to ``float`` (``as_float``):
that checks indexing, launch sizes and fusion, not fp16 rounding.

The device: ``devices.select_device`` (by implementation or name: ``intel``, ``pocl``,
``oclgrind``; default the best present, e.g. Intel's CPU runtime with real fp16). An
NVIDIA driver without an ICD file is found through ``OCL_ICD_VENDORS``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .devices import pyopencl, select_device
from .expr import evaluate
from .lower import KernelCall, LoweredFunction

# A launch as the host code computes it, and a hook to change it (tests break launches
# on purpose to show that the checker catches it).
Launch = tuple[tuple[int, ...], tuple[int, ...]]
LaunchHook = Callable[[str, Launch], Launch]

_FP16_PRAGMA = re.compile(r"#ifdef cl_khr_fp16\n.*?#endif\n", re.S)
_SCALAR_TYPES = {
    "char": np.int8,
    "uchar": np.uint8,
    "short": np.int16,
    "ushort": np.uint16,
    "int": np.int32,
    "uint": np.uint32,
    "long": np.int64,
    "ulong": np.uint64,
    "float": np.float32,
    "double": np.float64,
    "half": np.float16,
    "bool": np.int8,
}


def half_as_float(program: str) -> str:
    """The program with every fp16 type and conversion made fp32, and without the
    ``#error`` that stops a device without ``cl_khr_fp16``."""
    program = _FP16_PRAGMA.sub("", program)
    program = re.sub(r"\bhalf(\d*)\b", r"float\1", program)
    program = re.sub(r"\bconvert_half(\d*)", r"convert_float\1", program)
    program = re.sub(r"\bas_half(\d*)\b", r"as_float\1", program)
    return program


def kernel_signature(program: str, kernel: str) -> list[tuple[str, str, bool]]:
    """(type, name, is_pointer) of each argument of ``kernel`` in ``program``."""
    m = re.search(rf"__kernel void {re.escape(kernel)}\(([^)]*)\)\s*{{", program)
    if m is None:
        raise ValueError(f"no definition of {kernel} in its program")
    args = []
    for arg in m.group(1).split(","):
        words = arg.replace("*", " * ").split()
        is_pointer = "*" in words
        words = [
            w
            for w in words
            if w not in ("__global", "global", "const", "restrict", "*", "volatile")
        ]
        args.append((words[0], words[-1], is_pointer))
    return args


def _cl() -> Any:
    return pyopencl()


@dataclass
class DeviceInfo:
    name: str
    platform: str
    fp16: bool  # cl_khr_fp16
    max_work_group_size: int
    implementation: str = ""  # intel, pocl, oclgrind, ... (devices.py)

    def describe(self) -> str:
        return f"{self.name} ({self.platform})"


class OpenCLRunner:
    """One OpenCL device, the programs built for it, and kernel launches.

    ``fp16="auto"`` runs fp16 kernels natively where the device has ``cl_khr_fp16`` and
    as float otherwise; ``"float"`` always rewrites them. ``device``: an implementation
    or device name, or an index (``devices.select_device``; None: the best present).
    """

    def __init__(
        self, fp16: str = "auto", device_index: int | None = None, device: str | None = None
    ):
        cl = _cl()
        self.cl = cl
        if device is None and device_index is not None:
            device = str(device_index)
        selected = select_device(device)
        self.device = selected.device
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(
            self.context, properties=cl.command_queue_properties.PROFILING_ENABLE
        )
        has_fp16 = "cl_khr_fp16" in self.device.extensions
        if fp16 not in ("auto", "float"):
            raise UserError(f"fp16 mode '{fp16}': choose auto or float")
        self.as_float = fp16 == "float" or not has_fp16
        self.info = DeviceInfo(
            self.device.name.strip(),
            self.device.platform.name.strip(),
            has_fp16,
            int(self.device.max_work_group_size),
            selected.implementation,
        )
        self._programs: dict[tuple[str, str], tuple[Any, list[tuple[str, str, bool]]]] = {}

    def host_dtype(self, dtype: str) -> np.dtype:
        """The numpy type a buffer of TVM type ``dtype`` has on this device."""
        if dtype == "float16" and self.as_float:
            return np.dtype("float32")
        return np.dtype(dtype)

    def program_source(self, func: LoweredFunction, kernel: str) -> str:
        source = func.sources[kernel]
        return half_as_float(source) if self.as_float else source

    def kernel(self, func: LoweredFunction, kernel: str) -> tuple[Any, list[tuple[str, str, bool]]]:
        """The built kernel and its arguments (cached by the program's source)."""
        source = self.program_source(func, kernel)
        key = (kernel, source)
        if key not in self._programs:
            program = self.cl.Program(self.context, source).build()
            self._programs[key] = (
                self.cl.Kernel(program, kernel),
                kernel_signature(source, kernel),
            )
        return self._programs[key]

    # -- launches --------------------------------------------------------------------------
    def upload(
        self, arrays: Mapping[str, np.ndarray], written: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Device buffers of ``arrays``: copies of those in ``written`` (all when None),
        the host memory itself for the others (no copy on PoCL)."""
        mf = self.cl.mem_flags
        buffers = {}
        copied = set(arrays if written is None else written)
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            if array.nbytes == 0:  # OpenCL has no empty buffers
                buffers[name] = self.cl.Buffer(self.context, mf.READ_WRITE, 4)
            else:
                how = mf.COPY_HOST_PTR if name in copied else mf.USE_HOST_PTR
                buffers[name] = self.cl.Buffer(self.context, mf.READ_WRITE | how, hostbuf=array)
        return buffers

    def download(self, buffer: Any, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        if out.nbytes:
            self.cl.enqueue_copy(self.queue, out, buffer)
        return out

    def workspaces(self, func: LoweredFunction, env: Mapping[str, Any]) -> dict[str, Any]:
        mf = self.cl.mem_flags
        result = {}
        for name, ws in func.workspaces.items():
            n = max(int(evaluate(ws.extent, env)) * self.host_dtype(ws.dtype).itemsize, 4)
            result[name] = self.cl.Buffer(self.context, mf.READ_WRITE, n)
            # Poisoned (all bits set: NaN as float, -1 as int), not left as the last run's
            # memory: a kernel that skips part of a workspace the next kernel reads must
            # not pass on values a correct earlier run left there.
            self.cl.enqueue_fill_buffer(self.queue, result[name], np.uint8(0xFF), 0, n)
        return result

    def launches(
        self, func: LoweredFunction, env: Mapping[str, Any], hook: LaunchHook | None = None
    ) -> list[tuple[KernelCall, Launch]]:
        """Each kernel with the (global, local) sizes it is launched with."""
        result = []
        for call in func.calls:
            launch = call.launch(env)
            if hook is not None:
                launch = hook(call.kernel, launch)
            result.append((call, launch))
        return result

    def enqueue(
        self,
        func: LoweredFunction,
        env: Mapping[str, Any],
        buffers: Mapping[str, Any],
        launches: list[tuple[KernelCall, Launch]],
    ) -> list[Any]:
        """Launch the function's kernels in order; returns their events."""
        events = []
        for call, (global_size, local_size) in launches:
            kernel, signature = self.kernel(func, call.kernel)
            scalars = iter(call.scalar_values(env))
            buffer_names = iter(call.buffers)
            args = []
            for ctype, _name, is_pointer in signature:
                if is_pointer:
                    args.append(buffers[next(buffer_names)])
                else:
                    args.append(_SCALAR_TYPES[ctype](next(scalars)))
            kernel.set_args(*args)
            if any(g == 0 for g in global_size):
                continue  # nothing to do: the runtime launches nothing either
            events.append(
                self.cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size)
            )
        return events

    def run(
        self,
        func: LoweredFunction,
        arrays: Mapping[str, np.ndarray],
        env: Mapping[str, Any],
        hook: LaunchHook | None = None,
        written: Iterable[str] | None = None,
    ) -> tuple[dict[str, np.ndarray], list[tuple[KernelCall, Launch]]]:
        """Run the function on ``arrays`` (by parameter name); returns the ``written``
        buffers (all when None) after the launches, and the launches. ``arrays`` are
        not changed."""
        launches = self.launches(func, env, hook)
        names = list(arrays if written is None else [n for n in arrays if n in set(written)])
        buffers = {**self.upload(arrays, names), **self.workspaces(func, env)}
        self.enqueue(func, env, buffers, launches)
        out = {name: self.download(buffers[name], arrays[name]) for name in names}
        self.queue.finish()
        return out, launches

    def time(
        self,
        func: LoweredFunction,
        arrays: Mapping[str, np.ndarray],
        env: Mapping[str, Any],
        repeat: int = 10,
        warmup: int = 2,
        min_seconds: float = 0.0,
        written: Iterable[str] | None = None,
    ) -> float:
        """Median seconds of one call of all the function's kernels (device time from
        profiling events)."""
        launches = self.launches(func, env)
        buffers = {**self.upload(arrays, written), **self.workspaces(func, env)}
        for _ in range(warmup):
            self.enqueue(func, env, buffers, launches)
        self.queue.finish()
        times = []
        start = time.perf_counter()
        while len(times) < repeat or time.perf_counter() - start < min_seconds:
            events = self.enqueue(func, env, buffers, launches)
            self.queue.finish()
            times.append(sum((e.profile.end - e.profile.start) * 1e-9 for e in events))
        return float(np.median(times))
