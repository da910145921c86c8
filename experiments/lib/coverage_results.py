"""The coverage study's results: frozen records of what one length measured (coverage curves,
full and sparse prefills) and what is derived from them (matched density, equal coverage, the
headline), with their JSON form (``to_json`` / ``from_json``: dicts only on disk).

The derived parts are pure functions of the measured ones (:func:`summarize_length`,
:func:`headline`), so a report can be re-rendered from the JSON alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from experiments.lib.attention_mass import CoveragePlan
from experiments.lib.metrics import (
    ForwardMetrics,
    TaskAccuracy,
    interpolate,
    mean_or_none,
    reduction,
)
from experiments.lib.probes import EvalSequence, Probe
from experiments.lib.specs import METHOD_BY_KEY, METHODS, SINK_LOCAL

HEADLINE_THRESHOLD = 0.9
EQUAL_COVERAGE = 0.95
MIN_FULL_ACCURACY = 0.5  # a retrieval task is kept at a length if full attention solves this much
CURVE_KEYS = tuple(m.key for m in METHODS) + (SINK_LOCAL,)


@dataclasses.dataclass(frozen=True)
class MethodCurve:
    """A thresholded method over the coverage thresholds τ (and the error thresholds τ_err).

    coverage, density: ``[τ]`` means over layers and heads; ``*_by_layer``: ``[τ][layers]``;
    ``*_by_layer_head``: ``[layers][τ][Hq]``; output_error, output_error_density: ``[τ_err]``;
    output_error_by_layer: ``[τ_err][layers]``.
    """

    coverage: list
    density: list
    coverage_by_layer: list
    density_by_layer: list
    coverage_by_layer_head: list
    density_by_layer_head: list
    output_error: list
    output_error_density: list
    output_error_by_layer: list


@dataclasses.dataclass(frozen=True)
class WindowCurve:
    """The sink + local window over every window size: coverage, density ``[windows]``."""

    coverage: list
    density: list


_CURVE_AXES = ("thresholds", "windows", "error_thresholds", "layers")


@dataclasses.dataclass(frozen=True)
class CoverageCurves:
    """Every method's coverage-pass curves at one length (sequences averaged)."""

    thresholds: list
    windows: list
    error_thresholds: list
    layers: list
    methods: dict[str, MethodCurve]
    sink_local: WindowCurve

    def curve(self, key: str) -> MethodCurve | WindowCurve:
        return self.sink_local if key == SINK_LOCAL else self.methods[key]

    def to_json(self) -> dict:
        return {
            **{axis: getattr(self, axis) for axis in _CURVE_AXES},
            **{key: dataclasses.asdict(curve) for key, curve in self.methods.items()},
            SINK_LOCAL: dataclasses.asdict(self.sink_local),
        }

    @classmethod
    def from_json(cls, d: dict) -> CoverageCurves:
        methods = {
            k: MethodCurve(**v) for k, v in d.items() if k not in _CURVE_AXES and k != SINK_LOCAL
        }
        return cls(
            **{a: d[a] for a in _CURVE_AXES},
            methods=methods,
            sink_local=WindowCurve(**d[SINK_LOCAL]),
        )


def coverage_curves(
    coverage: np.ndarray, density: np.ndarray, error: np.ndarray, plan: CoveragePlan, layers
) -> CoverageCurves:
    """Per-method curves from ``[layers, configs, Hq]`` arrays (configs ordered as
    :func:`~experiments.lib.attention_mass.layer_coverage` returns them)."""
    nt, ne = len(plan.thresholds), len(plan.error_thresholds)
    at_error = [plan.thresholds.index(t) for t in plan.error_thresholds]
    methods = {}
    for i, m in enumerate(plan.methods):
        c, d = coverage[:, i * nt : (i + 1) * nt], density[:, i * nt : (i + 1) * nt]
        e = error[:, i * ne : (i + 1) * ne]
        methods[m.key] = MethodCurve(
            coverage=c.mean(axis=(0, 2)).tolist(),
            density=d.mean(axis=(0, 2)).tolist(),
            coverage_by_layer=c.mean(axis=2).T.tolist(),
            density_by_layer=d.mean(axis=2).T.tolist(),
            coverage_by_layer_head=c.tolist(),
            density_by_layer_head=d.tolist(),
            output_error=e.mean(axis=(0, 2)).tolist(),
            output_error_density=d[:, at_error].mean(axis=(0, 2)).tolist(),
            output_error_by_layer=e.mean(axis=2).T.tolist(),
        )
    c, d = coverage[:, len(plan.methods) * nt :], density[:, len(plan.methods) * nt :]
    return CoverageCurves(
        list(plan.thresholds),
        list(plan.windows),
        list(plan.error_thresholds),
        list(layers),
        methods,
        WindowCurve(c.mean(axis=(0, 2)).tolist(), d.mean(axis=(0, 2)).tolist()),
    )


