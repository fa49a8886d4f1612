"""Our replacements for two of the paged KV cache's GPU kernels.

``tir_kv_cache_transpose_append`` (below, ``transpose_append``) writes the new tokens' K
and V into their page slots. TVM's kernel is unscheduled and gets the stock fallback
schedule, which reads ``position_map[token]`` (is the slot -1?) before its
``token < ntoken`` guard: the last work-group's extra work-items read up to 7 ints past
the buffer whenever the token count is not a multiple of 8 (Oclgrind reports it; the
results are right, the read is invalid all the same). Ours reads the slot only for a
token that exists.

``tir_attention_merge_state``:

The cache calls this kernel in chunked prefill to merge two partial attention results of
every (token, head): values ``V``/``V_other`` ``[N, H, D]`` and their log2-sum-exp
``S``/``S_other`` ``[N, H]``, in place::

    m = max(S, S_other);  w = 2^(S - m);  w_o = 2^(S_other - m)
    V <- (V * w + V_other * w_o) / (w + w_o);  S <- log2(w + w_o) + m

The upstream bug (TVM 0.27, ``_merge_state_inplace`` in
``relax/frontend/nn/llm/_decode_kernels.py``): each head is merged by ``D / 4``
work-items (4 values each), and every one of them reads ``S[n, h]`` from global memory
and then writes the merged value back to it, with no barrier between. Where a
work-group's work-items do not run in lockstep (PoCL runs them one after another; GPUs
only promise lockstep within a wave, if at all) a work-item can read ``S`` after another
has overwritten it: its weights, and so its part of ``V`` and ``S`` itself, come out
wrong. Here one work-item per head reads and writes ``S`` and hands the two weights to
the others through local (shared) memory after a barrier, so no global location is read
by one work-item and written by another.
"""

from __future__ import annotations

from tvm import relax as rx
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from ..compiler.contract import PAGE_SIZE

MERGE_STATE = "tir_attention_merge_state"
TRANSPOSE_APPEND = "tir_kv_cache_transpose_append"
APPEND_THREADS = 256  # work-items of a work-group of the append kernel


def _vector_size(head_dim: int) -> int:
    # 4 values a work-item, as upstream (8-byte fp16 loads); less only where D needs it.
    return next(v for v in (4, 2, 1) if head_dim % v == 0)


def _heads_per_group(num_heads: int, threads_per_head: int, max_threads: int) -> int:
    """The most heads a work-group can take (a divisor of ``num_heads``, so every head
    is covered: upstream's halving skips heads when it stops at a non-divisor)."""
    return max(
        d
        for d in range(1, num_heads + 1)
        if num_heads % d == 0 and d * threads_per_head <= max(max_threads, threads_per_head)
    )


