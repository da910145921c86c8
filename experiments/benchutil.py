"""Timing and bookkeeping shared by the GPU benchmarks: one way to time, one way to stamp."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import jax


def time_call(fn, *args, min_reps: int = 5, max_reps: int = 50, budget_s: float = 1.5) -> float:
  """Median wall time (ms) of ``fn(*args)`` to completion, after compile and warm-up.

  Each run is synchronised with ``block_until_ready``, so dispatch is included, equally for
  every contender; repeats adapt to the budget (long calls run ``min_reps`` times).
  """
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  est = time.perf_counter() - t0
  if est < budget_s / min_reps:  # cheap calls get a second warm-up; long ones need none
    jax.block_until_ready(fn(*args))
  reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-6))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


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
  path = pathlib.Path(os.environ.get("OUT", default))
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_json(path: pathlib.Path, payload: dict) -> None:
  path.write_text(json.dumps(payload, indent=1, default=float))


def benchmark_cli(argv, doc: str, name: str, add_arguments, bench, report) -> None:
  """The shared command line of a GPU benchmark.

  ``--report JSON`` re-renders the markdown and PNG next to an earlier result (any machine);
  otherwise ``bench(args, out_dir) -> payload`` runs on the GPU, and its JSON, markdown and
  PNG land in ``$OUT`` as ``name.*``.
  """
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  parser.add_argument("--report", type=pathlib.Path,
                      help="only re-render markdown + PNG from this JSON, next to it")
  args = parser.parse_args(argv)
  if args.report:
    report(json.loads(args.report.read_text()), args.report.parent)
    return
  if jax.default_backend() != "gpu":
    sys.exit(f"{name} times GPU code; no GPU is visible here.")
  out = out_dir()
  payload = bench(args, out)
  write_json(out / f"{name}.json", payload)
  report(payload, out)
  print((out / f"{name}.md").read_text())