@dataclasses.dataclass(frozen=True)
class SparseRun:
    """One sparse prefill of one text: its setting (``threshold`` None and ``window`` > 0 for
    the sink + local window), its density (mean and ``[L]``), its :class:`ForwardMetrics`
    against the text's full prefill, and two derived numbers: the perplexity change in % and
    the retrieval retained (kept tasks)."""

    method: str
    threshold: float | None
    window: int
    text: str
    density: float
    density_by_layer: list
    ppl: float
    kl: float
    agreement: float
    rel_logit_error: float
    answers: dict
    continuation: list
    greedy_match: float
    ppl_delta_pct: float
    retrieval: float | None


@dataclasses.dataclass(frozen=True)
class SequenceRecord:
    """What was evaluated: the text, its length, where the text ends, the perplexity region
    ``[start, end)`` and the probes."""

    text: str
    tokens: int
    text_end: int
    ppl_positions: list
    probes: tuple[Probe, ...]

    @classmethod
    def of(cls, seq: EvalSequence) -> SequenceRecord:
        return cls(
            seq.text, len(seq.tokens), seq.text_end, [seq.ppl_start, seq.text_end], seq.probes
        )


@dataclasses.dataclass(frozen=True)
class MatchedRow:
    """One method interpolated at the matched density (None outside its measured range)."""

    coverage: float | None
    output_error: float | None
    ppl_delta_pct: float | None
    kl: float | None
    retrieval: float | None


@dataclasses.dataclass(frozen=True)
class MatchedDensity:
    density: float | None  # PBS's at τ = HEADLINE_THRESHOLD
    methods: dict[str, MatchedRow]


@dataclasses.dataclass(frozen=True)
class EqualCoverage:
    coverage: float
    density: dict[str, float | None]  # what each method needs for that coverage
    pbs_vs_meanpool: float | None  # relative block saving
    pbs_plus_vs_antidiagonal: float | None


@dataclasses.dataclass(frozen=True)
class CoverageAt:
    density: float
    coverage: float
    output_error: float | None


@dataclasses.dataclass(frozen=True)
class AtThreshold:
    """Every method at τ = HEADLINE_THRESHOLD in the coverage pass; on disk, the methods' keys
    sit beside the block reduction."""

    methods: dict[str, CoverageAt]
    pbs_vs_meanpool_block_reduction: float | None

    def to_json(self) -> dict:
        return {
            **{key: dataclasses.asdict(at) for key, at in self.methods.items()},
            "pbs_vs_meanpool_block_reduction": self.pbs_vs_meanpool_block_reduction,
        }


@dataclasses.dataclass(frozen=True)
class LengthResult:
    """Everything measured at one length, then what :func:`summarize_length` derives (None
    until then)."""

    sequences: list[SequenceRecord]
    full: dict[str, ForwardMetrics]
    retrieval_full: dict[str, TaskAccuracy]
    kept_tasks: list[str]
    coverage: CoverageCurves
    forwards: list[SparseRun]
    runs: list  # [(method, threshold, window)] of the sparse prefills
    matched_density: MatchedDensity | None = None
    equal_coverage: EqualCoverage | None = None
    at_headline_threshold: AtThreshold | None = None

    def to_json(self) -> dict:
        d = {
            "sequences": [dataclasses.asdict(s) for s in self.sequences],
            "full": {k: dataclasses.asdict(v) for k, v in self.full.items()},
            "retrieval_full": {k: dataclasses.asdict(v) for k, v in self.retrieval_full.items()},
            "kept_tasks": self.kept_tasks,
            "coverage": self.coverage.to_json(),
            "forwards": [dataclasses.asdict(f) for f in self.forwards],
            "runs": [list(r) for r in self.runs],
            "matched_density": dataclasses.asdict(self.matched_density),
            "equal_coverage": dataclasses.asdict(self.equal_coverage),
        }
        if self.at_headline_threshold is not None:
            d["at_headline_threshold"] = self.at_headline_threshold.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> LengthResult:
        """The measured parts only (derived ones are recomputed by :func:`summarize_length`)."""
        return cls(
            sequences=[
                SequenceRecord(**{**s, "probes": tuple(Probe(**p) for p in s["probes"])})
                for s in d["sequences"]
            ],
            full={k: ForwardMetrics(**v) for k, v in d["full"].items()},
            retrieval_full={k: TaskAccuracy(**v) for k, v in d["retrieval_full"].items()},
            kept_tasks=d["kept_tasks"],
            coverage=CoverageCurves.from_json(d["coverage"]),
            forwards=[SparseRun(**f) for f in d["forwards"]],
            runs=d["runs"],
        )


