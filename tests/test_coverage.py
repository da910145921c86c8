"""The coverage study (experiments/coverage.py over experiments/lib): its coverage arithmetic
against brute force, and the ``--quick`` run on the real SmolLM2-135M end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import pbs_jax
from experiments import coverage
from experiments.lib import attention_mass as mass
from experiments.lib.metrics import interpolate
from experiments.lib.specs import METHOD_BY_KEY
from tests.conftest import jit_plan, make_qkv


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        coverage.main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--quick",
        "--out",
        "--lengths",
        "--thresholds",
        "--sweep-thresholds",
        "--bracket-lengths",
        "--coverage-query-blocks",
        "--new-tokens",
    ):
        assert option in text


def test_layer_coverage_matches_brute_force():
    n, hq, hkv, d = 640, 4, 2, 16
    q, k, v = make_qkv(3, 1, n, hq, hkv, d)
    plan = mass.CoveragePlan(
        mass.sampled_query_rows(n, 128, 3),
        (METHOD_BY_KEY["pbs"], METHOD_BY_KEY["antidiagonal"]),
        (0.5, 1.0),
        (1, 3),
        error_thresholds=(0.5, 1.0),
    )
    assert plan.rows == tuple(range(0, 128)) + tuple(range(256, 384)) + tuple(range(512, 640))
    coverage, density, error = (np.asarray(x) for x in mass.layer_coverage(q, k, v, plan))
    assert coverage.shape == density.shape == (2 * 2 + 2, hq) and error.shape == (2 * 2, hq)

    qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    rows = np.array(plan.rows)

    def brute(mask, perm):  # mask [Hq, T, T], perm [Hp, N] → (coverage, output error) [Hq]
        coverages, errors = [], []
        for h in range(hq):
            kh, vh = kn[:, h // (hq // hkv)], vn[:, h // (hq // hkv)]
            slot_block = np.argsort(perm[h // (hq // perm.shape[0])]) // 128  # by position
            total, diff, norm = 0.0, 0.0, 0.0
            for i in rows:
                w = np.exp(qn[i, h] @ kh[: i + 1].T / np.sqrt(d))
                w /= w.sum()
                kept = np.where(mask[h, i // 128, slot_block[: i + 1]], w, 0.0)
                total += kept.sum()
                diff += np.sum((kept / kept.sum() @ vh[: i + 1] - w @ vh[: i + 1]) ** 2)
                norm += np.sum((w @ vh[: i + 1]) ** 2)
            coverages.append(total / len(rows))
            errors.append(np.sqrt(diff / norm))
        return np.array(coverages), np.array(errors)

    for index, (key, tau) in enumerate(
        [("pbs", 0.5), ("pbs", 1.0), ("antidiagonal", 0.5), ("antidiagonal", 1.0)]
    ):
        perm, mask = (np.asarray(x)[0] for x in jit_plan(q, k, METHOD_BY_KEY[key].config(tau)))
        want_coverage, want_error = brute(mask, perm)
        np.testing.assert_allclose(coverage[index], want_coverage, rtol=1e-4)
        np.testing.assert_allclose(error[index], want_error, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(
            density[index], np.asarray(pbs_jax.density(mask[None]))[0], rtol=1e-6
        )
    np.testing.assert_allclose(coverage[1], 1.0, atol=1e-5)  # τ = 1 keeps every causal block
    np.testing.assert_allclose(error[1], 0.0, atol=1e-5)
    assert np.all(error[0] > 1e-4)
    identity = np.tile(np.arange(n), (hkv, 1))
    for index, window in ((4, 1), (5, 3)):
        mask = np.asarray(pbs_jax.sink_local_mask((1, hq, 5), window))[0]
        np.testing.assert_allclose(coverage[index], brute(mask, identity)[0], rtol=1e-4)


def test_interpolate():
    assert interpolate([0.2, 0.6], [1.0, 3.0], 0.4) == pytest.approx(2.0)
    assert interpolate([0.6, 0.2], [3.0, 1.0], 0.2) == pytest.approx(1.0)
    assert interpolate([0.2, 0.6], [1.0, 3.0], 0.7) is None
    assert interpolate([0.2, 0.6], [1.0, 3.0], 0.65, tolerance=0.1) == 3.0
    assert interpolate([0.5], [None], 0.5) is None


@pytest.mark.slow
@pytest.mark.pretrained
def test_quick_run_end_to_end(tmp_path, smollm2):
    # The quick run with less of each repeated part (every path still runs: the coverage pass,
    # every method's sparse prefill, decoding, retrieval, the report): 512 tokens (4 blocks, 2
    # segments: permutation, selection and the sink/local windows all act), coverage on 3
    # layers (0, 10, 20) of 4 sampled query blocks, one probe per task, 2 greedy tokens.
    fewer = ["--lengths", "512", "--coverage-layer-stride", "10", "--coverage-query-blocks", "4"]
    fewer += ["--probes-per-task", "1", "--new-tokens", "2"]
    summary = coverage.run(["--quick", *fewer, "--out", str(tmp_path)], model=smollm2).to_json()
    for suffix in (
        ".json",
        ".md",
        "_coverage_density.png",
        "_density_by_layer.png",
        "_vs_density.png",
        "_block_map.png",
    ):
        assert (tmp_path / f"coverage_quick{suffix}").stat().st_size > 1000
    saved = json.loads((tmp_path / "coverage_quick.json").read_text())
    assert saved["device"].startswith("CPU") and saved["jax"] == jax.__version__
    assert saved["date"] and saved["quick"] is True

    ((n, result),) = summary["lengths"].items()
    assert n == "512" and all(s["tokens"] == 512 for s in result["sequences"])
    cov = result["coverage"]
    taus = cov["thresholds"]
    assert taus == [0.5, 0.9, 1.0]
    for key in ("pbs", "meanpool", "antidiagonal", "pbs_plus"):
        assert cov[key]["coverage"][-1] == pytest.approx(1.0, abs=1e-4)  # τ = 1: every block
        assert np.all(np.diff(cov[key]["density"]) >= 0)  # nested top-p sets
        assert np.all(np.diff(cov[key]["coverage"]) >= -1e-6)
    assert cov["sink_local"]["coverage"][-1] == pytest.approx(1.0, abs=1e-4)  # W = T
    assert cov["error_thresholds"] == [0.5, 0.9]
    for key in ("pbs", "meanpool", "antidiagonal", "pbs_plus"):
        assert cov[key]["output_error"][0] >= cov[key]["output_error"][1] > 0
    assert 0 < cov["pbs"]["density"][0] < cov["pbs"]["density"][1] <= 1.2

    full = next(iter(result["full"].values()))
    assert 1.0 < full["ppl"] < 1e3 and full["kl"] == pytest.approx(0.0, abs=1e-6)
    by_run = {(f["method"], f["threshold"], f["window"]): f for f in result["forwards"]}
    pbs = by_run[("pbs", 0.9, 0)]
    assert by_run[("pbs", 0.5, 0)]["density"] <= pbs["density"]
    assert pbs["density"] == pytest.approx(cov["pbs"]["density"][1], abs=0.05)
    for f in result["forwards"]:
        assert np.isfinite(f["ppl"]) and f["kl"] >= -1e-6 and 0 <= f["agreement"] <= 1  # rounding
        assert 0 <= f["greedy_match"] <= 1 and len(f["density_by_layer"]) == 30
    sink = [f["density"] for f in result["forwards"] if f["method"] == "sink_local"]
    assert min(abs(d - cov["pbs"]["density"][1]) for d in sink) < 1 / 9 + 1e-6  # matched
    assert set(result["kept_tasks"]) <= {"passkey", "kv", "copy"}
    assert sum(t["probes"] for t in result["retrieval_full"].values()) == 3  # one per task
    assert summary["headline"]["512"]["pbs_tau09_density"] == pytest.approx(pbs["density"])
    assert "Matched density" in (tmp_path / "coverage_quick.md").read_text()


@pytest.mark.slow
@pytest.mark.pretrained
def test_layer_schedule_study_runs_on_the_real_model(tmp_path, smollm2, monkeypatch):
    """experiments/layer_schedule.py at 1K tokens: every schedule on one text (the second text
    takes the same path), full attention as its own baseline (KL 0, agreement 1), the rest
    judged against it, and its files."""
    from experiments import layer_schedule

    first_text = dict(list(layer_schedule.load_texts().items())[:1])
    monkeypatch.setattr(layer_schedule, "load_texts", lambda: first_text)
    payload = layer_schedule.run(
        ["--lengths", "1024", "--new-tokens", "2", "--out", str(tmp_path)], model=smollm2
    )
    rows = payload["rows"]
    schedules = {r["schedule"] for r in rows}
    assert schedules == {"full", *layer_schedule.schedules(0.9)}
    assert len(rows) == len(schedules) * len({r["text"] for r in rows})
    for r in rows:
        assert np.isfinite(r["ppl"]) and r["kl"] >= -1e-6 and 0 <= r["agreement"] <= 1
        if r["schedule"] == "full":  # measured against its own baseline run
            assert abs(r["kl"]) < 1e-6 and r["agreement"] == 1.0 and r["density"] == 1.0
        else:
            assert 0 < r["density"] < 1.1
    assert "layers 0,17,18,20 dense" in (tmp_path / "layer_schedule.md").read_text()
    assert (tmp_path / "layer_schedule.png").stat().st_size > 0
