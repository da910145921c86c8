"""What pbs-prefill prints and writes: the method's label, the logit comparison against the
dense prefill, the one comparison table, the greedy continuations side by side, and the summary
record (what ``--json`` writes). Pure renderings of measured numbers, except
:func:`compare_logits`, which reduces two logit arrays with the library's metrics."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import NamedTuple

import jax
import numpy as np

from experiments.lib.metrics import argmax_agreement, rel_err
from experiments.lib.prefill_checks import Plan
from models import LlamaConfig
from pbs_jax import PBSConfig

CPU_TIMING_NOTE = (
    "CPU timings measure the exact O(N²) reference (or the Pallas interpreter), not sparsity; "
    "see the GPU results in README"
)
DENSITY_NOTE = (
    "density = blocks computed / blocks a dense causal kernel computes (T(T+1)/2 for T blocks); "
    "dense is exactly 1. The paper's density is the same ratio; its kernel also computes the "
    "own-segment blocks above the diagonal (permuted keys), ours reads the own segment in "
    "original order and does not."
)

# (permute, selector) -> the name of the method that ran, as the paper calls it.
_METHOD_NAMES = {
    (True, "meanpool"): "PBS",
    (False, "meanpool"): "MeanPooling",
    (True, "antidiagonal"): "PBS+ (antidiagonal)",
    (False, "antidiagonal"): "XAttention-style (antidiagonal)",
}


def method_label(config: PBSConfig) -> str:
    """Column label of the sparse prefill: "PBS", "MeanPooling" without permutation, and the
    selector's name when it is not the default, e.g. "PBS+ (antidiagonal)"."""
    fallback = f"{'PBS' if config.permute else 'unpermuted'} ({config.selector})"
    return _METHOD_NAMES.get((config.permute, config.selector), fallback)


@dataclasses.dataclass(frozen=True)
class PrefillRun:
    """One measured prefill: best timed seconds, every position's logits ``[T, V]`` float32,
    block density per layer ``[L]``, and the greedy token ids decoded after it."""

    seconds: float
    logits: jax.Array
    density: np.ndarray
    new_ids: list[int]


class LogitComparison(NamedTuple):
    """A prefill's logits against the dense prefill's: relative L2 error at the last position
    and over all positions, and the share of positions whose argmax token agrees."""

    error_last: float
    error_all: float
    agreement: float


def compare_logits(logits, reference) -> LogitComparison:
    """logits, reference ``[T, V]`` → their :class:`LogitComparison` (the library's ``rel_err``
    and ``argmax_agreement``, on the arrays' device)."""
    return LogitComparison(
        error_last=rel_err(logits[-1], reference[-1]),
        error_all=rel_err(logits, reference),
        agreement=argmax_agreement(logits, reference),
    )


