"""Sizes and inputs to run a kernel with: random floats, valid indices.

Symbolic sizes take small realistic values (a prefill chunk of 1, 7 or 16 tokens, batch
1, the model's vocabulary); a function whose sizes include ``seq_len`` is checked once per
value, as the runtime calls it with each. Float buffers get random values in [-1, 1].
Integer buffers are indices: each gets values valid for what it indexes, by its name
(token ids below the vocabulary, distinct KV-cache slots, ...); an integer input or a
scalar argument not listed here makes the function "not checked", with that reason.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import tirx

from ..compiler.contract import PAGE_SIZE
from .expr import evaluate


class NotChecked(Exception):
    """The function cannot be run with valid inputs; the message says why."""


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[Any, ...] | None  # None for a scalar argument
    dtype: str

    @property
    def is_buffer(self) -> bool:
        return self.shape is not None


def params_of(func: tirx.PrimFunc) -> list[Param]:
    result = []
    for p in func.params:
        if isinstance(p.ty, tirx.BufferType):
            result.append(Param(str(p.name), tuple(p.shape), str(p.dtype)))
        else:
            result.append(Param(str(p.name), None, str(p.ty.dtype)))
    return result


def size_vars(params: list[Param]) -> list[str]:
    """The symbolic sizes the buffer shapes use, in order of appearance."""
    names: list[str] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, tirx.Var):
            if str(expr.name) not in names:
                names.append(str(expr.name))
            return
        for attr in ("a", "b", "value"):
            child = getattr(expr, attr, None)
            if child is not None and not isinstance(child, int | float | str):
                visit(child)

    for p in params:
        for dim in p.shape or ():
            visit(dim)
    return names


@dataclass(frozen=True)
class Sizes:
    """The values symbolic sizes take. ``seq_lens``: prefill chunk lengths (1 is a
    prompt's last chunk of one token, decode-like; 16 the phone presets' full chunk)."""

    vocab_size: int
    seq_lens: tuple[int, ...] = (1, 7, 16)
    batch_size: int = 1
    num_token: int = 3  # entries of a logit processor's per-token arrays
    num_pages: int = 4  # KV-cache pages (of 16 tokens) for the cache kernels
    page_size: int = PAGE_SIZE
    context_window_size: int = 512
    extra: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def choices(self, var: str) -> tuple[int, ...] | None:
        if var in self.extra:
            return self.extra[var]
        table: dict[str, tuple[int, ...]] = {
            "seq_len": self.seq_lens,
            "ntoken": self.seq_lens,  # the KV cache's append: one chunk's tokens
            "seqlen": self.seq_lens,
            "batch_size": (self.batch_size,),
            "num_seq": (self.batch_size,),
            "vocab_size": (self.vocab_size,),
            "num_token": (self.num_token,),
            "num_pages": (self.num_pages,),
            "page_size": (self.page_size,),
        }
        return table.get(var)

    def cases(self, params: list[Param]) -> Iterator[dict[str, int]]:
        """Every combination of the values of the function's symbolic sizes."""
        names = size_vars(params)
        values = []
        for name in names:
            choice = self.choices(name)
            if choice is None:
                raise NotChecked(f"no test values for the size '{name}'")
            values.append(choice)
        for combo in itertools.product(*values):
            yield dict(zip(names, combo, strict=True))


def shape_of(param: Param, env: dict[str, Any]) -> tuple[int, ...]:
    assert param.shape is not None
    return tuple(int(evaluate(d, env)) for d in param.shape)


def _table_rows(params: list[Param], env: dict[str, Any]) -> list[int]:
    """Rows of each embedding table a lookup reads: the 2-D float inputs (the output,
    last, left out). One table for ``take``; the pieces of a split table for
    ``split_take``."""
    return [
        shape_of(p, env)[0]
        for p in params[:-1]
        if p.is_buffer and "float" in p.dtype and len(p.shape or ()) == 2
    ]


