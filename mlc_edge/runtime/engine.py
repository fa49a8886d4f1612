"""Load a bundle and generate: read ``_metadata``, load weights by name, create the paged
KV cache, embed, prefill in chunks, decode, turn logits into probabilities with the
library's ``softmax_with_temperature``, sample on the CPU.

This follows MLC-LLM's engine so a bundle that works here is laid out the way the
phone's runtime expects: the same functions, names and argument conventions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine  # not tvm.relax: works with a runtime-only TVM

from ..bundle import layout
from ..bundle.integrity import check_weights
from ..compiler.contract import PAGE_SIZE
from ..conversation import render
from ..errors import UserError
from .sampler import Sampler
from .threads import default_thread_count


def open_device(bundle: Path, library: layout.Library, device: str | None) -> Any:
    """The TVM device to run ``library`` on; UserError when this machine cannot."""
    built_for = library.device
    if device is not None and device != built_for:
        raise UserError(
            f"{bundle} was compiled for {built_for}, not {device}: compile it with "
            f"--target {device} (or leave out --device)"
        )
    if built_for == "cuda":
        from .cuda import cuda_problem

        problem = cuda_problem()
        if problem:
            raise UserError(f"{bundle} was compiled for CUDA and cannot run here: {problem}")
    elif built_for != "cpu":
        raise UserError(
            f"{bundle} was compiled for {built_for}, which cannot run here; "
            "compile it with --target cpu"
        )
    return tvm.device(built_for)


@dataclass
class GenerationResult:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes from prefill; the rest are decode steps.
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """What ``run --json`` prints: the fields, with speeds instead of seconds."""
        data = asdict(self)
        del data["prefill_seconds"], data["decode_seconds"]
        data["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 3)
        data["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        return data


class Engine:
    """One sequence at a time, on the CPU or a CUDA GPU (the device the library was
    compiled for; ``device`` only checks it)."""

    def __init__(self, bundle: str | Path, device: str | None = None):
        default_thread_count()  # before any kernel starts TVM's thread pool
        self.bundle = Path(bundle)
        self.chat_config = layout.read_chat_config(self.bundle)
        library = layout.runnable_library(self.bundle)
        self.library = library.path
        self.library_target = library.target
        self.device = open_device(self.bundle, library, device)
        try:
            executable = tvm.runtime.load_module(str(self.library))
        except RuntimeError as e:  # a CUDA library without its build record
            if "load_from_bytes.cuda" not in str(e):
                raise
            record = layout.build_record_path(self.library).name
            raise UserError(
                f"{self.library} holds CUDA kernels but has no build record "
                f"({record}); compile it again"
            ) from None
        self.vm = VirtualMachine(executable, self.device)
        self.metadata = json.loads(str(self.vm["_metadata"]()))
        self.params = self._load_params()
        self.context_window_size = int(self.metadata["context_window_size"])
        self.prefill_chunk_size = int(self.metadata["prefill_chunk_size"])
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self.kv_cache = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([1]),
            ShapeTuple([self.context_window_size]),
            ShapeTuple([self.prefill_chunk_size]),
            ShapeTuple([PAGE_SIZE]),
            ShapeTuple([0]),
        )
        self._tokenizer = None
        tvm.get_global_func("vm.builtin.kv_state_add_sequence")(self.kv_cache, 0)
        self._seq_len = 0

    # -- loading -------------------------------------------------------------------------
    def _load_params(self) -> Any:
        """Weights by name, in ``_metadata.params`` order, with TVM's own cache reader."""
        load = tvm.get_global_func("vm.builtin.tensor_cache.load")
        by_name = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")
        clear = tvm.get_global_func("vm.builtin.tensor_cache.clear")
        # Sizes only (one stat per shard): a short shard is one line here, not TVM's
        # C++ traceback. `mlc-edge verify` also checks the md5 sums.
        check_weights(self.bundle, md5=False)
        load(str(self.bundle), self.device.dlpack_device_type(), self.device.index)
        try:
            return by_name([p["name"] for p in self.metadata["params"]])
        finally:
            clear()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.bundle / layout.TOKENIZER))
        return self._tokenizer

    # -- the forward passes ----------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: the KV cache starts empty."""
        tvm.get_global_func("vm.builtin.kv_state_remove_sequence")(self.kv_cache, 0)
        tvm.get_global_func("vm.builtin.kv_state_add_sequence")(self.kv_cache, 0)
        self._seq_len = 0

    def _forward(self, func: str, token_ids: list[int]) -> np.ndarray:
        if self._seq_len + len(token_ids) > self.context_window_size:
            raise UserError(
                f"context window full: {self._seq_len} + {len(token_ids)} tokens exceed "
                f"{self.context_window_size}; compile with a larger --context-window-size"
            )
        ids = tvm.runtime.tensor(np.array(token_ids, dtype="int32"), self.device)
        embeds = self.vm["embed"](ids, self.params)
        embeds = embeds._create_view((1, len(token_ids), embeds.shape[-1]))
        self._begin(self.kv_cache, ShapeTuple([0]), ShapeTuple([len(token_ids)]))
        logits, _ = self.vm[func](embeds, self.kv_cache, self.params)
        self._end(self.kv_cache)
        self._seq_len += len(token_ids)
        return logits.numpy().reshape(-1)

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        """Feed tokens in chunks of ``prefill_chunk_size``; the last token's logits."""
        if not token_ids:
            raise UserError("the prompt is empty")
        logits = None
        for start in range(0, len(token_ids), self.prefill_chunk_size):
            logits = self._forward("prefill", token_ids[start : start + self.prefill_chunk_size])
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward("decode", [token_id])

    def probabilities(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        """The library's ``softmax_with_temperature`` of one token's logits, called as
        MLC's engine calls it: the temperature as given, 0 for greedy."""
        logits = tvm.runtime.tensor(logits.astype("float32").reshape(1, 1, -1), self.device)
        temp = tvm.runtime.tensor(np.array([max(temperature, 0.0)], "float32"), self.device)
        return self.vm["softmax_with_temperature"](logits, temp).numpy().reshape(-1)

    # -- generation -----------------------------------------------------------------------
    def stop_token_ids(self) -> set[int]:
        eos = self.chat_config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids |= set(self.chat_config.get("conv_template", {}).get("stop_token_ids", []))
        return {int(i) for i in ids if i is not None and int(i) >= 0}

    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampler: Sampler,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate from ``prompt_ids``; ``on_token`` sees each new token as it comes.
        Each token is drawn by ``sampler`` from the library's probabilities at the
        sampler's temperature.

        Stops at a stop token, at ``max_tokens`` or when the context window is full
        (``finish_reason`` says which)."""
        if len(prompt_ids) >= self.context_window_size:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the context window holds "
                f"{self.context_window_size}; shorten it or compile with a larger "
                "--context-window-size"
            )
        self.reset()
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        stops = self.stop_token_ids()
        start = time.perf_counter()
        logits = self.prefill(prompt_ids)
        result.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        while True:
            token = sampler(self.probabilities(logits, sampler.temperature))
            result.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                result.finish_reason = "stop"
                break
            if len(result.token_ids) >= max_tokens:
                result.finish_reason = "length"
                break
            if self._seq_len >= self.context_window_size:
                result.finish_reason = "context window full"
                break
            logits = self.decode(token)
        result.decode_seconds = time.perf_counter() - start
        return result

    def prompt_ids(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of ``prompt``, wrapped in the conversation template unless ``chat=False``."""
        template = self.chat_config.get("conv_template")
        if not chat or not template:
            return self.tokenizer.encode(prompt, add_special_tokens=True).ids
        text = render(template, [("user", prompt), ("assistant", None)])
        prefix = list(template.get("system_prefix_token_ids", []))
        return prefix + self.tokenizer.encode(text, add_special_tokens=False).ids
