"""``mlc-edge verify``: a model's kernels recompiled from its config, run and checked.

A bundle's library holds no IR, but its ``mlc-chat-config.json`` holds everything the
compiler was given: the same pipeline rebuilds the same kernels (``scheduled_module``),
and the OpenCL source of each is looked up in the bundle's library to make sure the
kernels checked are the ones the phone runs. Weights are not needed at all, so a
Hugging Face ``config.json`` alone can be verified too.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

from ..bundle import layout
from ..compiler.build import scheduled_module
from ..compiler.targets import TargetSpec, get_target
from ..config import ModelSpec, load_preset
from ..errors import UserError
from ..models.parameters import instantiate
from .check import KernelChecker, VerifyReport, bundle_stale_kernels
from .inputs import Sizes
from .kv_cache import (
    KNOWN_ISSUES,
    NOT_CHECKED,
    cpu_references,
    kv_recipes,
    tvm_rope_reference,
)
from .opencl import OpenCLRunner


@dataclass
class VerifySource:
    """What to verify: the model, and the bundle's library when there is one."""

    spec: ModelSpec
    target_name: str
    path: Path  # what was given: a bundle, a model folder or a config.json
    bundle: Path | None = None
    library: Path | None = None  # lib/<model_lib>.tar
    # The bundle's config changed (fewer layers): the kernels compute the same, but their
    # generated names (matmul11, reshape48_ptr, ...) follow the layer count, so their text
    # cannot be looked up in the library.
    config_changed: bool = False

    @property
    def prefix(self) -> str | None:
        """The system library's symbol prefix (``<model_lib>_``)."""
        return f"{self.library.stem}_" if self.library is not None else None


def load_source(
    path: Path,
    target: str | None = None,
    preset: str | None = None,
    quantization: str = "q0f16t",
    num_hidden_layers: int | None = None,
) -> VerifySource:
    """A bundle (``mlc-chat-config.json``), a Hugging Face folder or a ``config.json``."""
    path = Path(path)
    library = None
    bundle = None
    if layout.is_bundle(path):
        bundle = path
        chat = layout.read_chat_config(path)
        if num_hidden_layers is not None:
            chat["model_config"] = {**chat["model_config"], "num_hidden_layers": num_hidden_layers}
        spec = ModelSpec.from_chat_config(chat)
        # The phone's system library, and the target its build record names.
        libs = layout.libraries(path, layout.SYSTEM_LIBRARY)
        library = libs[0] if libs else None
    else:
        hf = layout.read_config_json(path)
        if num_hidden_layers is not None:
            hf["num_hidden_layers"] = num_hidden_layers
        name = target or "android-opencl"
        sizes = load_preset(preset or get_target(name).default_preset)
        spec = ModelSpec.create(hf, quantization, sizes)
    target_name = target or (library.target if library else "android-opencl")
    target_spec = get_target(target_name)
    if target_spec.codegen != "opencl":
        raise UserError(
            f"verify runs OpenCL kernels; target '{target_name}' is not an "
            "OpenCL target (use --target android-opencl[:adreno-NNN])"
        )
    return VerifySource(
        spec,
        target_name,
        path,
        bundle,
        library.path if library else None,
        config_changed=bundle is not None and num_hidden_layers is not None,
    )


def default_sizes(spec: ModelSpec, seq_lens: tuple[int, ...] = (1, 7, 16)) -> Sizes:
    sizes = spec.runtime_sizes
    chunk = sizes["prefill_chunk_size"]
    lens = tuple(s for s in seq_lens if s <= chunk) or (chunk,)
    return Sizes(
        vocab_size=spec.config.vocab_size,
        seq_lens=lens,
        context_window_size=sizes["context_window_size"],
    )


def model_checker(
    spec: ModelSpec,
    target_spec: TargetSpec,
    sizes: Sizes | None = None,
    runner: OpenCLRunner | None = None,
    rules: list[Any] | None = None,
    only: str | None = None,
) -> KernelChecker:
    """A checker of every kernel of the model compiled for ``target_spec``.

    ``rules`` replaces the target's schedule rules (compare a rule set of one's own);
    ``only`` keeps the functions whose name matches the regular expression.
    """
    unscheduled, scheduled = scheduled_module(spec, target_spec, rules)
    kv = instantiate(spec, target_spec.tvm_target()).kv_cache_shape()
    # The KV cache's CPU kernels, as TVM makes them for an LLVM target: the reference of
    # the pre-scheduled GPU ones; TVM's RoPE kernel made apart (the CPU build holds ours).
    cpu_model = instantiate(spec, tvm.target.Target({"kind": "llvm"}))
    cpu_mod, _, _ = cpu_model.export_tvm(spec=cpu_model.get_default_spec(), allow_extern=True)
    references = {**cpu_references(cpu_mod), **tvm_rope_reference(kv, cpu_model.dtype)}
    return KernelChecker(
        unscheduled,
        scheduled,
        target_spec.tvm_target(),
        sizes or default_sizes(spec),
        runner=runner,
        references=references,
        recipes=kv_recipes(kv.num_attention_heads, kv.head_dim, kv.rope_theta),
        not_checked=NOT_CHECKED,
        known_issues=KNOWN_ISSUES,
        only=only,
    )


def library_device_code(library: Path) -> bytes:
    """The ``devc.o`` of a system library .tar: the kernels' OpenCL source, as text."""
    with tarfile.open(library) as tf:
        names = [n for n in tf.getnames() if n.endswith("devc.o")]
        if not names:
            raise UserError(f"{library} holds no device code (devc.o)")
        member = tf.extractfile(names[0])
        assert member is not None
        return member.read()


def verify(
    source: VerifySource,
    fp16: str = "auto",
    seq_lens: tuple[int, ...] = (1, 7, 16),
    only: str | None = None,
    progress: Any = None,
    strict: bool = False,
    device: str | None = None,
) -> VerifyReport:
    target_spec = get_target(source.target_name)
    runner = OpenCLRunner(fp16=fp16, device=device)
    checker = model_checker(
        source.spec, target_spec, default_sizes(source.spec, seq_lens), runner, only=only
    )
    report = checker.check_all(progress)
    report.strict = strict
    report.target = source.target_name
    report.bundle = str(source.bundle) if source.bundle else None
    report.source = str(source.path)
    if source.library is None:
        report.library_note = (
            "no compiled library: the kernels were compiled from the config for this check"
        )
    elif source.config_changed:
        report.library_note = (
            "not compared with the bundle's library: with "
            "--num-hidden-layers the generated kernel names differ"
        )
    else:
        assert source.prefix is not None
        report.stale_kernels = bundle_stale_kernels(
            checker, library_device_code(source.library), source.prefix
        )
        report.library_note = (
            f"every kernel checked is the one in {source.library.name}"
            if not report.stale_kernels
            else f"{len(report.stale_kernels)} kernels differ from {source.library.name}"
        )
    return report
