"""The sampling functions MLC-LLM's engine calls on CUDA, Vulkan and Metal (its GPU sampler).

Signatures and meaning are the engine's (``cpp/serve/sampler/gpu_sampler.cc``; see
docs/runtime-contract.md). ``probs`` are ``[batch, vocab]`` rows of probabilities; sample
``i`` draws from row ``rows[i]`` with the uniform number ``uniform[i]`` in [0, 1).

Each function is sorting, prefix sums and reductions over the vocabulary: ``argsort`` and
``cumsum`` (made into the target's sort and scan kernels by ``DispatchSortScan``) and TE
reductions (which the target's schedule rules turn into kernels). A draw from a row with
prefix sums ``c`` is the first entry with ``c > u``: the number of entries with ``c <= u``.
"""

from __future__ import annotations

from typing import Any

from tvm import relax, te, tirx

F32, I32 = "float32", "int32"


def _gather_rows(table: te.Tensor, rows: te.Tensor, name: str) -> te.Tensor:
    """``[n, vocab]``: row ``rows[i]`` of ``table`` for each sample ``i``."""
    (n,) = rows.shape
    return te.compute((n, table.shape[1]), lambda i, j: table[rows[i], j], name=name)


def _first_above(
    cum: te.Tensor, threshold: te.Tensor, last: Any, name: str, scale: te.Tensor | None = None
) -> te.Tensor:
    """Per row ``i``: the first ``j`` with ``cum[i, j] > threshold[i] (* scale[i])``, at most
    ``last(i)`` (a total that rounds to just below the threshold cannot step past it)."""
    n, vocab = cum.shape
    k = te.reduce_axis((0, vocab), name="k")

    def bound(i):
        return threshold[i] if scale is None else threshold[i] * scale[i]

    count = te.compute(
        (n,), lambda i: te.sum((cum[i, k] <= bound(i)).astype(I32), axis=k), name=f"{name}_count"
    )
    return te.compute((n,), lambda i: tirx.min(count[i], last(i)), name=name)


def _nucleus_size(cum: te.Tensor, top_p: Any, name: str) -> te.Tensor:
    """Per row: how many of the sorted entries the top-p nucleus keeps (at least one): those
    whose preceding mass is still below ``top_p`` (the prefix sum before them, not the
    sum minus themselves, which rounds)."""
    n, vocab = cum.shape
    k = te.reduce_axis((0, vocab), name="k")

    def before(i, k):
        return tirx.if_then_else(k == 0, tirx.const(0, F32), cum[i, k - 1])

    return te.compute(
        (n,), lambda i: te.sum((before(i, k) < top_p(i)).astype(I32), axis=k), name=name
    )


def attach_gpu_sampler(bb: relax.BlockBuilder) -> list[relax.GlobalVar]:
    """Add the five functions to the module being built by ``bb``."""
    return [
        _multinomial_from_uniform(bb),
        _argsort_probs(bb),
        _sample_with_top_p(bb),
        _sampler_take_probs(bb),
        _renormalize_by_top_p(bb),
    ]


def _draw(picked: te.Tensor, cum: te.Tensor, uniform: te.Tensor) -> te.Tensor:
    """Per sample: the first entry whose prefix sum exceeds ``uniform``, at most the last
    entry of non-zero probability."""
    n, vocab = picked.shape
    j = te.reduce_axis((0, vocab), name="j")
    last = te.compute(
        (n,),
        lambda i: te.max(tirx.if_then_else(picked[i, j] > 0, j.var.astype(I32), 0), axis=j),
        name="last_nonzero",
    )
    return _first_above(cum, uniform, lambda i: last[i], "token")


def _multinomial_from_uniform(bb: relax.BlockBuilder) -> relax.GlobalVar:
    """``(probs[b, V], uniform[n], rows[n]) -> token[n]``: a draw from each sample's row."""
    b, v, n = (tirx.Var(x, "int64") for x in ("batch_size", "vocab_size", "num_samples"))
    probs = relax.Var("probs", relax.TensorType((b, v), F32))
    uniform = relax.Var("uniform_samples", relax.TensorType((n,), F32))
    rows = relax.Var("sample_indices", relax.TensorType((n,), I32))
    with bb.function("multinomial_from_uniform", [probs, uniform, rows]):
        with bb.dataflow():
            picked = bb.emit_te(
                _gather_rows, probs, rows, "picked", primfunc_name_hint="sampler_gather_rows"
            )
            cum = bb.emit(relax.op.cumsum(picked, axis=1))
            token = bb.emit_te(_draw, picked, cum, uniform, primfunc_name_hint="sampler_draw")
            out = bb.emit_output(token)
        return bb.emit_func_output(out)


def _argsort_probs(bb: relax.BlockBuilder) -> relax.GlobalVar:
    """``probs[b, V] -> (sorted_probs[b, V], sorted_ids[b, V])``, largest first."""
    b, v = tirx.Var("batch_size", "int64"), tirx.Var("vocab_size", "int64")
    probs = relax.Var("probs", relax.TensorType((b, v), F32))
    with bb.function("argsort_probs", [probs]):
        with bb.dataflow():
            values, ids = _emit_sorted(bb, probs)
            out = bb.emit_output(relax.Tuple([values, ids]))
        return bb.emit_func_output(out)


def _emit_sorted(bb: relax.BlockBuilder, probs: relax.Expr) -> tuple[relax.Var, relax.Var]:
    """Each row of ``probs`` sorted, largest first: (the values, their token ids)."""
    ids = bb.emit(relax.op.argsort(probs, axis=-1, descending=True, dtype=I32))
    values = bb.emit_te(
        lambda p, order: te.compute(p.shape, lambda i, j: p[i, order[i, j]], name="sorted_probs"),
        probs,
        ids,
        primfunc_name_hint="sampler_take_sorted",
    )
    return values, ids


