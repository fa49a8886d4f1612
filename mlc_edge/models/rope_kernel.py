"""Our replacement for the paged KV cache's split-rotary kernel (``fused_rope``).

The cache calls it once per attention layer, before appending K/V: it splits the fused
``qkv [seq_len, q_heads + 2 * kv_heads, head_dim]`` into ``q``, ``k`` and ``v``, applying
rotate-half RoPE to the first ``rotary_dim`` values of every q and k head (when
``apply_rope > 0``) and copying the rest::

    x'[j]          = x[j] cos(p f_j) - x[j + r/2] sin(p f_j)     j < r/2, r = rotary_dim
    x'[j + r/2]    = x[j + r/2] cos(p f_j) + x[j] sin(p f_j)
    f_j            = theta ^ -(2j / r)    (llama3 rope_scaling: smoothed, see below)

with ``p = position_map[token]``. TVM's kernel (``llama_rope_with_position_map`` in
``relax/frontend/nn/llm/position_embedding.py``) is one unscheduled element a loop
iteration; the stock fallback schedule makes it one work-item per output value, each
reading the 4-byte position and both values of its pair: 3.2x the bytes it needs (2-byte
values), ``mlc-edge verify --traffic``. Ours is one work-item per *pair vector*: ``vec``
values at ``j`` and the ``vec`` at ``j + r/2`` (vector loads), the position read once,
only by work-items that rotate; the values past ``rotary_dim`` (partial rotary, Phi-2)
and v heads are copied by the same work-items, ``vec`` at a time. cos/sin are computed
in fp32 from the same expressions as TVM's, so the two agree to fp32 rounding.

On the CPU (``split_rotary_cpu``) TVM's kernel computes ``pow``, ``cos`` and ``sin`` for
every value: 3 x 40 x 64 calls a token for Llama-3.2-1B, 26-33 us a layer, 2% of a 4-bit
decode step here. Ours computes each of a token's ``rotary_dim / 2`` angles once, then
rotates every head from that table in vectors (1.2 us). Same expressions, same fp32
operations: it matches TVM's kernel bit for bit (``tests/test_rope_kernel.py``), and
``mlc-edge verify`` keeps TVM's kernel as the reference of the GPU one.

Supported: plain RoPE and ``rope_type: llama3`` (what ``hf_config.read_rope`` accepts),
``rope_scale`` 1 (what ``decoder.py`` passes), any even ``rotary_dim <= head_dim``.
Anything else raises at compile time rather than computing something else.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import relax as rx
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from ..errors import UserError

FUSED_ROPE = "fused_rope"  # the global symbol of TVM's kernel, and of ours
ROPE_THREADS = 256  # work-items of a work-group
_SCALING_KEYS = {
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def _vector_size(rotary_dim: int, head_dim: int) -> int:
    """Values a work-item moves per load: 8 halves (16 bytes) where both the half-rotary
    width and the unrotated tail allow, else the largest that divides both."""
    parts = [rotary_dim // 2] + ([head_dim - rotary_dim] if head_dim > rotary_dim else [])
    return next(v for v in (8, 4, 2, 1) if all(p % v == 0 for p in parts))


def _check_supported(head_dim: int, rotary_dim: int, rope_scaling: dict[str, Any]) -> str:
    """The rope type ("default" or "llama3"), or a UserError for what we do not compute."""
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise UserError(
            f"the RoPE kernel needs an even rotary_dim in (0, head_dim="
            f"{head_dim}]; got {rotary_dim}"
        )
    rope_type = rope_scaling.get("rope_type", "default")
    if rope_type == "default":
        if rope_scaling:
            raise UserError(
                f"rope_scaling {rope_scaling} has no rope_type: the RoPE "
                "kernel supports plain RoPE ({}) and rope_type llama3"
            )
        return rope_type
    missing = _SCALING_KEYS.get(rope_type, set()) - set(rope_scaling)
    if rope_type not in _SCALING_KEYS or missing:
        raise UserError(
            f"the RoPE kernel does not support rope_scaling {rope_scaling} (supported: "
            "plain RoPE, and rope_type llama3 with "
            f"{', '.join(sorted(_SCALING_KEYS['llama3']))})"
        )
    return rope_type


def _frequency(rope_type: str, rope_scaling: dict[str, Any], theta: float, rotary_dim: int) -> Any:
    """``j, position (float32) -> angle`` (float32), the expressions of TVM's
    ``rope_freq_default`` / ``rope_freq_llama3`` (same order of operations)."""

    def exponent(j):  # 2j / r
        return T.Cast("float32", j * 2) / T.float32(rotary_dim)

    if rope_type == "default":
        return lambda j, pos: pos / T.pow(T.float32(theta), exponent(j))

    factor = float(rope_scaling["factor"])
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    original = float(rope_scaling["original_max_position_embeddings"])
    inv_diff = 1.0 / (high - low)
    alpha = original / (2 * math.pi) * inv_diff
    beta = low * inv_diff

    def llama3(j, pos):
        orig = T.float32(1) / T.pow(T.float32(theta), exponent(j))
        smooth = T.max(T.float32(0), T.min(T.float32(1), T.float32(alpha) * orig - T.float32(beta)))
        return pos * ((T.float32(1) - smooth) * orig * T.float32(1.0 / factor) + smooth * orig)

    return llama3


def _angle(
    theta: float, head_dim: int, rope_scaling: dict[str, Any], rotary_dim: int, scale: float
) -> Any:
    """``_frequency`` for what the kernels support; a UserError for anything else."""
    if scale != 1.0:
        raise UserError(f"the RoPE kernel supports rope_scale 1 only; got {scale}")
    rope_type = _check_supported(head_dim, rotary_dim, rope_scaling)
    return _frequency(rope_type, rope_scaling, theta, rotary_dim)


def _with_rope_signature(
    body: Any, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str
) -> tirx.PrimFunc:
    """A split-rotary kernel with TVM's ``fused_rope`` signature, ``(qkv, position_map, q,
    k, v, apply_rope)``, around ``body``, a ``T.macro`` taking ``(seq_len, qkv,
    position_map, q, k, v, apply_rope)``."""

    @T.prim_func(s_tir=True)
    def fused_rope(
        var_qkv: T.handle,
        var_position_map: T.handle,
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, num_q_heads + 2 * num_kv_heads, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(
            var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset
        )
        body(seq_len, qkv, position_map, q, k, v, apply_rope)

    return fused_rope.with_attr("global_symbol", FUSED_ROPE)


def split_rotary(
    theta: float,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    dtype: str,
    rope_scaling: dict[str, Any],
    rotary_dim: int,
    scale: float = 1.0,
) -> tirx.PrimFunc:
    """The split-rotary kernel for a GPU, same signature as TVM's ``fused_rope``:
    ``(qkv, position_map, q, k, v, apply_rope)``."""
    angle = _angle(theta, head_dim, rope_scaling, rotary_dim, scale)
    fused_heads = num_q_heads + 2 * num_kv_heads
    rotated_heads = num_q_heads + num_kv_heads  # q and k; v is copied
    vec = _vector_size(rotary_dim, head_dim)
    half = rotary_dim // 2
    pairs = half // vec  # work-items of a head that hold a (j, j + r/2) pair vector
    per_head = pairs + (head_dim - rotary_dim) // vec  # ... plus the unrotated tail
    per_token = fused_heads * per_head

    @T.macro
    def body(seq_len, qkv, position_map, q, k, v, apply_rope):
        for bx in T.thread_binding(
            T.ceildiv(seq_len * per_token, ROPE_THREADS), thread="blockIdx.x"
        ):
            for tx in T.thread_binding(ROPE_THREADS, thread="threadIdx.x"):
                with T.sblock("split_rotary"):
                    lo = T.sblock_alloc_buffer((vec,), dtype, scope="local")
                    hi = T.sblock_alloc_buffer((vec,), dtype, scope="local")
                    pos = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    i: T.let[T.int32] = bx * ROPE_THREADS + tx
                    if i < seq_len * per_token:
                        s: T.let[T.int32] = i // per_token
                        h: T.let[T.int32] = i % per_token // per_head
                        t: T.let[T.int32] = i % per_head
                        # a pair vector: lo = [j, j + vec), hi = lo + r/2; a tail
                        # work-item: lo only, at r + (t - pairs) * vec
                        first: T.let[T.int32] = T.Select(
                            t < pairs, t * vec, rotary_dim + (t - pairs) * vec
                        )
                        for e in T.vectorized(vec):
                            lo[e] = qkv[s, h, first + e]
                        if t < pairs:
                            for e in T.vectorized(vec):
                                hi[e] = qkv[s, h, first + half + e]
                            if h < rotated_heads and apply_rope > T.int64(0):
                                pos[0] = T.Cast("float32", position_map[s])
                                for e in T.serial(vec):
                                    a: T.let[T.float32] = angle(first + e, pos[0])
                                    x0: T.let[T.float32] = T.Cast("float32", lo[e])
                                    x1: T.let[T.float32] = T.Cast("float32", hi[e])
                                    cos_a: T.let[T.float32] = T.cos(a)
                                    sin_a: T.let[T.float32] = T.sin(a)
                                    lo[e] = T.Cast(dtype, cos_a * x0 - sin_a * x1)
                                    hi[e] = T.Cast(dtype, cos_a * x1 + sin_a * x0)
                        if h < num_q_heads:
                            for e in T.vectorized(vec):
                                q[s, h, first + e] = lo[e]
                            if t < pairs:
                                for e in T.vectorized(vec):
                                    q[s, h, first + half + e] = hi[e]
                        elif h < rotated_heads:
                            for e in T.vectorized(vec):
                                k[s, h - num_q_heads, first + e] = lo[e]
                            if t < pairs:
                                for e in T.vectorized(vec):
                                    k[s, h - num_q_heads, first + half + e] = hi[e]
                        else:
                            for e in T.vectorized(vec):
                                v[s, h - rotated_heads, first + e] = lo[e]
                            if t < pairs:
                                for e in T.vectorized(vec):
                                    v[s, h - rotated_heads, first + half + e] = hi[e]

    return _with_rope_signature(body, num_q_heads, num_kv_heads, head_dim, dtype)


def split_rotary_cpu(
    theta: float,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    dtype: str,
    rope_scaling: dict[str, Any],
    rotary_dim: int,
    scale: float = 1.0,
) -> tirx.PrimFunc:
    """The split-rotary kernel for the CPU, same signature as TVM's ``fused_rope``: a
    token's angles once into a table, then each head rotated from it (module docstring).
    Tokens one after the other: a decode step has one, and a prefill chunk's 16 take less
    time than TVM's kernel takes for one."""
    angle = _angle(theta, head_dim, rope_scaling, rotary_dim, scale)
    half = rotary_dim // 2
    tail = head_dim - rotary_dim  # partial rotary (Phi-2): copied

    @T.macro
    def rotate(dst, dst_head, qkv, s, h, cos_t, sin_t, apply_rope):
        # TVM's expressions: x cos + (-x[j + r/2]) sin, and x[j + r/2] cos + x sin
        if apply_rope > T.int64(0):
            for j in T.vectorized(half):
                dst[s, dst_head, j] = T.Cast(
                    dtype,
                    cos_t[j] * T.Cast("float32", qkv[s, h, j])
                    + sin_t[j] * (T.Cast("float32", qkv[s, h, j + half]) * T.float32(-1)),
                )
                dst[s, dst_head, j + half] = T.Cast(
                    dtype,
                    cos_t[j] * T.Cast("float32", qkv[s, h, j + half])
                    + sin_t[j] * T.Cast("float32", qkv[s, h, j]),
                )
        else:
            for d in T.vectorized(rotary_dim):
                dst[s, dst_head, d] = qkv[s, h, d]
        if tail > 0:
            for d in T.vectorized(tail):
                dst[s, dst_head, rotary_dim + d] = qkv[s, h, rotary_dim + d]

    @T.macro
    def body(seq_len, qkv, position_map, q, k, v, apply_rope):
        for s in T.serial(seq_len):
            with T.sblock("split_rotary"):
                T.reads()
                T.writes()
                cos_t = T.sblock_alloc_buffer((half,), "float32", scope="local")
                sin_t = T.sblock_alloc_buffer((half,), "float32", scope="local")
                if apply_rope > T.int64(0):
                    for j in T.serial(half):
                        a: T.let[T.float32] = angle(j, T.Cast("float32", position_map[s]))
                        cos_t[j] = T.cos(a)
                        sin_t[j] = T.sin(a)
                for h in T.serial(num_q_heads):
                    rotate(q, h, qkv, s, h, cos_t, sin_t, apply_rope)
                for h in T.serial(num_kv_heads):
                    rotate(k, h, qkv, s, num_q_heads + h, cos_t, sin_t, apply_rope)
                    for d in T.vectorized(head_dim):
                        v[s, h, d] = qkv[s, num_q_heads + num_kv_heads + h, d]

    return _with_rope_signature(body, num_q_heads, num_kv_heads, head_dim, dtype)


def replace_split_rotary(
    bb: rx.BlockBuilder,
    theta: float,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    dtype: str,
    rope_scaling: dict[str, Any],
    rotary_dim: int,
    target: Target,
) -> bool:
    """Swap TVM's split-rotary kernel in the module ``bb`` is building for ours (the
    CPU's on an ``llvm`` target). Returns whether it replaced one."""
    cpu = target.kind.name == "llvm"
    # Added as "tir_split_rotary", exported under its global symbol "fused_rope".
    found = [
        gv
        for gv, f in bb.get().functions_items()
        if isinstance(f, tirx.PrimFunc)
        and f.attrs is not None
        and f.attrs.get("global_symbol") == FUSED_ROPE
    ]
    if found:
        ours = (split_rotary_cpu if cpu else split_rotary)(
            theta, head_dim, num_q_heads, num_kv_heads, dtype, rope_scaling, rotary_dim
        )
        for gv in found:
            bb.update_func(gv, ours)
    return bool(found)