def _token_ids(
    rows: list[int], shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator
) -> np.ndarray:
    """Random ids over all pieces, the first ones on each side of every piece boundary
    (where an off-by-one in choosing the piece shows)."""
    ids = rng.integers(0, sum(rows), shape).astype(dtype)
    edges = [e for stop in np.cumsum(rows)[:-1] for e in (stop - 1, stop)]
    flat = ids.reshape(-1)
    flat[: len(edges)] = edges[: flat.size]
    return ids


def _pages(params: list[Param], env: dict[str, Any]) -> tuple[int, int] | None:
    """(number of pages, tokens per page) of the function's KV-cache ``pages`` buffer."""
    for p in params:
        if p.name == "pages" and p.is_buffer:
            shape = shape_of(p, env)
            return shape[0], shape[-2]  # [pages, (2, heads,) page_size, head_dim]
    return None


def _int_buffer(
    p: Param,
    shape: tuple[int, ...],
    params: list[Param],
    env: dict[str, Any],
    sizes: Sizes,
    rng: np.random.Generator,
) -> np.ndarray:
    n = math.prod(shape)
    dtype = np.dtype(p.dtype)
    if p.name == "input_ids":
        return _token_ids(_table_rows(params, env) or [sizes.vocab_size], shape, dtype, rng)
    if p.name == "logit_positions":  # which of the chunk's tokens give logits
        return rng.integers(0, env.get("seq_len", 1), shape).astype(dtype)
    if p.name == "position_map":
        pages = _pages(params, env)
        if pages is None:  # RoPE: the tokens' positions in the sequence
            return rng.integers(0, sizes.context_window_size, shape).astype(dtype)
        slots = pages[0] * pages[1]
        if n > slots:
            raise NotChecked(f"{n} tokens do not fit {slots} KV-cache slots")
        return rng.permutation(slots)[:n].reshape(shape).astype(dtype)  # distinct slots
    if p.name == "seq_ids":  # rows of the logits, distinct
        return rng.permutation(env.get("batch_size", 1))[:n].reshape(shape).astype(dtype)
    if p.name == "pos2seq_id":  # each entry's sequence (row): distinct entries below
        return rng.integers(0, env.get("num_seq", env.get("batch_size", 1)), shape).astype(dtype)
    if p.name == "token_ids":  # distinct tokens: no two entries update one logit
        vocab = env.get("vocab_size", sizes.vocab_size)
        return rng.choice(vocab, size=n, replace=False).reshape(shape).astype(dtype)
    if p.name == "token_cnt":
        return rng.integers(1, 5, shape).astype(dtype)
    if p.name == "bitmask":
        return rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, dtype=dtype)
    if re.search(r"_q(weight|zeros)\d*$", p.name):  # 4-bit words: every int32 is 8 values
        return rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, dtype=dtype)
    raise NotChecked(f"integer input '{p.name}' has no known valid values")


_SCALARS = {"apply_rope": 1, "layer_id": 0}


