"""The in-place logit processors MLC-LLM's runtime calls between forward and sampling.

Their signatures are the runtime's (``cpp/serve/logit_processor.cc``): the logits are a
``[batch, vocab]`` float32 buffer changed in place; per-token arrays say which sequence
(``pos2seq_id``) and which token each entry applies to.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

# The float32 value masked-out tokens get: sampling gives them probability zero.
_NEG_INF = -3.4028234663852886e38


@T.prim_func(private=True)
def _apply_logit_bias_inplace(
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
    for i in range(num_token):
        logits[pos2seq_id[i], token_ids[i]] += logit_bias[i]


@T.prim_func(private=True)
def _apply_penalty_inplace(
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
    for i in range(num_token):
        s = pos2seq_id[i]
        row = seq_ids[s]
        tok = token_ids[i]
        logits[row, tok] -= penalties[s, 0] + T.Cast("float32", token_cnt[i]) * penalties[s, 1]
        logits[row, tok] = T.if_then_else(
            logits[row, tok] < T.float32(0),
            logits[row, tok] * penalties[s, 2],
            logits[row, tok] / penalties[s, 2],
        )


@T.prim_func(private=True)
def _apply_bitmask_inplace(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
    """Tokens whose bit is 0 in the sequence's bitmask (32 tokens per int32) get -inf."""
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    batch_size, vocab_size, num_seq = T.int32(), T.int32(), T.int32()
    logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
    seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
    bitmask = T.match_buffer(var_bitmask, (batch_size, (vocab_size + 31) // 32), "int32")
    for s, v in T.grid(num_seq, vocab_size):
        logits[seq_ids[s], v] = T.if_then_else(
            (bitmask[seq_ids[s], v // 32] >> (v % 32)) & 1 == 1,
            logits[seq_ids[s], v],
            T.float32(_NEG_INF),
        )


def logit_processor_funcs() -> dict[str, tirx.PrimFunc]:
    """The three functions, by the names the runtime looks up."""
    return {
        "apply_logit_bias_inplace": _apply_logit_bias_inplace,
        "apply_penalty_inplace": _apply_penalty_inplace,
        "apply_bitmask_inplace": _apply_bitmask_inplace,
    }
