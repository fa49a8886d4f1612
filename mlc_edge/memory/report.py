"""Tables of memory plans: one plan, or several side by side (``--compare``)."""

from __future__ import annotations

from .plan import GiB, MemoryPlan, MiB


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def _pieces(count: int) -> str:
    """A table split to fit the largest allocation says so."""
    return f"in {count} pieces" if count > 1 else ""


def rows(plan: MemoryPlan) -> list[tuple[str, int | None, str]]:
    """(label, bytes or None, text when not bytes) for one plan."""
    w = plan.weights
    name, size = plan.largest_buffer
    out: list[tuple[str, int | None, str]] = [
        (
            "sizes (batch / prefill chunk / context)",
            None,
            f"{plan.max_batch_size} / {plan.prefill_chunk_size} / {plan.context_window_size}",
        ),
        ("weights: embedding", w.embedding, _pieces(w.embedding_pieces)),
        # Per plan, not in the label: a --compare table's columns differ (q4f16t gives a
        # tied model an output layer of its own, q4f16t-hf does not).
        (
            "weights: output layer",
            w.output_layer,
            "(tied)" if not w.output_layer else _pieces(w.output_pieces),
        ),
        (f"weights: {w.num_layers} layers", w.layers, ""),
        ("weights: other", w.other, ""),
        ("weights total", w.total, ""),
        ("KV cache tokens (pages of 16)", None, f"{plan.kv_tokens:,} {plan.kv_dtype}"),
        ("KV cache", plan.kv_cache_bytes, ""),
        ("temporaries: prefill", plan.temp_prefill_bytes, ""),
        ("temporaries: decode", plan.temp_decode_bytes, ""),
        ("temporaries: max (any function)", plan.temp_max_bytes, ""),
        ("logits [batch, 1, vocab] float32", plan.logits_bytes, ""),
        ("runtime overhead", plan.overhead_bytes, ""),
        ("TOTAL (peak)", plan.total_bytes, ""),
        ("largest buffer", size, ""),
        ("  which", None, name),
        (
            "  max allocation",
            plan.max_alloc_bytes,
            "" if plan.max_alloc_bytes else "no limit (cpu)",
        ),
        ("  fits", None, _yes(plan.fits_max_alloc)),
        ("reported GPU memory", plan.reported_memory_bytes, ""),
    ]
    if plan.loads:  # the engine's terms (engine_estimate.py); only the capacity varies
        e = plan.loads[0].engine
        out += [
            ("engine: temp buffer (2 x max)", e.temp_buffer_bytes, ""),
            ("engine: aux KV workspace", round(e.kv_aux_workspace_bytes), ""),
            ("engine: model workspace", round(e.model_workspace_bytes), ""),
            ("engine: logit-processor workspace", round(e.logit_processor_workspace_bytes), ""),
            ("engine: KV bytes per token", None, f"{e.kv_bytes_per_token:g}"),
        ]
    for p in plan.loads:
        out.append(
            (
                f"floor {p.floor_bytes / GiB:g} GiB: KV capacity (tokens)",
                None,
                f"{p.kv_capacity_tokens:,}",
            )
        )
        out.append(
            (
                f"floor {p.floor_bytes / GiB:g} GiB: loads / context fits",
                None,
                f"{_yes(p.loads)} / {_yes(p.context_fits)}",
            )
        )
    if plan.budget_bytes is not None:
        out.append(("budget", plan.budget_bytes, ""))
        out.append(("  peak within budget", None, _yes(plan.within_budget)))
    return out


def table(plans: list[MemoryPlan]) -> list[str]:
    """Lines: one row per figure, bytes and MiB per plan."""
    cols = [r for r in (rows(p) for p in plans)]
    width = max(len(label) for label, _, _ in cols[0])
    header = f"{'':<{width}}" + "".join(f" | {p.label:>30}" for p in plans)
    lines = [header, "-" * len(header)]
    for i, (label, _, _) in enumerate(cols[0]):
        cells = []
        for c in cols:
            _, n, text = c[i]
            cell = f"{n:,} B = {_mib(n)} MiB" if n is not None else ""
            cell = f"{cell} {text}".strip() if n is not None and text else (cell or text)
            cells.append(f" | {cell:>30}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    return lines
