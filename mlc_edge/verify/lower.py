"""Scheduled PrimFuncs → OpenCL kernels and the launches their host code makes.

A library for a phone holds no IR, and launch sizes are not stored anywhere: the host
code computes them. So the PrimFuncs are lowered again, through the same TIR pipeline
``relax.build`` uses (``s_tir``), and the host function of each is read instead of run:
it holds, in order,

- ``Bind`` statements (``cse_v2 = (seq_len + 15) // 16``),
- ``AllocBuffer`` of global workspaces the kernels share (a padded copy of an input),
- one ``T.call_ffi_kernel("<kernel>", <buffers>, <scalars>, <one extent per launch tag>,
  launch_params=[...])`` per kernel.

``KernelCall.launch`` evaluates those expressions for given symbolic sizes; OpenCL's
global size is blockIdx extent × threadIdx extent per dimension, the local size the
threadIdx extent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tvm
import tvm_ffi
from tvm import IRModule, ir, tirx
from tvm.target import Target
from tvm.tirx.build import split_host_device_mods

from .expr import evaluate

_DIMS = {"x": 0, "y": 1, "z": 2}


@dataclass
class Workspace:
    """A global buffer the host code allocates for its kernels."""

    name: str
    dtype: str
    extent: tirx.PrimExpr  # elements


@dataclass
class KernelCall:
    """One kernel launch of a function's host code."""

    kernel: str
    buffers: list[str]  # parameter or workspace names, in the kernel's argument order
    scalars: list[tirx.PrimExpr]
    launch_tags: list[str]  # "blockIdx.x", "threadIdx.y", ...
    launch_extents: list[tirx.PrimExpr]

    def launch(self, env: Mapping[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(global size, local size) in work-items, for the host's values ``env``."""
        blocks = [1, 1, 1]
        threads = [1, 1, 1]
        used = 0
        for tag, extent in zip(self.launch_tags, self.launch_extents, strict=True):
            kind, _, axis = tag.partition(".")
            if kind not in ("blockIdx", "threadIdx") or axis not in _DIMS:
                raise NotImplementedError(f"launch parameter {tag} is not supported")
            dim = _DIMS[axis]
            used = max(used, dim + 1)
            value = int(evaluate(extent, env))
            if kind == "blockIdx":
                blocks[dim] = value
            else:
                threads[dim] = value
        n = max(used, 1)
        return (
            tuple(b * t for b, t in zip(blocks[:n], threads[:n], strict=True)),
            tuple(threads[:n]),
        )

    def scalar_values(self, env: Mapping[str, int]) -> list[int | float]:
        return [evaluate(s, env) for s in self.scalars]


@dataclass
class LoweredFunction:
    """A scheduled PrimFunc as the device runs it: its kernels, in launch order."""

    name: str
    func: tirx.PrimFunc  # the scheduled PrimFunc (its parameters name the buffers)
    calls: list[KernelCall]
    workspaces: dict[str, Workspace]
    lets: list[tuple[str, tirx.PrimExpr]]  # the host's Bind statements, in order
    sources: dict[str, str] = field(default_factory=dict)  # kernel -> its OpenCL program

    def host_env(self, sizes: Mapping[str, int | float]) -> dict[str, Any]:
        """``sizes`` (symbolic sizes and scalar arguments by name) plus the host's own
        values; buffers have no byte offset (``*_elem_offset`` is 0)."""
        env: dict[str, Any] = dict(sizes)
        for name, value in self.lets:
            if name in env:
                continue  # read from a shape or an argument on the device: given
            try:
                env[name] = evaluate(value, env)
            except KeyError:
                continue  # type indices, handles, shape pointers: not needed
        return env


def _buffer_name(arg: ir.Expr) -> str | None:
    if isinstance(arg, ir.Call) and arg.op.name == "tirx.buffer_data":
        return str(arg.args[0].name)
    return None


def _read_host(name: str, func: tirx.PrimFunc, host: tirx.PrimFunc) -> LoweredFunction:
    calls: list[KernelCall] = []
    workspaces: dict[str, Workspace] = {}
    lets: list[tuple[str, tirx.PrimExpr]] = []

    def on_node(node: object) -> None:
        if isinstance(node, tirx.Bind):
            lets.append((str(node.var.name), node.value))
        elif isinstance(node, tirx.AllocBuffer):
            buf = node.buffer
            extent = tvm.tirx.const(1, "int64")
            for dim in buf.shape:
                extent = extent * dim
            workspaces[str(buf.name)] = Workspace(str(buf.name), str(buf.dtype), extent)
        elif isinstance(node, ir.Call) and node.op.name == "tirx.call_ffi_kernel":
            tags = [str(t) for t in node.attrs.launch_params]
            if any(not re.fullmatch(r"(blockIdx|threadIdx)\.[xyz]", t) for t in tags):
                # e.g. dynamic shared memory: not something this runner passes
                raise NotImplementedError(f"launch parameters {tags} are not supported")
            args = list(node.args[1:])
            n_launch = len(tags)
            kernel_args, extents = args[: len(args) - n_launch], args[len(args) - n_launch :]
            buffers = [b for b in (_buffer_name(a) for a in kernel_args) if b is not None]
            scalars = [a for a in kernel_args if _buffer_name(a) is None]
            calls.append(KernelCall(str(node.args[0].value), buffers, scalars, tags, extents))

    tvm_ffi.structural_walk(
        host.body, [((tirx.Bind, tirx.AllocBuffer, ir.Call), on_node)], order="pre"
    )
    return LoweredFunction(name, func, calls, workspaces, lets)


def split_programs(source: str) -> dict[str, str]:
    """TVM's OpenCL source, one program per kernel, each starting ``// Function: <name>``."""
    return {
        m.group(1): m.group(0)
        for m in re.finditer(r"// Function: (\S+)\n.*?(?=// Function: |\Z)", source, re.S)
    }


def kernel_definition(program: str, kernel: str) -> str:
    """The kernel's own definition (body included) out of its program, which also
    declares every other kernel of the library."""
    m = re.search(rf"__kernel void {re.escape(kernel)}\([^;{{]*\)\s*{{", program)
    if m is None:
        raise ValueError(f"no definition of {kernel} in its program")
    return program[m.start() :].rstrip()


def lower_for_device(
    funcs: Mapping[str, tirx.PrimFunc], target: Target
) -> dict[str, LoweredFunction]:
    """Lower scheduled PrimFuncs as ``relax.build`` does (``BindTarget`` then the
    ``s_tir`` TIR pipeline), generate the OpenCL source and read each host function."""
    mod = IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    mod = tirx.transform.BindTarget(target)(mod)
    pipeline, _finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir")
    lowered = pipeline(mod)
    host_mod, device_mods = split_host_device_mods(lowered)
    programs: dict[str, str] = {}
    for device_target, device_mod in device_mods.items():
        if len(device_mod.functions) == 0:
            continue
        build = tvm.get_global_func(f"target.build.{device_target.kind.name}")
        runtime_mod = build(finalize_device()(device_mod), device_target)
        programs.update(split_programs(runtime_mod.inspect_source()))
    result: dict[str, LoweredFunction] = {}
    for gv, host in host_mod.functions_items():
        name = str(host.attrs.get("global_symbol", gv.name_hint))
        name = name.removeprefix("__tvm_ffi_")
        if name not in funcs:
            continue
        lowered_func = _read_host(name, funcs[name], host)
        lowered_func.sources = {c.kernel: programs[c.kernel] for c in lowered_func.calls}
        result[name] = lowered_func
    return result