ALIGN = 64  # TVM takes numpy memory without a copy (DLPack) only when 64-byte aligned


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def random_floats(shape: tuple[int, ...], dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Uniform in [-1, 1], 64-byte aligned, made in float32 and in place: a real
    vocabulary's output layer is hundreds of millions of values."""
    values = aligned_empty(shape, np.float32)
    rng.random(out=values, dtype=np.float32)
    values *= 2
    values -= 1
    if np.dtype(dtype) == np.float32:
        return values
    out = aligned_empty(shape, dtype)
    out[...] = values
    return out


# Large inputs repeat a random block of a prime number of values: much faster to make
# than fresh random numbers, and an index off by anything but a multiple of the prime
# (far more than any row or tile) still reads other values.
_PERIOD = 1_048_573


def repeated_random_floats(
    shape: tuple[int, ...], dtype: Any, rng: np.random.Generator
) -> np.ndarray:
    n = math.prod(shape)
    block = random_floats((min(n, _PERIOD),), dtype, rng)
    out = aligned_empty(shape, dtype)
    flat = out.reshape(-1)
    for start in range(0, n, _PERIOD):
        stop = min(start + _PERIOD, n)
        flat[start:stop] = block[: stop - start]
    return out


class ArrayPool:
    """Large random inputs made once and shared by every function and run of a checker
    (the output layer's weight is an input of several functions). A function's buffers
    of one shape get distinct arrays; users never write into them (the runners copy the
    buffers a kernel writes). At most ``max_bytes`` are kept, the oldest dropped first."""

    MIN_ELEMENTS = 1 << 22

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self.arrays: dict[tuple[int, str, int], np.ndarray] = {}

    def floats(
        self, shape: tuple[int, ...], dtype: Any, slot: int, rng: np.random.Generator
    ) -> np.ndarray:
        if math.prod(shape) < self.MIN_ELEMENTS:
            return random_floats(shape, dtype, rng)
        # By size, not shape: an untied model's embedding table and output layer are
        # the same numbers transposed, and first touching gigabytes of fresh memory is
        # slow (seconds per GB on a VM).
        n = math.prod(shape)
        key = (n, np.dtype(dtype).str, slot)
        if key not in self.arrays:
            array = repeated_random_floats((n,), dtype, np.random.default_rng(slot + 1))
            while self.arrays and (
                sum(a.nbytes for a in self.arrays.values()) + array.nbytes > self.max_bytes
            ):
                self.arrays.pop(next(iter(self.arrays)))
            self.arrays[key] = array
        return self.arrays[key].reshape(shape)


def make_inputs(
    params: list[Param],
    env: dict[str, int],
    sizes: Sizes,
    rng: np.random.Generator,
    host_dtype: Any,
    pool: ArrayPool | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(buffers by name, scalar arguments by name) for one case.

    ``host_dtype(dtype)`` gives the numpy type the device uses (float32 for float16 when
    kernels run as float). Output buffers get random values too, the same on both sides:
    an element a kernel fails to write keeps a value the reference overwrote.
    """
    scalars: dict[str, Any] = {}
    for p in params:
        if not p.is_buffer:
            if p.name not in _SCALARS:
                raise NotChecked(f"scalar argument '{p.name}' has no known valid value")
            scalars[p.name] = _SCALARS[p.name]
    full_env = {**env, **scalars}
    arrays: dict[str, np.ndarray] = {}
    slots: dict[tuple[tuple[int, ...], str], int] = {}
    for p in params:
        if not p.is_buffer:
            continue
        shape = shape_of(p, full_env)
        dtype = np.dtype(host_dtype(p.dtype))
        if dtype.kind == "f":
            slot = slots.setdefault((shape, dtype.str), 0)
            slots[(shape, dtype.str)] += 1
            arrays[p.name] = (
                pool.floats(shape, dtype, slot, rng)
                if pool is not None
                else random_floats(shape, dtype, rng)
            )
        elif dtype.kind in "iu":
            arrays[p.name] = _int_buffer(p, shape, params, full_env, sizes, rng)
        else:
            raise NotChecked(f"buffer '{p.name}' of type {p.dtype}")
    return arrays, scalars


@dataclass
class Prepared:
    """One run's inputs."""

    case: dict[str, int]  # the sizes the report shows
    arrays: dict[str, np.ndarray]  # every buffer, by parameter name
    scalars: dict[str, Any]  # scalar arguments, by name
    env: dict[str, Any]  # every value the shapes and the host code use, by name


class Recipe:
    """How to run a function: its cases and valid inputs. This one, for any function:
    the symbolic sizes from ``Sizes``, indices by buffer name (see ``make_inputs``)."""

    def cases(self, params: list[Param], sizes: Sizes) -> list[dict[str, int]]:
        return list(sizes.cases(params))

    def prepare(
        self,
        params: list[Param],
        case: dict[str, int],
        sizes: Sizes,
        rng: np.random.Generator,
        host_dtype: Any,
        pool: ArrayPool | None = None,
    ) -> Prepared:
        arrays, scalars = make_inputs(params, case, sizes, rng, host_dtype, pool)
        return Prepared(dict(case), arrays, scalars, {**case, **scalars})
