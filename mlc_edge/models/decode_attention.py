"""Our paged-KV decode attention kernels (``batch_decode_paged_kv`` and its sliding-window
variant) for GPU targets, and a CPU one (``batch_decode_paged_kv_cpu``) for the desktop
runner.

What it computes, for every sequence ``b`` (one query token each) and query head ``q``::

    o[b, q] = sum_t softmax_t(sm_scale * Q[b, q] . K[t, kv(q)]) V[t, kv(q)]
    lse[b, q] = log2(sum_t 2^(log2(e) * sm_scale * Q[b, q] . K[t, kv(q)]))

over the tokens ``t`` the sequence holds in the paged cache: pages
``page_table_values[page_table_indptr[b] : page_table_indptr[b + 1]]`` of ``PAGE_SIZE``
slots, the last one filled up to ``length_info``; ``kv(q) = q // (num_qo_heads /
num_kv_heads)`` (grouped-query attention). Softmax and every sum run in fp32. Same
signature and results as TVM 0.27's kernel (``_attention_decode`` in
``relax/frontend/nn/llm/_decode_kernels.py``), which MLC's runtime calls for every decode
step and layer (docs/tvm-0.27.md); ``replace_decode_attention`` swaps it in.

Why ours: bytes. One decode step of the tiny test Llama (4 query heads, 2 KV heads,
head_dim 16, 40 cached tokens) needs 5,272 bytes read once (K and V 5,120, the query 128,
the page table and lengths 24); TVM's kernel loads 16,640 (3.16x; ``mlc-edge verify
--traffic``): K and V once, but every work-item loads the sequence's page-table pointers
(4,096 bytes), its length (2,048), its query slice (4,096: the 32 work-item rows of a
work-group each load it) and each row's page-table entry (1,280). On one
Llama-3.2-1B layer (32 query heads, 8 KV heads, head_dim 64) that is 1.67x at 40 tokens
and still 1.28x at 512 (the page-table entries alone: 262,144 bytes for 128). Ours: 1.005x,
1.002x and 1.001x. Decode on a phone is bound by memory bandwidth, and attention's share
grows with the context.

How ours reads every byte once: one work-group per (sequence, KV head) takes all the
query heads of the group, so each K/V row is read by one work-item set and used for every
head of the group from registers. The query rows of the group, the page-table entries of
a tile and the sequence's lengths are loaded once per work-group into local memory.

The tile loop, over ``bdz`` cache slots (whole pages) at a time; ``bdx`` work-items
(``vec`` values of a row each) per slot:

1. page ids of the tile's pages -> local memory (first work-items);
2. each work-item: its ``vec`` values of its slot's K row, dotted with every head's query
   (fp32) -> partial sums in local memory;
3. per (head, slot): the ``bdx`` partials summed -> score;
4. per head (one work-item): running max ``m``, scale of the earlier sum
   ``2^(m_old - m)``, weights ``2^(score - m)``, running denominator ``d``;
5. each work-item: its ``O`` (every head, its ``vec`` columns) rescaled, plus weight x V.

At the end the ``bdz`` partial ``O`` of each head are summed through local memory and
divided by ``d``. Slots are visited in page-table order, not token order: attention
does not depend on the order of the keys, and K comes roped already (``RopeMode.NORMAL``:
the cache's ``fused_rope`` runs before the append, and the runtime passes ``rotary_mode``
0, so the kernel ignores ``rotary_mode``, ``rope_scale``, ``rope_theta``,
``k_rope_pos_offset`` and ``q_rope_position``; ``replace_decode_attention`` refuses any
other rope mode). A slot holds a token when it is below the sequence's length and, for
the sliding-window variant, below the attention sink or at/after the window offset
(``length_info`` = [last page's tokens, window offset, sink size]), which is TVM's token
-> slot map read backwards; that assumes offset >= sink (the runtime pins the sink in
the block's first slots; with offset < sink TVM's kernel would count slots twice). Our
models refuse sliding windows, so their runtime never calls that variant; it is replaced
all the same, and checked, so that no stock kernel is left in the library.

On the CPU, TVM's kernel is a different one: every (sequence, query head) in turn on one
core, a value at a time. ``decode_attention_cpu`` gives the thread pool one task per
(sequence, KV head), reads each K/V row once for the group's query heads and works on
whole rows in vectors, the online softmax a page at a time; same signature, same slot
rule, TVM's initial softmax state. On a 16-layer Llama-3.2-1B-shaped model (``q4f16t``,
2 cores, 32 to 72 cached tokens), the cache's attention call (rope, append, attention)
took 2.7 ms of a 40 ms decode step with TVM's kernel and 1.1 ms with ours a slot at a
time (timed per call with ``vm.set_instrument``); a page at a time, with our CPU RoPE
kernel (``rope_kernel.py``), 0.7 ms at 57 to 105 cached tokens.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode
from tvm.script import tirx as T
from tvm.target import Target

from ..compiler.contract import PAGE_SIZE
from ..errors import UserError
from ..schedules.cpu.lanes import across_lanes

DECODE = "batch_decode_paged_kv"
DECODE_SLIDING_WINDOW = "batch_decode_paged_kv_sliding_window"
# TVM's KV cache names its CPU kernels apart; the runtime calls whichever the cache holds.
DECODE_CPU = "batch_decode_paged_kv_cpu"
DECODE_CPU_SLIDING_WINDOW = "batch_decode_paged_kv_cpu_sliding_window"
THREADS = 256  # work-items of a work-group at most (the Adreno default limit)
LOG2_E = math.log2(math.e)


def _layout(
    num_groups: int, head_dim: int, max_threads: int, shared_bytes: int, page_size: int
) -> tuple[int, int, int]:
    """(vec, bdx, bdz): values a work-item reads of a row, work-items of a row, rows (cache
    slots) of a tile. A tile is whole pages (its page ids are staged once); the local
    memory it needs must fit the target."""
    for vec in (4, 8, 16, 2, 1):  # 8-byte fp16 loads first, as TVM's kernel
        if head_dim % vec:
            continue
        bdx = head_dim // vec
        bdz = page_size * max(1, min(max_threads, THREADS) // (bdx * page_size))
        while bdz >= page_size and bdx * bdz <= max_threads:
            if _shared_bytes(num_groups, head_dim, vec, bdx, bdz, page_size) <= shared_bytes:
                return vec, bdx, bdz
            bdz -= page_size
    raise UserError(
        f"our decode attention kernel has no work-group layout for head_dim {head_dim} with "
        f"{num_groups} query heads per KV head within {max_threads} work-items and "
        f"{shared_bytes} bytes of local memory: this model is not supported on this GPU target"
    )


def _shared_bytes(group: int, head_dim: int, vec: int, bdx: int, bdz: int, page_size: int) -> int:
    scratch = max(group, vec) * bdx * bdz  # partial dot products / partial outputs
    query = group * head_dim
    small = group * (bdz + 3) + bdz // page_size + 6
    return 4 * (scratch + query + small)


def _query_group(num_qo_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head (grouped-query attention); UserError when uneven."""
    if num_qo_heads % num_kv_heads:
        raise UserError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return num_qo_heads // num_kv_heads