class RunPoint(NamedTuple):
    """A method's sparse prefills at one setting, texts averaged."""

    density: float
    ppl_delta_pct: float
    kl: float
    retrieval: float | None


def runs_by_method(forwards: list[SparseRun]) -> dict[str, list[RunPoint]]:
    """``{method: [RunPoint per threshold or window]}``, each averaged over the texts run with
    that setting."""
    groups = {}
    for f in forwards:
        groups.setdefault((f.method, f.threshold, f.window), []).append(f)
    points = {}
    for (method, _, _), fs in groups.items():
        points.setdefault(method, []).append(
            RunPoint(
                float(np.mean([f.density for f in fs])),
                float(np.mean([f.ppl_delta_pct for f in fs])),
                float(np.mean([f.kl for f in fs])),
                mean_or_none([f.retrieval for f in fs]),
            )
        )
    return points


def headline_runs(forwards: list[SparseRun]) -> list[SparseRun]:
    """PBS's sparse prefills at τ = HEADLINE_THRESHOLD."""
    return [f for f in forwards if f.method == "pbs" and f.threshold == HEADLINE_THRESHOLD]


def summarize_length(result: LengthResult) -> LengthResult:
    """``result`` with its matched-density, equal-coverage and at-threshold numbers."""
    cov = result.coverage
    thresholds = cov.thresholds
    target = (
        cov.methods["pbs"].density[thresholds.index(HEADLINE_THRESHOLD)]
        if HEADLINE_THRESHOLD in thresholds
        else None
    )
    # A sparse prefill counts as "at" a density within one sink + local window step of it
    # (about 2/(T+1): the window cannot land closer).
    step = 2.0 / (len(cov.windows) + 1)
    pbs_headline = headline_runs(result.forwards)
    if pbs_headline:  # the density PBS really ran at (its q/k differ slightly from full's)
        target = float(np.mean([f.density for f in pbs_headline]))
    points_by_method = runs_by_method(result.forwards)

    def at_target(xs, ys, tolerance=1e-9):
        return interpolate(xs, ys, target, tolerance) if target else None

    matched = {}
    for key in CURVE_KEYS:
        curve = cov.curve(key)
        errors = (
            (curve.output_error_density, curve.output_error)
            if isinstance(curve, MethodCurve)
            else ([], [])
        )
        points = points_by_method.get(key, [])
        xs = [p.density for p in points]
        matched[key] = MatchedRow(
            coverage=at_target(curve.density, curve.coverage),
            output_error=at_target(*errors),
            ppl_delta_pct=at_target(xs, [p.ppl_delta_pct for p in points], step),
            kl=at_target(xs, [p.kl for p in points], step),
            retrieval=at_target(xs, [p.retrieval for p in points], step),
        )
    equal = {
        key: interpolate(cov.curve(key).coverage, cov.curve(key).density, EQUAL_COVERAGE)
        for key in CURVE_KEYS
    }
    at_headline = None
    if HEADLINE_THRESHOLD in thresholds:
        i = thresholds.index(HEADLINE_THRESHOLD)
        e = (
            cov.error_thresholds.index(HEADLINE_THRESHOLD)
            if HEADLINE_THRESHOLD in cov.error_thresholds
            else None
        )
        at_headline = AtThreshold(
            {
                key: CoverageAt(
                    density=c.density[i],
                    coverage=c.coverage[i],
                    output_error=None if e is None else c.output_error[e],
                )
                for key, c in ((key, cov.methods[key]) for key in METHOD_BY_KEY)
            },
            reduction(cov.methods["meanpool"].density[i], cov.methods["pbs"].density[i]),
        )
    return dataclasses.replace(
        result,
        matched_density=MatchedDensity(target, matched),
        equal_coverage=EqualCoverage(
            EQUAL_COVERAGE,
            equal,
            reduction(equal["meanpool"], equal["pbs"]),
            reduction(equal["antidiagonal"], equal["pbs_plus"]),
        ),
        at_headline_threshold=at_headline,
    )


