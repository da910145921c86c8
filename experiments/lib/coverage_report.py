"""The coverage study's report: the markdown tables and the four figures, rendered from a
:class:`~experiments.lib.coverage_results.CoverageSummary` alone (no model)."""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.lib.coverage_results import (
    CURVE_KEYS,
    EQUAL_COVERAGE,
    HEADLINE_THRESHOLD,
    MIN_FULL_ACCURACY,
    CoverageSummary,
    matched_output_error_by_layer,
    runs_by_method,
)
from experiments.lib.report import fmt, pyplot, save_figure
from experiments.lib.specs import LABELS, METHODS, SINK_LOCAL

COLORS = {"pbs": "C3", "meanpool": "C0", "antidiagonal": "C2", "pbs_plus": "C1", SINK_LOCAL: "C7"}


def score(answers: dict) -> str:
    """``correct/total`` over every task's probes."""
    flat = [a for v in answers.values() for a in v]
    return f"{sum(flat)}/{len(flat)}"


def headline_text(s: CoverageSummary) -> str:
    """The run time, then one line per length: what the README quotes."""
    lines = [f"coverage study done in {s.runtime_s / 60:.1f} min"]
    for n, h in s.headline.items():
        lines.append(
            f"{n} tokens: PBS τ=0.9 density {fmt(h.pbs_tau09_density)}, ppl Δ "
            f"{fmt(h.pbs_tau09_ppl_delta_pct, '+.2f')} %, retrieval retained "
            f"{fmt(h.pbs_tau09_retrieval_retained, '.0%')}, greedy identical "
            f"{fmt(h.pbs_tau09_greedy_match, '.0%')}; blocks saved vs MeanPooling: "
            f"{fmt(h.equal_coverage_block_saving_pbs_vs_meanpool, '+.1%')} at "
            f"{EQUAL_COVERAGE:.0%} coverage, "
            f"{fmt(h.tau09_block_saving_pbs_vs_meanpool, '+.1%')} at τ=0.9; "
            f"kept tasks: {', '.join(h.kept_tasks) or 'none'}"
        )
    return "\n".join(lines)


def _introduction(s: CoverageSummary) -> list[str]:
    layers = "" if s.coverage_layers == "all" else " in " + str(s.coverage_layers)
    return [
        "# Coverage and accuracy on a real model: PBS vs block-sparse baselines",
        "",
        f"Made by `python -m experiments.coverage{' --quick' if s.quick else ''}` "
        f"({s.runtime_s / 60:.1f} min) on {s.device}, jax {s.jax}, {s.date}. "
        f"Model: {s.model} ({s.model_shape}), float32. PBSConfig defaults: block "
        f"{s.block_size}, segment {s.segment_size}, GQA replicate; sparse prefills use "
        '`impl="reference"`; decoding is dense.',
        "",
        "Sequences: a real text with retrieval needles planted at 5–60 % depth, then the "
        "questions (teacher-forced answers). Texts: "
        + "; ".join(f"`{k}` = {v}" for k, v in s.texts.items())
        + ".",
        f"Coverage = fraction of a query's exact attention mass (full-attention forward, every "
        f"layer{layers}) inside its computed blocks, averaged over heads and over queries "
        f"sampled as whole query blocks (at most {s.coverage_query_blocks} blocks, evenly "
        "spaced, ending at the last); density = computed blocks / causal blocks; output error = "
        "relative error ‖o_sparse − o‖/‖o‖ of those queries' attention outputs when only the "
        "selected blocks are computed (same q/k/v, one layer at a time). Perplexity (ppl) on the "
        "last quarter of the text, KL(full ‖ method) and next-token agreement over the same "
        "positions; retrieval = share of the probes full attention answers that the method "
        "still answers (kept tasks only).",
        "",
        "## Headline",
        "",
        *(f"- {line}" for line in headline_text(s).splitlines()[1:]),
    ]


