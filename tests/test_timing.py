"""The benchmark bookkeeping (experiments/lib/timing.py): how many runs a timing costs, how runs
on different machines merge into one report, and when the command line times (no timing is
asserted)."""

from __future__ import annotations

import json

import pytest

from experiments import bench_prefill
from experiments.lib import timing


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
    timing.time_call(fn, 1, min_reps=2, budget_s=0.0, warm=warm)
    assert len(calls) == expected


def test_merged_rows_keep_their_own_card():
    one = {"stamp": {"device": "H100"}, "rows": [{"n": 8}], "note": "one GPU."}
    four = {"stamp": {"device": "H200"}, "rows": [{"n": 512, "devices": 4}], "note": "four."}
    merged = timing.merge_payloads([one, four])
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


def test_benchmark_cli_refuses_to_time_off_the_gpu_unless_the_script_allows_it(
    tmp_path, monkeypatch
):
    """No GPU: a timing run exits before ``bench``; a run the script allows off the GPU (a CPU
    smoke run) writes its JSON and markdown to $OUT."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(timing.jax, "default_backend", lambda: "cpu")
    ran = []

    def bench(args, out):
        ran.append(args.smoke)
        return {"rows": [], "smoke": args.smoke}

    def report(payload, out, name):
        (out / f"{name}.md").write_text(f"smoke={payload['smoke']}\n")

    def add_arguments(parser):
        parser.add_argument("--smoke", action="store_true")

    def cli(*argv):
        timing.benchmark_cli(
            list(argv), "doc", "toy", add_arguments, bench, report, runs_off_gpu=lambda a: a.smoke
        )

    with pytest.raises(SystemExit):
        cli()
    assert ran == []
    cli("--smoke")
    assert ran == [True] and (tmp_path / "toy.md").read_text() == "smoke=True\n"
    assert json.loads((tmp_path / "toy.json").read_text()) == {"rows": [], "smoke": True}
