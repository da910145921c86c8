"""The benchmark bookkeeping: how many runs a timing costs, and how runs on different machines
merge into one report (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from experiments import bench_prefill, benchutil


def counting():
    calls = []

    def fn(x):
        calls.append(x)
        return x

    return fn, calls


@pytest.mark.parametrize("warm,expected", [(False, 3), (True, 2)])
def test_long_calls_spend_no_extra_runs(warm, expected):
    """A call longer than the budget: one warm-up unless already warm, then min_reps timed runs
    of which the estimate run is the first."""
    fn, calls = counting()
    benchutil.time_call(fn, 1, min_reps=2, budget_s=0.0, warm=warm)
    assert len(calls) == expected


def test_merged_rows_keep_their_own_card():
    one = {"stamp": {"device": "H100"}, "rows": [{"n": 8}], "note": "one GPU."}
    four = {"stamp": {"device": "H200"}, "rows": [{"n": 512, "devices": 4}], "note": "four."}
    merged = benchutil.merge_payloads([one, four])
    assert [r["stamp"]["device"] for r in merged["rows"]] == ["H100", "H200"]
    assert merged["stamp"] == one["stamp"] and merged["note"] == "one GPU. four."


def test_prefill_report_names_the_cards_of_multi_gpu_rows(tmp_path):
    full = {"ms": 40.0, "density": 1.0, "peak_gib": 30.0}
    fixed = {"ms": 10.0, "density": 0.2, "peak_gib": 31.0, "speedup_vs_full": 4.0}
    one = {
        "stamp": {"device": "H100", "jax": "0.11.2", "date": "2026-11-26"},
        "rows": [{"n": 8192, "devices": 1, "full": full, "pbs_fixed": fixed}],
    }
    four = {
        "stamp": {"device": "H200", "jax": "0.11.2", "date": "2026-11-26"},
        "rows": [{"n": 524288, "devices": 4, "full": full, "pbs_fixed": fixed}],
    }
    for name, payload in (("a", one), ("b", four)):
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    bench_prefill.main(["--report", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    table = (tmp_path / "a.md").read_text()
    assert "| 524288 on 4 × H200 | 40.0 |" in table and "| 8192 | 40.0 |" in table
    assert (tmp_path / "a.png").stat().st_size > 0