def format_table(header: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> str:
    """Three columns as plain text: the first left-aligned, the others right-aligned, a dashed
    line under the header."""
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def first_difference(a: list[int], b: list[int]) -> int | None:
    """0-based index of the first position where ``a`` and ``b`` differ; None if they agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def continuation_summary(full_ids: list[int], sparse_ids: list[int]) -> str:
    """One line: how many greedy tokens agree before the continuations part (tokens counted
    from 1). After the first difference the two continue different texts, so later positions
    are not compared."""
    total = len(full_ids)
    first = first_difference(full_ids, sparse_ids)
    if first is None:
        return f"greedy continuations agree on all {total} tokens"
    return (
        f"greedy continuations agree on the first {first} of {total} tokens; "
        f"first difference at token {first + 1}"
    )


def format_side_by_side(tokenizer, full_ids, sparse_ids, label: str) -> str:
    """Token by token (numbered from 1), the first difference marked, then both texts."""
    pieces = lambda ids: [repr(tokenizer.decode([i])) for i in ids]
    full_pieces, sparse_pieces = pieces(full_ids), pieces(sparse_ids)
    width = max([len("full")] + [len(p) for p in full_pieces])
    first = first_difference(full_ids, sparse_ids)
    lines = [f"  #  {'full'.ljust(width)}  {label}"]
    for i, (a, b) in enumerate(zip(full_pieces, sparse_pieces)):
        mark = "   <- first difference" if i == first else ""
        lines.append(f"{i + 1:3d}  {a.ljust(width)}  {b}{mark}")
    name_width = max(len("full"), len(label))
    lines.append(f"{'full'.ljust(name_width)}: {tokenizer.decode(full_ids)!r}")
    lines.append(f"{label.ljust(name_width)}: {tokenizer.decode(sparse_ids)!r}")
    return "\n".join(lines)


def comparison_rows(
    length: int,
    repeats: int,
    full: PrefillRun,
    sparse: PrefillRun,
    comparison: LogitComparison,
    on_cpu: bool,
) -> list[tuple[str, str, str]]:
    """The table's rows (quantity, full, sparse); no speed-up row on a CPU, where the times
    measure the exact reference, not sparsity."""
    rows = [
        ("tokens", str(length), str(length)),
        (
            "block density (mean over layers; dense = 1)",
            f"{full.density.mean():.3f}",
            f"{sparse.density.mean():.3f}",
        ),
        ("rel. logit error, last position", "0", f"{comparison.error_last:.2e}"),
        ("rel. logit error, all positions", "0", f"{comparison.error_all:.2e}"),
        ("next-token agreement (argmax, all positions)", "1.000", f"{comparison.agreement:.3f}"),
        (
            f"prefill time, s (jitted, best of {repeats})",
            f"{full.seconds:.3f}",
            f"{sparse.seconds:.3f}",
        ),
    ]
    if not on_cpu:
        rows.append(("prefill speed-up vs full", "1.00x", f"{full.seconds / sparse.seconds:.2f}x"))
    return rows


def format_report(
    plan: Plan,
    config: LlamaConfig,
    device: str,
    length: int,
    full: PrefillRun,
    sparse: PrefillRun,
    comparison: LogitComparison,
    tokenizer,
    on_cpu: bool,
) -> str:
    """Everything pbs-prefill prints on stdout: the run's model, text and PBS settings, the
    comparison table, the per-layer density, the notes, then the greedy continuations side by
    side and their one-line summary. ``device``: "platform:kind"."""
    label = method_label(plan.pbs_config)
    cfg = plan.pbs_config
    dense_layers = f", dense layers {list(plan.dense_layers)}" if plan.dense_layers else ""
    if plan.chunk_size is not None:
        dense_layers += f", both prefills in chunks of {plan.chunk_size} tokens"
    lines = [
        "",
        f"model: {plan.model_name} "
        f"[{config.num_layers} layers, {config.num_heads}/{config.num_kv_heads} heads], "
        f"{plan.dtype.name}, on {device}",
        f"text:  {plan.text_path}",
        f"{label}: block {cfg.block_size}, segment {cfg.segment_size}, threshold "
        f"{cfg.threshold}, dense tail {cfg.dense_tail}, proxy blocks {cfg.proxy_blocks}, "
        f"gqa {cfg.gqa}, permute {cfg.permute}, selector {cfg.selector}, "
        f"sink {cfg.force_sink}, impl {plan.impl}{dense_layers}",
        "",
        format_table(
            ("", "full", label),
            comparison_rows(length, plan.repeats, full, sparse, comparison, on_cpu),
        ),
        f"per-layer density ({label}): " + " ".join(f"{d:.2f}" for d in sparse.density),
        textwrap.fill(f"Block {DENSITY_NOTE}", width=100),
    ]
    if on_cpu:
        lines.append(textwrap.fill(f"{CPU_TIMING_NOTE}.", width=100))
    if plan.new_tokens > 0:
        lines += [
            "",
            f"first {plan.new_tokens} greedy tokens after each prefill (dense decode):",
            format_side_by_side(tokenizer, full.new_ids, sparse.new_ids, label),
            continuation_summary(full.new_ids, sparse.new_ids),
        ]
    return "\n".join(lines)


def summary_record(
    plan: Plan,
    device: str,
    length: int,
    full: PrefillRun,
    sparse: PrefillRun,
    comparison: LogitComparison,
    tokenizer,
    on_cpu: bool,
) -> dict:
    """Every number of the run and its settings, JSON-ready (what ``--json`` writes)."""
    first = first_difference(full.new_ids, sparse.new_ids)
    return dict(
        model=plan.model_path if plan.model_given else plan.model_name,
        text=plan.text_path,
        tokens=length,
        dtype=plan.dtype.name,
        device=device,
        method=method_label(plan.pbs_config),
        pbs=dataclasses.asdict(plan.pbs_config),
        dense_layers=list(plan.dense_layers),
        chunk_size=plan.chunk_size,
        impl=plan.impl,
        warmup=plan.warmup,
        repeats=plan.repeats,
        full_seconds=full.seconds,
        pbs_seconds=sparse.seconds,
        speedup=full.seconds / sparse.seconds,
        timing_note=CPU_TIMING_NOTE if on_cpu else None,
        density_mean=float(sparse.density.mean()),
        density_per_layer=[float(d) for d in sparse.density],
        density_definition=DENSITY_NOTE,
        rel_logit_error_last=comparison.error_last,
        rel_logit_error_all=comparison.error_all,
        next_token_agreement=comparison.agreement,
        full_new_tokens=full.new_ids,
        pbs_new_tokens=sparse.new_ids,
        continuation_agreeing_tokens=len(full.new_ids) if first is None else first,
        continuation_first_difference=None if first is None else first + 1,
        full_text=tokenizer.decode(full.new_ids),
        pbs_text=tokenizer.decode(sparse.new_ids),
    )