def matched_output_error_by_layer(result: LengthResult) -> dict[str, list]:
    """Each method's per-layer attention-output error interpolated at the matched density
    (PBS's at τ=0.9): ``{method: [error or None per coverage layer]}``."""
    cov, target = result.coverage, result.matched_density.density
    out = {}
    for m in METHODS:
        curve = cov.methods[m.key]
        by_layer = np.array(curve.output_error_by_layer)  # [error thresholds, layers]
        out[m.key] = [
            interpolate(curve.output_error_density, column, target) if target else None
            for column in by_layer.T
        ]
    return out


@dataclasses.dataclass(frozen=True)
class Headline:
    """The few numbers of one length that the README quotes."""

    equal_coverage_block_saving_pbs_vs_meanpool: float | None
    tau09_block_saving_pbs_vs_meanpool: float | None
    pbs_tau09_density: float | None
    pbs_tau09_ppl_delta_pct: float | None
    pbs_tau09_retrieval_retained: float | None
    pbs_tau09_greedy_match: float | None
    kept_tasks: list[str]


def headline(lengths: dict[str, LengthResult]) -> dict[str, Headline]:
    out = {}
    for n, r in lengths.items():
        pbs = headline_runs(r.forwards)
        at = r.at_headline_threshold
        out[n] = Headline(
            r.equal_coverage.pbs_vs_meanpool,
            at.pbs_vs_meanpool_block_reduction if at else None,
            mean_or_none([f.density for f in pbs]),
            mean_or_none([f.ppl_delta_pct for f in pbs]),
            mean_or_none([f.retrieval for f in pbs]),
            mean_or_none([f.greedy_match for f in pbs]),
            r.kept_tasks,
        )
    return out


@dataclasses.dataclass(frozen=True)
class HeadMap:
    """One head's block attention map under one method: density, coverage of all queries,
    mass ``[T][T]`` (exact, per block, / N) and the method's mask ``[T][T]`` (0/1)."""

    density: float
    coverage: float
    mass: list
    mask: list


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """The paper's Fig. 3 for one layer and head: MeanPooling's blocks vs PBS's."""

    length: int
    text: str
    layer: int
    head: int
    meanpool: HeadMap
    pbs: HeadMap

    @classmethod
    def from_json(cls, d: dict | None) -> BlockMap | None:
        if d is None:
            return None
        return cls(**{**d, "meanpool": HeadMap(**d["meanpool"]), "pbs": HeadMap(**d["pbs"])})


@dataclasses.dataclass(frozen=True)
class CoverageSummary:
    """The whole study: provenance, every length's results, the block map, the headline."""

    device: str
    backend: str
    jax: str
    date: str
    quick: bool
    model: str
    model_shape: str
    block_size: int
    segment_size: int
    texts: dict[str, str]  # name → source
    coverage_layers: Any  # "all" or the layer indices
    coverage_query_blocks: int
    lengths: dict[str, LengthResult]
    block_map: BlockMap | None
    runtime_s: float
    headline: dict[str, Headline]
    plots: list[str]

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["lengths"] = {n: r.to_json() for n, r in self.lengths.items()}
        d["block_map"] = self.block_map and dataclasses.asdict(self.block_map)
        d["headline"] = {n: dataclasses.asdict(h) for n, h in self.headline.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> CoverageSummary:
        """The summary of an earlier run, every length's derived numbers recomputed."""
        lengths = {n: summarize_length(LengthResult.from_json(r)) for n, r in d["lengths"].items()}
        return cls(
            **{
                **d,
                "lengths": lengths,
                "block_map": BlockMap.from_json(d.get("block_map")),
                "headline": headline(lengths),
                "plots": d.get("plots", []),
            }
        )
