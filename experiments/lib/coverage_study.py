"""The coverage study's measurements (experiments/coverage.py is its command line): the study
plan, the sparse prefills chosen from the coverage curves, everything measured at one length,
and the block map of one head."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import pbs_jax
from experiments.lib import attention_mass as mass
from experiments.lib import coverage_results as results
from experiments.lib.forward import run_forward
from experiments.lib.metrics import forward_metrics, retained, task_accuracy
from experiments.lib.probes import build_sequence
from experiments.lib.specs import (
    METHOD_BY_KEY,
    METHODS,
    SINK_LOCAL,
    CaptureAttention,
    attention_for,
)
from pbs_jax import PBSConfig

# The block map's plans, jitted: called op by op, every primitive of the plan compiles on its
# own (seconds of compile for one [1, N, H, D] plan on CPU, against one program here).
_jit_plan = jax.jit(pbs_jax.pbs_plan, static_argnums=2)

COVERAGE_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0)
SWEEP_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
ERROR_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)  # coverage-pass thresholds with output error
HEADLINE_THRESHOLD = results.HEADLINE_THRESHOLD


@dataclasses.dataclass(frozen=True)
class Settings:
    """The study's plan (experiments/coverage.py resolves it from the command line).

    lengths: sequence lengths; texts_at: texts evaluated per length; thresholds: the coverage
    grid; sweep_*: every sweep threshold is run for the sweep methods on the sweep lengths;
    bracket_lengths: lengths where the other methods run at the two grid thresholds bracketing
    PBS's τ=0.9 density; layer_stride: coverage on every k-th layer; query_blocks: query blocks
    sampled for coverage; probes_per_task: None for length/1024 (at least 3; 2 when quick).
    """

    lengths: tuple[int, ...]
    texts_at: dict[int, int]
    thresholds: tuple[float, ...]
    sweep_lengths: frozenset[int]
    sweep_methods: frozenset[str]
    sweep_thresholds: tuple[float, ...]
    bracket_lengths: frozenset[int]
    layer_stride: int
    query_blocks: int
    probes_per_task: int | None
    new_tokens: int
    seed: int
    quick: bool

    def per_task(self, n: int) -> int:
        return self.probes_per_task or (2 if self.quick else max(3, n // 1024))


def choose_forwards(n: int, settings: Settings, coverage: results.CoverageCurves) -> list[tuple]:
    """(method, threshold, window) sparse prefills at length n, from the coverage curves."""
    thresholds = coverage.thresholds
    t = pbs_jax.num_blocks(n, PBSConfig.block_size)
    pbs_density = dict(zip(thresholds, coverage.methods["pbs"].density))
    headline = HEADLINE_THRESHOLD if HEADLINE_THRESHOLD in pbs_density else thresholds[0]
    runs = [(m.key, headline, 0) for m in METHODS]
    targets = [pbs_density[headline]]
    if n in settings.sweep_lengths:
        for m in METHODS:
            if m.key in settings.sweep_methods:
                runs += [(m.key, tau, 0) for tau in settings.sweep_thresholds]
        if "pbs" in settings.sweep_methods:
            targets += [pbs_density[tau] for tau in settings.sweep_thresholds if tau in pbs_density]
    elif n in settings.bracket_lengths:
        for m in METHODS[1:]:  # the grid thresholds just below and just above the target
            dens = np.array(coverage.methods[m.key].density)
            below, above = dens <= targets[0], dens > targets[0]
            if below.any():
                runs.append((m.key, thresholds[int(np.argmax(np.where(below, dens, -1)))], 0))
            if above.any():
                runs.append((m.key, thresholds[int(np.argmin(np.where(above, dens, 9)))], 0))
    windows = sorted({pbs_jax.sink_local_window(t, d) for d in targets})
    runs += [(SINK_LOCAL, None, w) for w in windows]
    return list(dict.fromkeys(runs))  # unique, in order


def evaluate_length(runner, tokenizer, texts, n, settings: Settings, layers, progress):
    """Everything measured at one length: the full prefills with the coverage pass, then the
    sparse prefills chosen from the coverage curves. Returns (the length's LengthResult, the
    last sequence and its captured q/k/v, for the block map)."""
    per_task, new_tokens = settings.per_task(n), settings.new_tokens
    sequences = [
        build_sequence(
            tokenizer, name, texts[name][1], n, per_task, seed=settings.seed + 1000 * i + n
        )
        for i, name in enumerate(list(texts)[: settings.texts_at[n]])
    ]
    plan = mass.CoveragePlan(
        mass.sampled_query_rows(n, PBSConfig.block_size, settings.query_blocks),
        METHODS,
        settings.thresholds,
        tuple(range(1, pbs_jax.num_blocks(n, PBSConfig.block_size) + 1)),
        tuple(t for t in settings.thresholds if t in ERROR_THRESHOLDS),
    )
    full, full_logits, coverage_runs, captured_last = {}, {}, [], None
    for seq in sequences:
        progress.set_postfix_str(f"{n} tokens, {seq.text}: full prefill + capture")
        logits, continuation, captured = run_forward(runner, seq, CaptureAttention(), new_tokens)
        full_logits[seq.text] = logits
        full[seq.text] = forward_metrics(seq, logits, logits, continuation, continuation)
        progress.update()
        progress.set_postfix_str(f"{n} tokens, {seq.text}: coverage of {len(layers)} layers")
        coverage_runs.append(mass.sequence_coverage(captured, plan, layers))
        captured_last = (seq, captured)
        progress.update()
    coverage = results.coverage_curves(
        *(np.mean(runs, axis=0) for runs in zip(*coverage_runs)), plan, layers
    )

    runs = choose_forwards(n, settings, coverage)
    progress.total += len(runs) * len(sequences)
    progress.refresh()
    measured = []  # (method, threshold, window, text, density [L], ForwardMetrics)
    for seq in sequences:
        for method, threshold, window in runs:
            setting = f"W={window}" if window else f"τ={threshold}"
            progress.set_postfix_str(f"{n} tokens, {seq.text}: {method} {setting}")
            logits, continuation, density = run_forward(
                runner, seq, attention_for(method, threshold, window), new_tokens
            )
            reference = full[seq.text]
            metrics = forward_metrics(
                seq, logits, full_logits[seq.text], continuation, reference.continuation
            )
            measured.append((method, threshold, window, seq.text, np.asarray(density), metrics))
            progress.update()

    retrieval_full = task_accuracy([f.answers for f in full.values()])
    kept = [t for t, acc in retrieval_full.items() if acc.accuracy >= results.MIN_FULL_ACCURACY]
    forwards = [
        results.SparseRun(
            method, threshold, window, text, float(density.mean()), density.tolist(),
            **dataclasses.asdict(m),
            ppl_delta_pct=100.0 * (m.ppl / full[text].ppl - 1.0),
            retrieval=retained(m.answers, full[text].answers, kept),
        )
        for method, threshold, window, text, density, m in measured
    ]  # fmt: skip
    result = results.LengthResult(
        sequences=[results.SequenceRecord.of(s) for s in sequences],
        full=full,
        retrieval_full=retrieval_full,
        kept_tasks=kept,
        coverage=coverage,
        forwards=forwards,
        runs=[list(r) for r in runs],
    )
    return results.summarize_length(result), captured_last


def block_map(captured_last, coverage: results.CoverageCurves) -> results.BlockMap | None:
    """The paper's Fig. 3 for one layer and head of the last sequence: block attention mass
    with unpermuted keys (MeanPooling's blocks) and with PBS's permutation (PBS's blocks).

    The head: the largest MeanPooling − PBS density gap at τ=0.9 among (layer, head) pairs
    where PBS keeps at least MeanPooling's coverage (coverage-pass numbers).
    """
    seq, captured = captured_last
    if HEADLINE_THRESHOLD not in coverage.thresholds:
        return None
    i = coverage.thresholds.index(HEADLINE_THRESHOLD)
    by_head = lambda key, what: np.array(getattr(coverage.methods[key], what))[:, i]  # noqa: E731
    gap = by_head("meanpool", "density_by_layer_head") - by_head("pbs", "density_by_layer_head")
    ok = (
        by_head("pbs", "coverage_by_layer_head")
        >= by_head("meanpool", "coverage_by_layer_head") - 1e-3
    )
    gap = np.where(ok, gap, -np.inf)  # [layers, Hq]
    layer_index, head = np.unravel_index(np.argmax(gap), gap.shape)
    layer = coverage.layers[layer_index]
    q, k = captured["q"][layer], captured["k"][layer]  # [1, N, H, D]
    maps = {}
    for key in ("meanpool", "pbs"):
        cfg = METHOD_BY_KEY[key].config(HEADLINE_THRESHOLD)
        perm, mask, _ = _jit_plan(q, k, cfg)
        head_perm = perm[0, head // (q.shape[2] // perm.shape[1])]
        block_mass = np.asarray(
            mass.block_attention_map(q[0], k[0], head_perm, int(head), cfg.block_size)
        )
        head_mask = np.asarray(mask[0, head])
        maps[key] = results.HeadMap(
            density=float(pbs_jax.density(mask[:, head : head + 1])[0, 0]),
            coverage=float(block_mass[head_mask].sum()),
            mass=block_mass.tolist(),
            mask=head_mask.astype(int).tolist(),
        )
    return results.BlockMap(len(seq.tokens), seq.text, int(layer), int(head), **maps)