def holds_token(slot: Any, slots: Any, lens: Any) -> Any:
    """TVMScript: whether cache slot ``slot`` of a sequence holds a token: within its
    ``slots``, not slid out of the window (``lens[3]`` the window offset, ``lens[4]`` the
    sink size; both 0 without a sliding window)."""
    return T.And(slot < slots, T.Or(slot < lens[4], slot >= lens[3]))


def _with_decode_signature(
    body: Any,
    shape: tuple[int, int, int, str, int],
    sliding_window: bool,
    symbol: str,
    attrs: dict[str, Any],
    pages_offset: bool,
) -> tirx.PrimFunc:
    """A decode kernel with TVM's signature around ``body``, a ``T.macro`` taking
    ``(B, Q, pages, page_table_indptr, page_table_values, length_info, output, lse,
    sm_scale)``. ``shape`` is ``(num_qo_heads, num_kv_heads, head_dim, dtype, page_size)``;
    ``length_info`` is ``[3, B]`` with a sliding window, else ``[B]``. The rope arguments
    are taken and not used (module docstring). ``pages_offset``: the pages buffer may start
    at an element offset, as in TVM's GPU kernel (its CPU kernel has none)."""
    H_qo, H_kv, D, dtype, page_size = shape

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,  # [B], or [3, B] with a sliding window
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr(attrs)
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        if pages_offset:
            pages_elem_offset = T.int64()
            pages = T.match_buffer(
                pages_handle,
                (max_num_pages, 2, H_kv, page_size, D),
                dtype,
                elem_offset=pages_elem_offset,
            )
        else:
            pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, page_size, D), dtype)
        page_table_indptr = T.match_buffer(
            page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset
        )
        page_table_values = T.match_buffer(
            page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset
        )
        # unused with rope applied before the cache (module docstring); part of the ABI
        k_rope_pos_offset = T.match_buffer(  # noqa: F841
            k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        q_rope_position = T.match_buffer(  # noqa: F841
            q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset
        )
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        if sliding_window:
            length_info = T.match_buffer(
                var_length_info, (3, B), "int32", elem_offset=length_info_elem_offset
            )
        else:
            length_info = T.match_buffer(
                var_length_info, (B,), "int32", elem_offset=length_info_elem_offset
            )
        body(B, Q, pages, page_table_indptr, page_table_values, length_info, output, lse, sm_scale)

    return batch_decode_paged_kv.with_attr("global_symbol", symbol)


def decode_attention(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    dtype: str,
    sliding_window: bool,
    target: Target,
    page_size: int = PAGE_SIZE,
) -> tirx.PrimFunc:
    """The decode kernel for a GPU ``target``, same signature as TVM's."""
    group = _query_group(num_qo_heads, num_kv_heads)
    max_threads = int(target.attrs["max_num_threads"])
    shared_limit = int(target.attrs.get("max_shared_memory_per_block", 16384))
    vec, bdx, bdz = _layout(group, head_dim, max_threads, shared_limit, page_size)
    threads = bdx * bdz
    tile_pages = bdz // page_size
    scratch_size = max(group, vec) * threads
    q_loads = (group * head_dim + threads - 1) // threads
    g_per_tx = (group + bdx - 1) // bdx  # heads a work-item sums scores of (step 3)
    score_scale = LOG2_E  # times sm_scale: scores in log2 units, as TVM's (lse in log2)
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim

    @T.macro
    def body(B, Q, pages, page_table_indptr, page_table_values, length_info, output, lse, sm_scale):
        for b in T.thread_binding(B, thread="blockIdx.x"):
            for h in T.thread_binding(H_kv, thread="blockIdx.y"):
                for tz in T.thread_binding(bdz, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("decode"):
                            # accesses depend on the page table: no regions to declare
                            T.reads()
                            T.writes()
                            # [first page, pages, last page's tokens, window offset, sink]
                            seq = T.sblock_alloc_buffer((5,), "int32", scope="shared")
                            q_smem = T.sblock_alloc_buffer((group, D), "float32", scope="shared")
                            page_ids = T.sblock_alloc_buffer((tile_pages,), "int32", scope="shared")
                            # [group, bdz, bdx] partial dots in the loop; [bdz, D] partial
                            # outputs at the end
                            scratch = T.sblock_alloc_buffer(
                                (scratch_size,), "float32", scope="shared"
                            )
                            scores = T.sblock_alloc_buffer((group, bdz), "float32", scope="shared")
                            weights = T.sblock_alloc_buffer((group, bdz), "float32", scope="shared")
                            d_smem = T.sblock_alloc_buffer((group,), "float32", scope="shared")
                            rescale = T.sblock_alloc_buffer((group,), "float32", scope="shared")
                            q_local = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                            o_local = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                            kv_local = T.sblock_alloc_buffer((vec,), dtype, scope="local")
                            acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            first = T.sblock_alloc_buffer((1,), "int32", scope="local")
                            lens = T.sblock_alloc_buffer((5,), "int32", scope="local")
                            m_run = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            d_run = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            m_new = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            scale = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            p = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            lin: T.let[T.int32] = tz * bdx + tx

                            # The sequence's lengths: read once, by one work-item.
                            if lin == 0:
                                # (a local copy: a work-item reading back what it wrote to
                                # local memory would need a barrier inside the branch)
                                first[0] = page_table_indptr[b]
                                seq[0] = first[0]
                                seq[1] = page_table_indptr[b + 1] - first[0]
                                if sliding_window:
                                    seq[2] = length_info[0, b]
                                    seq[3] = length_info[1, b]
                                    seq[4] = length_info[2, b]
                                else:
                                    seq[2] = length_info[b]
                                    seq[3] = 0
                                    seq[4] = 0
                            # The group's query rows: read once, kept in fp32.
                            for i in T.serial(q_loads):
                                e: T.let[T.int32] = i * threads + lin
                                if e < group * D:
                                    q_smem[e // D, e % D] = T.Cast(
                                        "float32", Q[b, h * group + e // D, e % D]
                                    )
                            # Softmax state of head `lin`, kept by work-item `lin`: TVM's
                            # initial values (an empty sequence gives o = 0, lse = -5e4,
                            # as TVM's kernel does).
                            m_run[0] = T.float32(-5e4)
                            d_run[0] = T.float32(1.0)
                            for g in T.unroll(group):
                                for v in T.unroll(vec):
                                    o_local[g, v] = T.float32(0)
                            T.tvm_storage_sync("shared")
                            for g in T.unroll(group):
                                for v in T.unroll(vec):
                                    q_local[g, v] = q_smem[g, tx * vec + v]
                            # (into registers: TVM's sync planner allows no local-memory
                            # read in a condition)
                            for i in T.unroll(5):
                                lens[i] = seq[i]
                            # Cache slots in use: all but the last page's empty ones.
                            slots: T.let[T.int32] = T.if_then_else(
                                lens[1] > 0, (lens[1] - 1) * page_size + lens[2], 0
                            )

                            for tile in T.serial((slots + bdz - 1) // bdz):
                                # 1. the tile's page ids, once per work-group
                                if lin < tile_pages:
                                    if tile * tile_pages + lin < lens[1]:
                                        page_ids[lin] = page_table_values[
                                            lens[0] + tile * tile_pages + lin
                                        ]
                                T.tvm_storage_sync("shared")
                                slot: T.let[T.int32] = tile * bdz + tz
                                valid: T.let[T.bool] = holds_token(slot, slots, lens)
                                # 2. this work-item's part of Q.K for every head
                                if valid:
                                    for v in T.vectorized(vec):
                                        kv_local[v] = pages[
                                            page_ids[tz // page_size],
                                            0,
                                            h,
                                            tz % page_size,
                                            tx * vec + v,
                                        ]
                                for g in T.unroll(group):
                                    acc[0] = T.float32(0)
                                    if valid:
                                        for v in T.unroll(vec):
                                            acc[0] += q_local[g, v] * T.Cast("float32", kv_local[v])
                                    scratch[(g * bdz + tz) * bdx + tx] = acc[0]
                                T.tvm_storage_sync("shared")
                                # 3. scores: the row's bdx partials summed, per head
                                for gi in T.serial(g_per_tx):
                                    if gi * bdx + tx < group:
                                        acc[0] = T.float32(0)
                                        for x in T.serial(bdx):
                                            acc[0] += scratch[
                                                ((gi * bdx + tx) * bdz + tz) * bdx + x
                                            ]
                                        scores[gi * bdx + tx, tz] = (
                                            acc[0] * sm_scale * T.float32(score_scale)
                                        )
                                T.tvm_storage_sync("shared")
                                # 4. online softmax, one work-item per head
                                if lin < group:
                                    m_new[0] = m_run[0]
                                    for r in T.serial(bdz):
                                        if holds_token(tile * bdz + r, slots, lens):
                                            m_new[0] = T.max(m_new[0], scores[lin, r])
                                    scale[0] = T.exp2(m_run[0] - m_new[0])
                                    d_run[0] = d_run[0] * scale[0]
                                    for r in T.serial(bdz):
                                        if holds_token(tile * bdz + r, slots, lens):
                                            p[0] = T.exp2(scores[lin, r] - m_new[0])
                                        else:
                                            p[0] = T.float32(0)
                                        weights[lin, r] = p[0]
                                        d_run[0] += p[0]
                                    m_run[0] = m_new[0]
                                    rescale[lin] = scale[0]
                                T.tvm_storage_sync("shared")
                                # 5. O rescaled, plus weight x V of this work-item's slot
                                if valid:
                                    for v in T.vectorized(vec):
                                        kv_local[v] = pages[
                                            page_ids[tz // page_size],
                                            1,
                                            h,
                                            tz % page_size,
                                            tx * vec + v,
                                        ]
                                for g in T.unroll(group):
                                    for v in T.unroll(vec):
                                        o_local[g, v] = o_local[g, v] * rescale[g]
                                    if valid:
                                        for v in T.unroll(vec):
                                            o_local[g, v] += weights[g, tz] * T.Cast(
                                                "float32", kv_local[v]
                                            )
                                # page_ids and scores are rewritten by the next tile
                                T.tvm_storage_sync("shared")

                            if lin < group:
                                d_smem[lin] = d_run[0]
                            # The bdz partial outputs of each head summed, divided by d.
                            for g in T.serial(group):
                                for v in T.unroll(vec):
                                    scratch[tz * D + tx * vec + v] = o_local[g, v]
                                T.tvm_storage_sync("shared")
                                if lin < D:
                                    acc[0] = T.float32(0)
                                    for z in T.serial(bdz):
                                        acc[0] += scratch[z * D + lin]
                                    output[b, h * group + g, lin] = T.Cast(
                                        dtype, acc[0] / d_smem[g]
                                    )
                                T.tvm_storage_sync("shared")
                            if lin < group:
                                lse[b, h * group + lin] = m_run[0] + T.log2(d_run[0])

    return _with_decode_signature(
        body,
        (H_qo, H_kv, D, dtype, page_size),
        sliding_window,
        DECODE_SLIDING_WINDOW if sliding_window else DECODE,
        {"tirx.is_scheduled": True},
        pages_offset=True,
    )


def _dot_in_lanes(
    q: tirx.Buffer, g: Any, key: tirx.Buffer, at: list[Any], size: int, lanes: int
) -> tirx.PrimExpr:
    """``q[g, :size] . key[*at, :size]`` as ``lanes`` partial sums in one vector (an SSA
    value: local buffers for them stayed in memory, a store and a load a step)."""

    def chunk(c: int) -> tirx.PrimExpr:
        ramp = tirx.Ramp(c * lanes, 1, lanes)
        k = tirx.BufferLoad(key, [*at, ramp])
        return tirx.BufferLoad(q, [g, ramp]) * tirx.Cast(f"float32x{lanes}", k)

    return functools.reduce(operator.add, [chunk(c) for c in range(size // lanes)])


def decode_attention_cpu(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    dtype: str,
    sliding_window: bool,
    page_size: int = PAGE_SIZE,
) -> tirx.PrimFunc:
    """The decode kernel for the CPU, same signature as TVM's CPU kernel.

    TVM's runs every (sequence, query head) one after the other on one core, a value at a
    time; this one gives each (sequence, KV head) to the thread pool, reads each K/V row
    once for the group's query heads, and works on whole rows in vectors. Scores in log2
    units and TVM's initial values as the GPU kernel above, pages in page-table order; the
    online softmax moves a page at a time: a page's scores, their maximum, one rescale of
    the running sum and output, then the page's rows weighted into the output. (A slot at a
    time, each slot paid two ``exp2`` calls, a rescale of the output and a serial sum of
    the dot product's lanes: 46 us a layer at 100 tokens for Llama-3.2-1B, 2-3x this.)"""
    group = _query_group(num_qo_heads, num_kv_heads)
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    lanes = next(n for n in (16, 8, 4, 2, 1) if D % n == 0)  # a dot product's partial sums

    @T.macro
    def body(B, Q, pages, page_table_indptr, page_table_values, length_info, output, lse, sm_scale):
        for bh in T.parallel(B * H_kv):
            with T.sblock("decode"):
                # accesses depend on the page table: no regions to declare
                T.reads()
                T.writes()
                q = T.sblock_alloc_buffer((group, D), "float32", scope="local")
                o = T.sblock_alloc_buffer((group, D), "float32", scope="local")
                m_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                d_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                # a page's scores, then its weights
                score = T.sblock_alloc_buffer((group, page_size), "float32", scope="local")
                # new max, rescale of the earlier sum and output, the page's sum
                acc = T.sblock_alloc_buffer((3,), "float32", scope="local")
                # [first page, pages, last page's tokens, window offset, sink]
                lens = T.sblock_alloc_buffer((5,), "int32", scope="local")
                b: T.let[T.int32] = bh // H_kv
                h: T.let[T.int32] = bh % H_kv
                lens[0] = page_table_indptr[b]
                lens[1] = page_table_indptr[b + 1] - lens[0]
                if sliding_window:
                    lens[2] = length_info[0, b]
                    lens[3] = length_info[1, b]
                    lens[4] = length_info[2, b]
                else:
                    lens[2] = length_info[b]
                    lens[3] = 0
                    lens[4] = 0
                # The group's query rows in fp32, scaled so that scores come in log2 units.
                for g in T.serial(group):
                    for d in T.vectorized(D):
                        q[g, d] = T.Cast("float32", Q[b, h * group + g, d]) * (
                            sm_scale * T.float32(LOG2_E)
                        )
                        o[g, d] = T.float32(0)
                    m_run[g] = T.float32(-5e4)
                    d_run[g] = T.float32(1.0)
                slots: T.let[T.int32] = T.if_then_else(
                    lens[1] > 0, (lens[1] - 1) * page_size + lens[2], 0
                )
                for pg in T.serial(lens[1]):
                    page: T.let[T.int32] = page_table_values[lens[0] + pg]
                    # the page's scores (a slot not held: -inf, weight 0)
                    for t in T.serial(page_size):
                        for g in T.serial(group):
                            score[g, t] = T.float32("-inf")
                            if holds_token(pg * page_size + t, slots, lens):
                                score[g, t] = across_lanes(
                                    _dot_in_lanes(q, g, pages, [page, 0, h, t], D, lanes),
                                    operator.add,
                                )
                    # the new max, the rescale of the earlier sum and output, the weights
                    for g in T.serial(group):
                        acc[0] = m_run[g]
                        for t in T.serial(page_size):
                            acc[0] = T.max(acc[0], score[g, t])
                        acc[1] = T.exp2(m_run[g] - acc[0])
                        acc[2] = T.float32(0)
                        for t in T.serial(page_size):
                            score[g, t] = T.Select(
                                score[g, t] > T.float32("-inf"),
                                T.exp2(score[g, t] - acc[0]),
                                T.float32(0),
                            )
                            acc[2] += score[g, t]
                        d_run[g] = d_run[g] * acc[1] + acc[2]
                        m_run[g] = acc[0]
                        for d in T.vectorized(D):
                            o[g, d] = o[g, d] * acc[1]
                    # the page's V rows, weighted, into the output
                    for t in T.serial(page_size):
                        if holds_token(pg * page_size + t, slots, lens):
                            for g in T.serial(group):
                                for d in T.vectorized(D):
                                    o[g, d] += score[g, t] * T.Cast(
                                        "float32", pages[page, 1, h, t, d]
                                    )
                for g in T.serial(group):
                    for d in T.vectorized(D):
                        output[b, h * group + g, d] = T.Cast(dtype, o[g, d] / d_run[g])
                    lse[b, h * group + g] = m_run[g] + T.log2(d_run[g])

    return _with_decode_signature(
        body,
        (H_qo, H_kv, D, dtype, page_size),
        sliding_window,
        DECODE_CPU_SLIDING_WINDOW if sliding_window else DECODE_CPU,
        {"tirx.is_scheduled": True, "tirx.noalias": True},
        pages_offset=False,
    )


def replace_decode_attention(
    bb: rx.BlockBuilder,
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    dtype: str,
    rope_mode: RopeMode,
    target: Target,
) -> list[str]:
    """Swap TVM's decode attention kernels (plain and sliding-window) in the module ``bb``
    is building for ours: the GPU kernel, or on a CPU target (``llvm``) the CPU one. Call
    it right after creating ``TIRPagedKVCache``. Returns the global symbols replaced."""
    if rope_mode != RopeMode.NORMAL:
        # Ours reads K as stored; with RopeMode.INLINE the kernel would have to rope it.
        raise UserError(
            f"our decode attention kernel needs RoPE applied before the KV "
            f"cache (RopeMode.NORMAL), not {RopeMode(rope_mode).name}"
        )
    on_cpu = target.kind.name == "llvm"
    sliding = (
        {DECODE_CPU: False, DECODE_CPU_SLIDING_WINDOW: True}
        if on_cpu
        else {DECODE: False, DECODE_SLIDING_WINDOW: True}
    )
    replaced = []
    for gv, func in bb.get().functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        symbol = str(func.attrs.get("global_symbol"))
        if symbol not in sliding:
            continue
        args = (num_kv_heads, num_qo_heads, head_dim, dtype, sliding[symbol])
        ours = decode_attention_cpu(*args) if on_cpu else decode_attention(*args, target)
        bb.update_func(gv, ours)
        replaced.append(symbol)
    return replaced