def merge_state_inplace(
    num_heads: int, head_dim: int, v_dtype: str, target: Target
) -> tirx.PrimFunc:
    """The merge kernel for a GPU ``target``, same signature as TVM's."""
    vec = _vector_size(head_dim)
    bdx = head_dim // vec  # work-items of one head
    bdy = _heads_per_group(num_heads, bdx, int(target.attrs["max_num_threads"]))
    gdy = num_heads // bdy

    @T.prim_func(s_tir=True)
    def merge_state(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        N = T.int32()
        H = T.int32()
        D = T.int32()
        V = T.match_buffer(v, (N, H, D), v_dtype)
        S = T.match_buffer(s, (N, H), "float32")
        V_other = T.match_buffer(v_other, (N, H, D), v_dtype)
        S_other = T.match_buffer(s_other, (N, H), "float32")

        for bx in T.thread_binding(N, thread="blockIdx.x"):
            for by in T.thread_binding(gdy, thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("merge"):
                            # (weight of V, weight of V_other) of each head of the group
                            weights = T.sblock_alloc_buffer((bdy, 2), "float32", scope="shared")
                            s_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            e = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            e_other = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            v_vec = T.sblock_alloc_buffer((vec,), v_dtype, scope="local")
                            v_other_vec = T.sblock_alloc_buffer((vec,), v_dtype, scope="local")
                            head: T.let[T.int32] = by * bdy + ty
                            # V is each work-item's own: load it before the barrier.
                            for i in T.vectorized(vec):
                                v_vec[i] = V[bx, head, tx * vec + i]
                            for i in T.vectorized(vec):
                                v_other_vec[i] = V_other[bx, head, tx * vec + i]
                            if tx == 0:
                                s_max[0] = T.max(S[bx, head], S_other[bx, head])
                                e[0] = T.exp2(S[bx, head] - s_max[0])
                                e_other[0] = T.exp2(S_other[bx, head] - s_max[0])
                                weights[ty, 0] = e[0] / (e[0] + e_other[0])
                                weights[ty, 1] = e_other[0] / (e[0] + e_other[0])
                                S[bx, head] = T.log2(e[0] + e_other[0]) + s_max[0]
                            # The weights are read by the head's other work-items.
                            T.tvm_storage_sync("shared")
                            for i in T.serial(vec):
                                v_vec[i] = T.Cast(
                                    v_dtype,
                                    T.Cast("float32", v_vec[i]) * weights[ty, 0]
                                    + T.Cast("float32", v_other_vec[i]) * weights[ty, 1],
                                )
                            for i in T.vectorized(vec):
                                V[bx, head, tx * vec + i] = v_vec[i]

    return merge_state.with_attr("global_symbol", MERGE_STATE)


def transpose_append(
    num_kv_heads: int, head_dim: int, dtype: str, page_size: int = PAGE_SIZE
) -> tirx.PrimFunc:
    """The append kernel for a GPU, same signature as TVM's: one work-item per ``vec``
    values of K (and the same of V; 8 halves = 16-byte loads where ``head_dim``
    allows), the slot read only for a token below ``ntoken``. Each work-item reads its
    token's slot: with 8 values a work-item that is 4 bytes per 32 copied (1.125x the
    bytes a kernel reading each once would load, mlc-edge verify --traffic)."""
    vec = next(v for v in (8, 4, 2, 1) if head_dim % v == 0)
    per_token = num_kv_heads * head_dim // vec  # work-items of one token

    @T.prim_func(s_tir=True)
    def append(
        var_pages: T.handle, var_k_data: T.handle, var_v_data: T.handle, var_position_map: T.handle
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        ntoken = T.int64()
        num_pages = T.int64()
        pages_elem_offset = T.int64()
        position_map_elem_offset = T.int32()
        pages = T.match_buffer(
            var_pages,
            (num_pages, 2, num_kv_heads, page_size, head_dim),
            dtype,
            elem_offset=pages_elem_offset,
        )
        k_data = T.match_buffer(var_k_data, (ntoken, num_kv_heads, head_dim), dtype)
        v_data = T.match_buffer(var_v_data, (ntoken, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(
            var_position_map, (ntoken,), "int32", elem_offset=position_map_elem_offset
        )
        for bx in T.thread_binding(
            (ntoken * per_token + APPEND_THREADS - 1) // APPEND_THREADS, thread="blockIdx.x"
        ):
            for tx in T.thread_binding(APPEND_THREADS, thread="threadIdx.x"):
                with T.sblock("append"):
                    i: T.let[T.int64] = bx * APPEND_THREADS + tx
                    if i < ntoken * per_token:
                        token: T.let[T.int64] = i // per_token
                        h: T.let[T.int64] = i % per_token // (head_dim // vec)
                        f: T.let[T.int64] = i % (head_dim // vec) * vec
                        position: T.let[T.int32] = position_map[token]
                        if position != -1:
                            for v in T.vectorized(vec):
                                pages[position // page_size, 0, h, position % page_size, f + v] = (
                                    k_data[token, h, f + v]
                                )
                            for v in T.vectorized(vec):
                                pages[position // page_size, 1, h, position % page_size, f + v] = (
                                    v_data[token, h, f + v]
                                )

    return append.with_attr("global_symbol", TRANSPOSE_APPEND)


def replace_transpose_append(
    bb: rx.BlockBuilder, num_kv_heads: int, head_dim: int, dtype: str, target: Target
) -> bool:
    """Swap TVM's append kernel (an invalid read, see above) in the module ``bb`` is
    building for ours; GPU targets only, like ``replace_merge_state``."""
    if target.kind.name == "llvm":
        return False
    # Added as "kv_cache_transpose_append", exported under its global symbol.
    found = [
        gv
        for gv, f in bb.get().functions_items()
        if isinstance(f, tirx.PrimFunc)
        and f.attrs is not None
        and f.attrs.get("global_symbol") == TRANSPOSE_APPEND
    ]
    for gv in found:
        bb.update_func(gv, transpose_append(num_kv_heads, head_dim, dtype))
    return bool(found)


def replace_merge_state(
    bb: rx.BlockBuilder, num_heads: int, head_dim: int, v_dtype: str, target: Target
) -> bool:
    """Swap TVM's racy merge kernel in the module ``bb`` is building for ours; call it
    right after creating ``TIRPagedKVCache``. CPU targets have their own (serial)
    kernel and no GPU one: nothing to do. Returns whether it replaced one."""
    if target.kind.name == "llvm":
        return False
    mod = bb.get()
    if not any(gv.name_hint == MERGE_STATE for gv in mod.get_global_vars()):
        return False
    bb.update_func(
        mod.get_global_var(MERGE_STATE), merge_state_inplace(num_heads, head_dim, v_dtype, target)
    )
    return True