def _sample_with_top_p(bb: relax.BlockBuilder) -> relax.GlobalVar:
    """``(sorted_probs[b, V], sorted_ids[b, V], uniform[n], rows[n], top_p[b]) -> token[n]``:
    a draw from the row's top-p nucleus, renormalised."""
    b, v, n = (tirx.Var(x, "int64") for x in ("batch_size", "vocab_size", "num_samples"))
    sorted_probs = relax.Var("sorted_probs", relax.TensorType((b, v), F32))
    sorted_ids = relax.Var("sorted_indices", relax.TensorType((b, v), I32))
    uniform = relax.Var("uniform_samples", relax.TensorType((n,), F32))
    rows = relax.Var("sample_indices", relax.TensorType((n,), I32))
    top_p = relax.Var("top_p", relax.TensorType((b,), F32))

    def draw(picked, cum, u, r, p, ids):
        size = _nucleus_size(cum, lambda i: p[r[i]], "nucleus")
        mass = te.compute(size.shape, lambda i: cum[i, size[i] - 1], name="nucleus_mass")
        pos = _first_above(cum, u, lambda i: size[i] - 1, "position", scale=mass)
        return te.compute(pos.shape, lambda i: ids[r[i], pos[i]], name="token")

    with bb.function("sample_with_top_p", [sorted_probs, sorted_ids, uniform, rows, top_p]):
        with bb.dataflow():
            picked = bb.emit_te(
                _gather_rows, sorted_probs, rows, "picked", primfunc_name_hint="sampler_gather_rows"
            )
            cum = bb.emit(relax.op.cumsum(picked, axis=1))
            token = bb.emit_te(
                draw,
                picked,
                cum,
                uniform,
                rows,
                top_p,
                sorted_ids,
                primfunc_name_hint="sampler_top_p_draw",
            )
            out = bb.emit_output(token)
        return bb.emit_func_output(out)


def _sampler_take_probs(bb: relax.BlockBuilder) -> relax.GlobalVar:
    """``(probs[b, V], sorted_ids[b, V], rows[n], tokens[n], offsets[m]) ->
    (sampled_probs[n], top_probs[m], top_ids[m])``: each sampled token's probability, and
    the sorted entries at flat offsets ``row * V + rank`` (the engine's logprobs)."""
    b, v, n, m = (
        tirx.Var(x, "int64") for x in ("batch_size", "vocab_size", "num_samples", "num_positions")
    )
    probs = relax.Var("unsorted_probs", relax.TensorType((b, v), F32))
    sorted_ids = relax.Var("sorted_indices", relax.TensorType((b, v), I32))
    rows = relax.Var("sample_indices", relax.TensorType((n,), I32))
    tokens = relax.Var("sampling_result", relax.TensorType((n,), I32))
    offsets = relax.Var("top_prob_offsets", relax.TensorType((m,), I32))

    def take(p, ids, r, t, off):
        vocab = p.shape[1].astype(I32)
        sampled = te.compute(r.shape, lambda i: p[r[i], t[i]], name="sampled_probs")
        top_ids = te.compute(
            off.shape, lambda i: ids[off[i] // vocab, off[i] % vocab], name="top_ids"
        )
        top_probs = te.compute(
            off.shape, lambda i: p[off[i] // vocab, top_ids[i]], name="top_probs"
        )
        return [sampled, top_probs, top_ids]

    with bb.function("sampler_take_probs", [probs, sorted_ids, rows, tokens, offsets]):
        with bb.dataflow():
            result = bb.emit_te(
                take,
                probs,
                sorted_ids,
                rows,
                tokens,
                offsets,
                primfunc_name_hint="sampler_take_probs_tir",
            )
            out = bb.emit_output(result)
        return bb.emit_func_output(out)


def _renormalize_by_top_p(bb: relax.BlockBuilder) -> relax.GlobalVar:
    """``(probs[b, V], top_p[b], init_pivots[b, 3]) -> probs[b, V]``: outside each row's
    top-p nucleus 0, inside rescaled to sum to 1. Entries equal to the smallest one kept
    are kept too. The engine's pivots (first guesses of the cutoff) are not needed."""
    b, v, k = (tirx.Var(x, "int64") for x in ("batch_size", "vocab_size", "num_pivots"))
    probs = relax.Var("probs", relax.TensorType((b, v), F32))
    top_p = relax.Var("top_p", relax.TensorType((b,), F32))
    pivots = relax.Var("init_pivots", relax.TensorType((b, k), F32))

    def renormalize(p, sorted_p, cum, tp):
        size = _nucleus_size(cum, lambda i: tp[i], "nucleus")
        cutoff = te.compute(size.shape, lambda i: sorted_p[i, size[i] - 1], name="cutoff")
        j = te.reduce_axis((0, p.shape[1]), name="j")
        mass = te.compute(
            size.shape,
            lambda i: te.sum(tirx.if_then_else(p[i, j] >= cutoff[i], p[i, j], 0.0), axis=j),
            name="mass",
        )
        return te.compute(
            p.shape,
            lambda i, x: tirx.if_then_else(p[i, x] >= cutoff[i], p[i, x] / mass[i], 0.0),
            name="renormalized",
        )

    with bb.function("renormalize_by_top_p", [probs, top_p, pivots]):
        with bb.dataflow():
            sorted_p, _ = _emit_sorted(bb, probs)
            cum = bb.emit(relax.op.cumsum(sorted_p, axis=1))
            out = bb.emit_output(
                bb.emit_te(
                    renormalize,
                    probs,
                    sorted_p,
                    cum,
                    top_p,
                    primfunc_name_hint="sampler_renormalize",
                )
            )
        return bb.emit_func_output(out)
