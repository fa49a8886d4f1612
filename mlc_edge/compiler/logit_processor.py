"""The in-place logit processors MLC-LLM's runtime calls between forward and sampling.

Their signatures are the runtime's (``cpp/serve/logit_processor.cc``): the logits are a
``[batch, vocab]`` float32 buffer changed in place; per-token arrays say which sequence
(``pos2seq_id``) and which token each entry applies to.

Two variants of each, from one definition: plain loops for the CPU, and for GPU targets the
same arithmetic with one GPU thread per entry (the logits live in device memory there: a
loop left as host code would touch them from the CPU). Both are marked
``tirx.is_scheduled`` so the schedule rules leave them alone.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

# The float32 value masked-out tokens get: sampling gives them probability zero.
_NEG_INF = -3.4028234663852886e38


# Each processor is one update per entry of a flat index space (a token, or a (sequence,
# token) pair), written once as a macro; ``_for_each_entry`` runs it as a CPU loop or with
# one GPU thread per entry.


@T.macro
def _for_each_entry(count, threads, update, args):
    """``update(*args, i)`` for ``i`` in ``[0, count)``: a loop when ``threads`` is 0, else
    entry ``bx * threads + tx`` on thread ``tx`` of work-group ``bx``. Entries never collide
    (the runtime passes each (sequence, token) pair once), so the updates need no atomics."""
    if threads == 0:
        for i in range(count):
            update(*args, i)
    else:
        for bx in T.thread_binding((count + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                if bx * threads + tx < count:
                    i = bx * threads + tx
                    update(*args, i)


@T.macro
def _add_bias(logits, pos2seq_id, token_ids, logit_bias, i):
    logits[pos2seq_id[i], token_ids[i]] += logit_bias[i]


@T.macro
def _penalize(logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties, i):
    s = pos2seq_id[i]
    row = seq_ids[s]
    tok = token_ids[i]
    logits[row, tok] -= penalties[s, 0] + T.Cast("float32", token_cnt[i]) * penalties[s, 1]
    logits[row, tok] = T.if_then_else(
        logits[row, tok] < T.float32(0),
        logits[row, tok] * penalties[s, 2],
        logits[row, tok] / penalties[s, 2],
    )


@T.macro
def _mask(logits, seq_ids, bitmask, vocab_size, entry):
    s = entry // vocab_size
    v = entry % vocab_size
    logits[seq_ids[s], v] = T.if_then_else(
        (bitmask[seq_ids[s], v // 32] >> (v % 32)) & 1 == 1,
        logits[seq_ids[s], v],
        T.float32(_NEG_INF),
    )


def _funcs(threads: int) -> dict[str, tirx.PrimFunc]:
    """The three processors: CPU loops when ``threads`` is 0, else GPU kernels of
    ``threads`` threads per work-group."""

    @T.prim_func(private=True)
    def apply_logit_bias_inplace(
        var_logits: T.handle,
        var_pos2seq_id: T.handle,
        var_token_ids: T.handle,
        var_logit_bias: T.handle,
    ):
        """``logits[pos2seq_id[i], token_ids[i]] += logit_bias[i]``."""
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch_size, vocab_size, num_token = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        logit_bias = T.match_buffer(var_logit_bias, (num_token,), "float32")
        _for_each_entry(num_token, threads, _add_bias, (logits, pos2seq_id, token_ids, logit_bias))

    @T.prim_func(private=True)
    def apply_penalty_inplace(
        var_logits: T.handle,
        var_seq_ids: T.handle,
        var_pos2seq_id: T.handle,
        var_token_ids: T.handle,
        var_token_cnt: T.handle,
        var_penalties: T.handle,
    ):
        """Presence/frequency penalty subtracted, then repetition penalty applied.

        ``penalties[s] = (presence, frequency, repetition)``; a token seen ``c`` times loses
        ``presence + c * frequency`` and is then divided (positive logit) or multiplied
        (negative logit) by ``repetition``.
        """
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch_size, vocab_size, num_token, num_seq = T.int32(), T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        token_cnt = T.match_buffer(var_token_cnt, (num_token,), "int32")
        penalties = T.match_buffer(var_penalties, (num_seq, 3), "float32")
        _for_each_entry(
            num_token,
            threads,
            _penalize,
            (logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties),
        )

    @T.prim_func(private=True)
    def apply_bitmask_inplace(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
        """Tokens whose bit is 0 in the sequence's bitmask (32 tokens per int32) get -inf."""
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch_size, vocab_size, num_seq = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        bitmask = T.match_buffer(var_bitmask, (batch_size, (vocab_size + 31) // 32), "int32")
        # One entry per (sequence, token): num_seq * vocab_size of them.
        _for_each_entry(
            num_seq * vocab_size, threads, _mask, (logits, seq_ids, bitmask, vocab_size)
        )

    return {
        "apply_logit_bias_inplace": apply_logit_bias_inplace,
        "apply_penalty_inplace": apply_penalty_inplace,
        "apply_bitmask_inplace": apply_bitmask_inplace,
    }


# Threads per work-group of the GPU variants: enough to hide latency on a tiny update,
# and within every GPU's limit (the target's max_num_threads can only lower it).
GPU_THREADS = 256
_CPU_FUNCS = _funcs(0)


def logit_processor_funcs(target: Target | None = None) -> dict[str, tirx.PrimFunc]:
    """The three functions, by the names the runtime looks up, for ``target``.

    Without a target, the current one (the compile pipeline runs inside ``with target``);
    GPU targets get the thread-bound variants, anything else the CPU loops.
    """
    target = target or Target.current(allow_none=True)
    if target is not None and "gpu" in target.keys:
        limit = int(target.attrs.get("max_num_threads", GPU_THREADS))
        return _funcs(min(GPU_THREADS, limit))
    return _CPU_FUNCS