def _coverage_tables(s: CoverageSummary) -> list[str]:
    lines = [
        "",
        f"## Retrieval tasks kept (full-attention accuracy ≥ {MIN_FULL_ACCURACY:.0%})",
        "",
        "| length | passkey | kv | copy | kept |",
        "|---|---|---|---|---|",
    ]
    for n, r in s.lengths.items():
        acc = r.retrieval_full
        lines.append(
            f"| {n} | "
            + " | ".join(
                f"{acc[t].accuracy:.0%} ({acc[t].probes})" if t in acc else "—"
                for t in ("passkey", "kv", "copy")
            )
            + f" | {', '.join(r.kept_tasks) or 'none'} |"
        )
    lines += [
        "",
        "## Matched density (each method's curve interpolated at PBS's density at "
        f"τ={HEADLINE_THRESHOLD})",
        "",
        "| length | method | density | coverage | output error | ppl Δ vs full | KL | retrieval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in s.lengths.items():
        md = r.matched_density
        for key, row in md.methods.items():
            ppl = row.ppl_delta_pct
            lines.append(
                f"| {n} | {LABELS[key]} | {fmt(md.density)} | {fmt(row.coverage, '.4f')} | "
                f"{fmt(row.output_error, '.4f')} | "
                f"{fmt(ppl, '+.2f')}{'' if ppl is None else ' %'} | "
                f"{fmt(row.kl, '.4f')} | {fmt(row.retrieval, '.0%')} |"
            )
    lines += [
        "",
        "— : the method's runs do not reach that density (no interpolation outside "
        "the measured range).",
        "",
        "Layers where PBS's attention-output error at the matched density exceeds "
        "MeanPooling's (PBS / MeanPooling / Antidiagonal, heads averaged):",
        "",
    ]
    for n, r in s.lengths.items():
        matched = matched_output_error_by_layer(r)
        worse = [
            (layer, p, b, a)
            for layer, p, b, a in zip(
                r.coverage.layers, matched["pbs"], matched["meanpool"], matched["antidiagonal"]
            )
            if None not in (p, b) and p > b
        ]
        lines.append(
            f"- {n}: "
            + (
                ", ".join(
                    f"layer {layer} ({p:.3f} / {b:.3f} / {fmt(a)})" for layer, p, b, a in worse
                )
                or "none"
            )
        )
    lines += [
        "",
        f"## At threshold τ={HEADLINE_THRESHOLD} (coverage pass, full-attention q/k)",
        "",
        "| length | method | density | coverage | output error |",
        "|---|---|---|---|---|",
    ]
    for n, r in s.lengths.items():
        h = r.at_headline_threshold
        for m in METHODS if h else ():
            at = h.methods[m.key]
            lines.append(
                f"| {n} | {LABELS[m.key]} | {at.density:.3f} | {at.coverage:.4f} | "
                f"{fmt(at.output_error, '.4f')} |"
            )
    lines += [
        "",
        "Blocks PBS saves against MeanPooling at the same threshold: "
        + ", ".join(
            f"{n}: {fmt(r.at_headline_threshold.pbs_vs_meanpool_block_reduction, '+.1%')}"
            for n, r in s.lengths.items()
            if r.at_headline_threshold
        )
        + " (negative: PBS selects more). The two selectors' softmax domains differ (PBS: "
        "blocks of earlier segments only; MeanPooling: every causal block, the diagonal "
        "included), so one threshold is not one budget.",
        "",
        f"## Equal coverage ({EQUAL_COVERAGE:.0%}): density each method needs",
        "",
        "| length | "
        + " | ".join(LABELS[k] for k in CURVE_KEYS)
        + " | PBS vs MeanPooling | PBS+ vs Antidiagonal |",
        "|---|" + "---|" * (len(METHODS) + 3),
    ]
    for n, r in s.lengths.items():
        e = r.equal_coverage
        lines.append(
            f"| {n} | "
            + " | ".join(fmt(e.density[k]) for k in e.density)
            + f" | {fmt(e.pbs_vs_meanpool, '+.1%')} fewer blocks | "
            f"{fmt(e.pbs_plus_vs_antidiagonal, '+.1%')} fewer blocks |"
        )
    return lines


def _prefill_tables(s: CoverageSummary) -> list[str]:
    lines = [
        "",
        "(Paper, Llama-3.1-8B, τ=0.9: 10.7 % fewer blocks at 8K, 14.4 % at 128K.)",
        "",
        f"## PBS at τ={HEADLINE_THRESHOLD} against full attention",
        "",
        "| length | text | density | ppl full | ppl PBS | ppl Δ | KL | next-token "
        "agreement | retrieval (full → PBS) | first greedy tokens identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in s.lengths.items():
        for f in r.forwards:
            if f.method == "pbs" and f.threshold == HEADLINE_THRESHOLD:
                full = r.full[f.text]
                lines.append(
                    f"| {n} | {f.text} | {f.density:.3f} | {full.ppl:.3f} | {f.ppl:.3f} | "
                    f"{f.ppl_delta_pct:+.2f} % | {f.kl:.4f} | {f.agreement:.3f} | "
                    f"{score(full.answers)} → {score(f.answers)} | {f.greedy_match:.0%} |"
                )
    lines += [
        "",
        "## All sparse prefills",
        "",
        "| length | text | method | τ / window | density | ppl Δ | KL | agreement | "
        "retrieval retained | answers (all tasks; full) | greedy identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in s.lengths.items():
        for f in r.forwards:
            setting = f"W={f.window}" if f.window else f"{f.threshold}"
            lines.append(
                f"| {n} | {f.text} | {LABELS[f.method]} | {setting} | {f.density:.3f} | "
                f"{f.ppl_delta_pct:+.2f} % | {f.kl:.4f} | {f.agreement:.3f} | "
                f"{fmt(f.retrieval, '.0%')} | {score(f.answers)}; "
                f"{score(r.full[f.text].answers)} | {f.greedy_match:.0%} |"
            )
    if s.block_map:
        b = s.block_map
        lines += [
            "",
            "## Block map example",
            "",
            f"Length {b.length}, text `{b.text}`, layer {b.layer}, head {b.head} (the head with "
            f"the largest density saving of PBS over MeanPooling at τ={HEADLINE_THRESHOLD} "
            f"without losing coverage): MeanPooling density {b.meanpool.density:.3f} / coverage "
            f"{b.meanpool.coverage:.3f}; PBS density {b.pbs.density:.3f} / coverage "
            f"{b.pbs.coverage:.3f}. (Paper Fig. 3, Llama-3.1-8B at 8K: "
            "82.5 % → 32.3 % density, 91.7 % → 96.4 % coverage.)",
        ]
    return lines


def write_markdown(s: CoverageSummary, path: pathlib.Path) -> None:
    lines = _introduction(s) + _coverage_tables(s) + _prefill_tables(s)
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in s.plots), ""]
    path.write_text("\n".join(lines))


def make_plots(s: CoverageSummary, out: pathlib.Path, prefix: str) -> list[str]:
    """The four figures (three without a block map) as ``<prefix>_*.png``; their file names."""
    lengths = list(s.lengths)
    width = max(5.2 * len(lengths), 8.0)
    written = [
        _plot_coverage_density(s, lengths, width, out / f"{prefix}_coverage_density.png"),
        _plot_by_layer(s, lengths, width, out / f"{prefix}_density_by_layer.png"),
        _plot_vs_density(s, lengths, out / f"{prefix}_vs_density.png"),
    ]
    if s.block_map:
        written.append(_plot_block_map(s, out / f"{prefix}_block_map.png"))
    return written


def _plot_coverage_density(s, lengths, width, path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(lengths), figsize=(width, 8.2), squeeze=False)
    for col, n in enumerate(lengths):
        cov = s.lengths[n].coverage
        ax = axes[0][col]
        for key in CURVE_KEYS:
            ax.plot(
                cov.curve(key).density,
                cov.curve(key).coverage,
                marker="." if key == SINK_LOCAL else "o",
                ms=3 if key == SINK_LOCAL else 4,
                color=COLORS[key],
                label=LABELS[key],
                lw=1.3,
            )
        ax.axhline(EQUAL_COVERAGE, color="k", lw=0.5, ls=":")
        ax.set(
            title=f"{n} tokens",
            xlabel="block density (computed / causal)",
            ylabel="attention coverage",
            ylim=(max(0.5, ax.get_ylim()[0]), 1.005),
        )
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        for m in METHODS:
            ax.plot(
                cov.methods[m.key].output_error_density,
                cov.methods[m.key].output_error,
                marker="o",
                ms=4,
                color=COLORS[m.key],
                label=LABELS[m.key],
                lw=1.3,
            )
        ax.set(
            xlabel="block density (computed / causal)",
            yscale="log",
            ylabel="attention output error ‖o′−o‖/‖o‖",
        )
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Coverage (top) and attention-output error (bottom) vs density, thresholds "
        "swept (SmolLM2-135M, mean of layers × heads)"
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_by_layer(s, lengths, width, path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(4, len(lengths), figsize=(width, 13.5), squeeze=False, sharex=True)
    for col, n in enumerate(lengths):
        cov = s.lengths[n].coverage
        taus = cov.thresholds
        i = taus.index(HEADLINE_THRESHOLD) if HEADLINE_THRESHOLD in taus else -1
        e = cov.error_thresholds.index(taus[i]) if taus[i] in cov.error_thresholds else None
        for m in METHODS:
            curve = cov.methods[m.key]
            style = dict(marker="o", ms=3, color=COLORS[m.key], label=LABELS[m.key])
            axes[0][col].plot(cov.layers, curve.density_by_layer[i], **style)
            axes[1][col].plot(cov.layers, curve.coverage_by_layer[i], **style)
            if e is not None:
                axes[2][col].plot(cov.layers, curve.output_error_by_layer[e], **style)
        matched = matched_output_error_by_layer(s.lengths[n])
        for m in METHODS:
            axes[3][col].plot(
                cov.layers,
                [np.nan if x is None else x for x in matched[m.key]],
                marker="o",
                ms=3,
                color=COLORS[m.key],
            )
        target = s.lengths[n].matched_density.density
        axes[0][col].set(title=f"{n} tokens, τ={taus[i]}", ylabel="block density")
        axes[1][col].set(ylabel="attention coverage")
        axes[2][col].set(ylabel="attention output error", yscale="log")
        axes[3][col].set(
            xlabel="layer", yscale="log", ylabel=f"output error at density {fmt(target, '.2f')}"
        )
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "Per layer (heads averaged): density, coverage and output error at τ=0.9; "
        "bottom: output error at matched density (PBS's at τ=0.9)"
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_vs_density(s, lengths, path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    markers = dict(zip(lengths, "os^Dv"))
    for n in lengths:
        for key, points in runs_by_method(s.lengths[n].forwards).items():
            points = sorted(points)
            for ax, column in zip(axes, (1, 2, 3)):
                xs = [p[0] for p in points if p[column] is not None]
                ys = [p[column] for p in points if p[column] is not None]
                ax.plot(xs, ys, color=COLORS[key], marker=markers[n], ms=4, lw=0.9, alpha=0.85)
    for ax, label in zip(
        axes,
        (
            "perplexity Δ vs full (%)",
            "KL(full ‖ method), nats/token",
            "retrieval retained (kept tasks)",
        ),
    ):
        ax.set(xlabel="block density", ylabel=label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[1].set_yscale("log")
    axes[0].axhline(0, color="k", lw=0.5)
    handles = [
        plt.Line2D([], [], color=COLORS[k], marker="o", ls="", label=LABELS[k]) for k in COLORS
    ] + [
        plt.Line2D([], [], color="k", marker=markers[n], ls="", label=f"{n} tokens")
        for n in lengths
    ]
    axes[2].legend(handles=handles, fontsize=7)
    fig.suptitle(
        "Accuracy vs density: sparse prefills against the full-attention prefill "
        "(texts averaged; one line per method and length)"
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_block_map(s, path) -> str:
    import matplotlib

    plt = pyplot()
    info = s.block_map
    maps = {"meanpool": info.meanpool, "pbs": info.pbs}
    masses = {key: np.asarray(m.mass, np.float64) for key, m in maps.items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    vmax = max(float(m.max()) for m in masses.values())
    for ax, key in zip(axes, ("meanpool", "pbs")):
        mass = masses[key]
        masked = np.ma.masked_where(mass <= 0, mass)
        image = ax.imshow(
            masked,
            cmap="magma_r",
            norm=matplotlib.colors.LogNorm(vmin=vmax * 1e-4, vmax=vmax),
            interpolation="nearest",
        )
        skipped = ~np.asarray(maps[key].mask, bool) & (mass > 0)
        ax.imshow(
            np.ma.masked_where(~skipped, np.ones_like(mass)),
            alpha=0.8,
            cmap=matplotlib.colors.ListedColormap(["white"]),
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        title = "unpermuted keys, MeanPooling" if key == "meanpool" else "permuted keys (PBS)"
        ax.set(
            title=f"{title}\ndensity {maps[key].density:.1%}, coverage {maps[key].coverage:.1%}",
            xlabel="key block (slot order)",
            ylabel="query block",
        )
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention mass per block (log)")
    fig.suptitle(
        f"Layer {info.layer}, head {info.head}, {info.length} tokens "
        f"({info.text}): exact attention mass per block; blocks not selected "
        f"at τ={HEADLINE_THRESHOLD} faded"
    )
    return save_figure(fig, path)
