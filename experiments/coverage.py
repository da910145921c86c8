"""pbs-coverage: PBS-Attn against block-sparse baselines on a real model (SmolLM2-135M, CPU).

For each length (2K, 4K, 8K) and each evaluation sequence (a real long text with retrieval
needles planted in its first 60 % and the retrieval questions after it):

1. one full-attention prefill that also captures every layer's q and k (after RoPE): the
   reference perplexity, retrieval answers and greedy continuation, and the exact attention
   probabilities for the **coverage pass**: for every method and threshold, the block mask of
   every layer and head, its density, and the fraction of each (sampled) query's true attention
   mass inside the selected blocks;
2. sparse prefills (``impl="reference"``) of the same sequence for chosen methods and
   thresholds: perplexity of the text's last quarter against full, KL(full ‖ method),
   next-token agreement, retrieval answers (teacher-forced) and the first greedy tokens.

Methods (experiments/lib/specs.py, all through ``pbs_jax``, the same reference attention and
forced blocks): PBS (mean-pool selector, permuted keys), MeanPooling (same selector, no
permutation), Antidiagonal (XAttention-style stride-8 anti-diagonal scoring, no permutation),
PBS+ (anti-diagonal scoring on permuted keys), and the static sink + local window at matched
density.

    python -m experiments.coverage              # the full study (about 25 min on 2 CPU cores)
    python -m experiments.coverage --quick      # a 1K-token smoke run (about 1 min; CI)
    python -m experiments.coverage --report-only experiments/results/coverage.json

Results: ``<out>/coverage.{json,md}`` and ``<out>/coverage_*.png`` (``coverage_quick*`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import jax
from tqdm import tqdm

from experiments.lib import coverage_report
from experiments.lib import coverage_results as results
from experiments.lib.coverage_study import (
    COVERAGE_THRESHOLDS,
    SWEEP_THRESHOLDS,
    Settings,
    block_map,
    evaluate_length,
)
from experiments.lib.forward import load_runner
from experiments.lib.probes import load_texts
from experiments.lib.report import RESULTS_DIR, json_text, rounded
from experiments.lib.specs import METHOD_BY_KEY, METHODS
from experiments.lib.timing import stamp
from models import JittedLlama, Tokenizer
from pbs_jax import PBSConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbs-coverage",
        description=(
            "Coverage and accuracy of PBS-Attn against block-sparse baselines (MeanPooling, "
            "XAttention-style anti-diagonal scoring, PBS+ = anti-diagonal on permuted keys, "
            "static sink + local window) on SmolLM2-135M: coverage-density curves from the exact "
            "attention of a full-attention prefill, and perplexity / KL / next-token agreement / "
            "retrieval / greedy continuations of sparse prefills, with plots, a markdown table "
            "and JSON."
        ),
        epilog="Thresholded methods get a sparse prefill at every --sweep-thresholds value on "
        "the --sweep-lengths; on the --bracket-lengths at τ=0.9 and at the two "
        "coverage-grid thresholds whose density brackets PBS's τ=0.9 density (so every "
        "method can be interpolated at PBS's density); elsewhere at τ=0.9 only. Sink + "
        "local runs with the window matching PBS's density at each PBS threshold run.",
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="smoke run: 1024 tokens, one text, coverage "
        "thresholds 0.5/0.9/1.0, every 3rd layer for coverage, 2 probes per task, PBS swept at "
        "0.5/0.9 and the other methods at 0.9, 8 greedy tokens (about a minute)",
    )
    add("--out", default=None, metavar="DIR", help=f"output folder (default: {RESULTS_DIR})")
    add(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths in tokens (default: 2048 4096 8192)",
    )
    add(
        "--texts-at",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="texts evaluated at each length, in --lengths order (default: 2 2 1: both texts "
        "at 2K and 4K, the prose text at 8K)",
    )
    add(
        "--thresholds",
        type=float,
        nargs="+",
        default=None,
        help=f"coverage-pass thresholds (default: {' '.join(map(str, COVERAGE_THRESHOLDS))})",
    )
    add(
        "--sweep-lengths",
        type=int,
        nargs="*",
        default=None,
        help="lengths with a sparse prefill at every sweep threshold (default: 2048)",
    )
    add(
        "--sweep-thresholds",
        type=float,
        nargs="+",
        default=None,
        help=f"default: {' '.join(map(str, SWEEP_THRESHOLDS))}",
    )
    add(
        "--sweep-methods",
        nargs="+",
        default=None,
        choices=[m.key for m in METHODS],
        help="methods swept on the --sweep-lengths (default: all); the others run at τ=0.9 there",
    )
    add(
        "--bracket-lengths",
        type=int,
        nargs="*",
        default=None,
        help="lengths with sparse prefills bracketing PBS's τ=0.9 density (default: 4096)",
    )
    add(
        "--coverage-query-blocks",
        type=int,
        default=8,
        help="query blocks sampled per sequence for coverage (default: 8)",
    )
    add(
        "--coverage-layer-stride",
        type=int,
        default=None,
        help="coverage on every k-th layer (default: 1; 3 with --quick)",
    )
    add(
        "--probes-per-task",
        type=int,
        default=None,
        help="retrieval probes per task and "
        "sequence (default: length/1024, at least 3; 2 with --quick)",
    )
    add(
        "--new-tokens",
        type=int,
        default=None,
        help="greedy tokens decoded after each prefill (default: 32; 8 with --quick)",
    )
    add(
        "--model",
        default=None,
        metavar="PATH",
        help="checkpoint (.gguf or HF folder); default: SmolLM2-135M-Instruct",
    )
    add("--seed", type=int, default=0, help="needle placement seed")
    add(
        "--report-only",
        "--report",
        default=None,
        metavar="JSON",
        help="re-render the tables, plots and markdown from the results JSON of an earlier run "
        "(into --out), running no model",
    )
    return parser


def settings_from_args(args) -> Settings:
    """The plan of this invocation: ``--quick`` changes every default."""
    quick = args.quick
    lengths = args.lengths or ([1024] if quick else [2048, 4096, 8192])
    texts_at = args.texts_at or (
        [1] * len(lengths) if quick else [2 if n <= 4096 else 1 for n in lengths]
    )
    if len(texts_at) != len(lengths):
        raise SystemExit("--texts-at needs one count per length")

    def pick(quick_value, full_value):
        return quick_value if quick else full_value

    def given_or(given, quick_value, full_value):  # an empty list or 0 given is a choice
        return given if given is not None else pick(quick_value, full_value)

    return Settings(
        lengths=tuple(lengths),
        texts_at=dict(zip(lengths, texts_at)),
        thresholds=tuple(args.thresholds or pick((0.5, 0.9, 1.0), COVERAGE_THRESHOLDS)),
        sweep_lengths=frozenset(given_or(args.sweep_lengths, lengths, [2048])),
        sweep_methods=frozenset(args.sweep_methods or pick(["pbs"], list(METHOD_BY_KEY))),
        sweep_thresholds=tuple(args.sweep_thresholds or pick((0.5, 0.9), SWEEP_THRESHOLDS)),
        bracket_lengths=frozenset(given_or(args.bracket_lengths, [], [4096])),
        layer_stride=args.coverage_layer_stride or pick(3, 1),
        query_blocks=args.coverage_query_blocks,
        probes_per_task=args.probes_per_task,
        new_tokens=given_or(args.new_tokens, 8, 32),
        seed=args.seed,
        quick=quick,
    )


def write_report(summary: results.CoverageSummary, out: pathlib.Path, prefix: str):
    """Plots, ``<prefix>.json`` and ``<prefix>.md`` from a summary; prints the headline."""
    summary = dataclasses.replace(summary, plots=coverage_report.make_plots(summary, out, prefix))
    (out / f"{prefix}.json").write_text(json_text(rounded(summary.to_json())))
    coverage_report.write_markdown(summary, out / f"{prefix}.md")
    print(coverage_report.headline_text(summary))
    return summary


def run(
    argv: list[str] | None = None, model: tuple[JittedLlama, Tokenizer] | None = None
) -> results.CoverageSummary:
    """Run the study; write ``<out>/<prefix>.{json,md}`` and the plots; return the summary.

    ``model``: the checkpoint already loaded as (runner, tokenizer), e.g. one model shared by
    the tests; ``--model`` (or the default checkpoint) is loaded when None.
    """
    args = build_parser().parse_args(argv)
    if args.report_only:
        path = pathlib.Path(args.report_only)
        out = pathlib.Path(args.out) if args.out else RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        summary = results.CoverageSummary.from_json(json.loads(path.read_text()))
        return write_report(summary, out, path.stem)
    settings = settings_from_args(args)
    out = pathlib.Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    runner, tokenizer = model or load_runner(args.model)
    config = runner.config
    texts = load_texts()
    layers = list(range(0, config.num_layers, settings.layer_stride))
    # One progress step per prefill (full or sparse) and per coverage pass; the sparse
    # prefills of a length are only known after its coverage pass, so the total is refined.
    progress = tqdm(
        total=sum(2 * settings.texts_at[n] for n in settings.lengths),
        desc="coverage",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    lengths, last_map = {}, None
    for n in settings.lengths:
        result, captured_last = evaluate_length(
            runner, tokenizer, texts, n, settings, layers, progress
        )
        lengths[str(n)] = result
        if n == settings.lengths[-1]:
            last_map = block_map(captured_last, result.coverage)
        del captured_last
    progress.close()

    provenance = stamp()
    if jax.default_backend() == "cpu":
        provenance["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    summary = results.CoverageSummary(
        **provenance,
        quick=args.quick,
        model=args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        model_shape=f"{config.num_layers} layers, {config.num_heads} query / "
        f"{config.num_kv_heads} KV heads, head dim {config.head_dim}",
        block_size=PBSConfig.block_size,
        segment_size=PBSConfig.segment_size,
        texts={k: v[0] for k, v in texts.items()},
        coverage_layers="all" if settings.layer_stride == 1 else layers,
        coverage_query_blocks=args.coverage_query_blocks,
        lengths=lengths,
        block_map=last_map,
        runtime_s=time.perf_counter() - started,
        headline=results.headline(lengths),
        plots=[],
    )
    return write_report(summary, out, "coverage_quick" if args.quick else "coverage")


def main(argv: list[str] | None = None) -> results.CoverageSummary:
    """Console entry point; returns the summary (also written to JSON)."""
    return run(argv)


if __name__ == "__main__":
    main()
