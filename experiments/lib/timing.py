"""Timing and bookkeeping shared by the benchmarks: one way to time, to stamp, to write results,
and one command line (run on the GPU, or re-render the report from committed JSON)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax


def time_call(
    fn, *args, min_reps: int = 5, max_reps: int = 50, budget_s: float = 1.5, warm: bool = False
) -> float:
    """Median wall time (ms) of ``fn(*args)`` to completion, after compile and warm-up.

    Each run is synchronised with ``block_until_ready``, so dispatch is included, equally for
    every contender; repeats adapt to the budget (long calls run ``min_reps`` times). ``warm``:
    the caller has already run ``fn`` once (compiled and warmed), so no warm-up run is spent —
    for calls of tens of seconds (a 512K prefill), where each run costs device time.
    """
    if not warm:
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = time.perf_counter() - t0
    times = []
    if est < budget_s / min_reps:  # cheap calls get a second warm-up; long ones need none
        jax.block_until_ready(fn(*args))
    else:  # a long warm call is itself one of the timed runs
        times.append(est)
    reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-6)))) - len(times)
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_interleaved(fns: dict, *args, rounds: int = 3, time=None) -> dict[str, float]:
    """Median wall ms of each of ``fns`` (name → function) on the same ``args``, timed in
    ``rounds`` interleaved rounds (each a ``time(fn, *args)``, default :func:`time_call`) and the
    median of the rounds taken:
    contenders compared side by side see the same drift of the card (clocks, heat), which at
    ~1 ms calls moves a single median by up to ~10% between runs."""
    time = time or time_call
    runs = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            runs[name].append(time(fn, *args))
    return {name: statistics.median(ms) for name, ms in runs.items()}


def stamp() -> dict:
    """Card, software and date for every results file."""
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }


def out_dir(default: str = "out") -> pathlib.Path:
    """The folder a GPU run writes to: ``$OUT`` (created), else ``default``."""
    path = pathlib.Path(os.environ.get("OUT", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float))


def merge_payloads(payloads: list[dict]) -> dict:
    """Several runs of one benchmark as one payload: the first's keys, every run's rows, each row
    stamped with its own run's card, JAX and date (a multi-GPU run beside a one-GPU run)."""
    merged = dict(payloads[0])
    merged["rows"] = [{"stamp": p["stamp"], **row} for p in payloads for row in p["rows"]]
    merged["note"] = " ".join(p["note"] for p in payloads if p.get("note"))
    return merged


def benchmark_cli(
    argv,
    doc: str,
    name,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    bench: Callable[[argparse.Namespace, pathlib.Path], dict],
    report: Callable[[dict, pathlib.Path, str], None],
    runs_off_gpu: Callable[[argparse.Namespace], bool] = lambda args: False,
) -> None:
    """The shared command line of a GPU benchmark.

    ``--report JSON [JSON ...]`` re-renders the markdown and PNG next to the first of earlier
    results (any machine; several are merged row by row); otherwise ``bench(args, out_dir) ->
    payload`` runs on the GPU, and its JSON, markdown and PNG land in ``$OUT`` as ``name.*``
    (``name``: a string, or a function of the parsed arguments). ``runs_off_gpu(args)``: this
    invocation may run without a GPU (a CPU smoke run of the script's own logic).
    """
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument(
        "--report",
        type=pathlib.Path,
        nargs="+",
        help="only re-render markdown + PNG from these JSONs, next to the first",
    )
    args = parser.parse_args(argv)
    if args.report:
        payloads = [json.loads(path.read_text()) for path in args.report]
        report(
            payloads[0] if len(payloads) == 1 else merge_payloads(payloads),
            args.report[0].parent,
            args.report[0].stem,
        )
        return
    name = name(args) if callable(name) else name
    if jax.default_backend() != "gpu" and not runs_off_gpu(args):
        sys.exit(f"{name} times GPU code; no GPU is visible here.")
    out = out_dir()
    payload = bench(args, out)
    write_json(out / f"{name}.json", payload)
    report(payload, out, name)
    print((out / f"{name}.md").read_text())
