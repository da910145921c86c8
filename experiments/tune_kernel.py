"""Tile sweep of the Pallas block-sparse attention kernel at 100% density, beside cuDNN.

GPU script (H100/H200, JAX 0.11.x). For B=1, Hq=32, Hk=8, bf16, D in {128, 64}:
  phase 1: N=8192, every tile config of the grid (block_m x block_n x num_warps x num_stages),
           gather_kv True (Hp=Hq, "replicate") and False (Hp=Hk, K/V passed as already permuted);
  phase 2: N=32768, the best few configs of phase 1 per (D, gather_kv) plus the table default.
100% density = all causal blocks of the PBS layout (segment 256, block 128): the blocks before
the query's segment listed as full, the blocks of its own segment as masked
(experiments/lib/kernels.py, from pbs_jax's block-grid rules). key_pos is the identity, so the
result must equal dense causal attention: each config is first checked against cuDNN
(relative error < 2e-2) and timed only if it passes. cuDNN is timed in the same run.

Timing: the shared timer (experiments/lib/timing.py: warm-up, then synchronised calls within a
time budget, the median). TFLOP/s = causal FLOPs 4*B*Hq*N^2*D/2 / time (the skipped future half
is not counted; the kernel's wasted future block of each own segment is not counted either).

  python -m experiments.tune_kernel [--budget-s 270] [--top 3] [--d 128 64] [--n 8192 32768]
  python -m experiments.tune_kernel --smoke   # CPU, interpret mode, tiny shape: checks the script
  python -m experiments.tune_kernel --report experiments/results/tune_kernel.json

Writes $OUT/tune_kernel.{json,md} (OUT defaults to ./out).
"""

from __future__ import annotations

import dataclasses
import itertools
import platform
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import pbs_jax
from experiments.lib import kernels, timing
from experiments.lib.metrics import rel_err
from experiments.lib.report import table_header, table_row
from pallas_kernels import TileConfig, get_tiles
from pbs_jax import PBSConfig

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)

CFG = PBSConfig.paper()  # block 128, segment 256: the layout the kernel runs in the op
TOL = 2e-2
TABLE_ROWS = 4  # fastest configs shown per (D, N, gather_kv)


@dataclasses.dataclass(frozen=True)
class Problem:
    b: int
    n: int
    hq: int
    hk: int
    d: int
    dtype: str = "bfloat16"

    def tflops(self, ms: float) -> float:
        """Causal-work rate of one call of ``ms`` milliseconds."""
        return kernels.causal_tflops(self.b, self.hq, self.n, self.d, ms)


def tile_grid(smoke: bool) -> list[TileConfig]:
    if smoke:
        return [TileConfig(64, 32, 4, 2), TileConfig(128, 64, 8, 3)]
    return [
        TileConfig(bm, bn, w, s)
        for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    ]


def make_kernel_fn(p: Problem, tiles: TileConfig, gather_kv: bool, interpret: bool):
    """A kernel call taking (q, k, v). The lists and key_pos are jit *arguments* (built once
    here), not closed-over constants: big constants would be baked into the HLO."""
    hp = p.hq if gather_kv else p.hk  # replicate when gathering; shared permuted K/V otherwise
    lists = kernels.all_causal_lists(p.b, p.hq, p.n, CFG)
    key_pos = pbs_jax.identity_permutation(p.b, hp, p.n)
    jfn = kernels.triton_kernel(CFG, gather_kv, tiles, interpret=interpret)
    return (lambda q, k, v: jfn(q, k, v, key_pos, *lists)), hp


def time_ms(fn, inputs, smoke: bool) -> float:
    # A smoke run only checks the script: one warm-up and one timed call.
    return timing.time_call(fn, *inputs, budget_s=0.0) if smoke else timing.time_call(fn, *inputs)


def run_config(p, tiles, gather_kv, inputs, dense_out, dense_ms, *, interpret, smoke):
    rec = {
        "n": p.n,
        "d": p.d,
        "hq": p.hq,
        "hk": p.hk,
        "dtype": p.dtype,
        "gather_kv": gather_kv,
        "tiles": dataclasses.asdict(tiles),
    }
    t0 = time.perf_counter()
    try:
        fn, hp = make_kernel_fn(p, tiles, gather_kv, interpret)
        rec["hp"] = hp
        out = jax.block_until_ready(fn(*inputs))  # compile + first run
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        err = rel_err(out, dense_out)
        rec["rel_err_vs_dense"] = err
        if not np.isfinite(err) or err >= TOL:
            rec["status"] = "wrong"
            return rec
        ms = time_ms(fn, inputs, smoke)
    except Exception as e:  # noqa: BLE001 - compile failures (smem, registers) are data here
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["traceback_tail"] = traceback.format_exc()[-800:]
        return rec
    rec.update(
        status="ok",
        ms=ms,
        tflops=p.tflops(ms),
        ratio_vs_cudnn=dense_ms / ms,
    )
    return rec


def _key(rec):
    t = rec["tiles"]
    return (t["block_m"], t["block_n"], t["num_warps"], t["num_stages"])


def report(payload: dict, out, name: str = "tune_kernel") -> None:
    """``<name>.md``: the fastest configs per (D, N, gather_kv) beside cuDNN, from the JSON."""
    meta, dense, records = payload["meta"], payload["dense"], payload["records"]
    ok = [r for r in records if r.get("status") == "ok"]
    ds = sorted({r["d"] for r in ok}, reverse=True)
    heads = f"Hq={ok[0]['hq']}, Hkv={ok[0]['hk']}" if ok else "Hq=32, Hkv=8"
    shape = f"B=1, {heads}, D={'/'.join(map(str, ds))}, bf16"
    by_d = len(ds) > 1  # a D column only when several head dims were swept
    lines = [
        f"# Kernel tile sweep — {meta['device']}, JAX {meta['jax']}, {meta.get('date', '')}",
        "",
        f"Made by `{meta.get('command', 'python -m experiments.tune_kernel')}` (JSON beside "
        "this file).",
        f"{shape}, 100% density in the PBS layout (identity key positions), each config checked "
        "against cuDNN first. TFLOP/s count causal work; ratio = cuDNN time / kernel time, same "
        "run.",
        "",
        *table_header(
            *(["D"] if by_d else []),
            *("N", "gather_kv", "block_m", "block_n", "warps", "stages", "ms", "TFLOP/s"),
            "×cuDNN",
        ),
    ]
    groups = {}
    for r in ok:
        groups.setdefault((r["d"], r["n"]), {}).setdefault(r["gather_kv"], []).append(r)
    for d, n in sorted(groups, key=lambda x: (-x[0], x[1])):
        lead = [d] if by_d else []
        for gather in (True, False):
            for r in sorted(groups[d, n].get(gather, []), key=lambda r: r["ms"])[:TABLE_ROWS]:
                lines.append(
                    table_row(
                        *lead, n, gather, *_key(r), f"{r['ms']:.3f}", f"{r['tflops']:.0f}",
                        f"{r['ratio_vs_cudnn']:.2f}",
                    )
                )  # fmt: skip
        if f"{d}/{n}" in dense:
            x = dense[f"{d}/{n}"]
            rate = f"{x['tflops']:.0f}"
            lines.append(table_row(*lead, n, "cuDNN", *[""] * 4, f"{x['ms']:.3f}", rate, "1.00"))
    lines += [
        "",
        f"{len(ok)} configs timed, {len(records) - len(ok)} skipped by the time budget or failed.",
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def command(args) -> str:
    """The command line of this run, for the report's provenance."""
    flags = " --smoke" if args.smoke else ""
    flags += f" --budget-s {args.budget_s:g} --top {args.top}"
    flags += f" --d {' '.join(map(str, args.d))} --n {' '.join(map(str, args.n))}"
    return "python -m experiments.tune_kernel" + flags


def bench(args, out) -> dict:
    interpret = args.smoke
    if args.smoke:
        problems = {d: [Problem(1, 256, 4, 2, d)] for d in (64,)}
    else:
        problems = {d: [Problem(1, n, 32, 8, d) for n in args.n] for d in args.d}
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)  # noqa: E731
    records, dense = [], {}
    grid = tile_grid(args.smoke)
    n_phase = max(len(v) for v in problems.values())
    for phase in range(n_phase):
        for d, plist in problems.items():
            if phase >= len(plist):
                continue
            p = plist[phase]
            inputs = kernels.random_qkv(jax.random.key(0), p.b, p.n, p.hq, p.hk, p.d, p.dtype)
            dense_out = jax.block_until_ready(kernels.cudnn_attention(*inputs))
            dense_ms = time_ms(kernels.cudnn_attention, inputs, args.smoke)
            dense[f"{d}/{p.n}"] = {"ms": dense_ms, "tflops": p.tflops(dense_ms)}
            log(f"D={d} N={p.n}: {'XLA' if interpret else 'cuDNN'} {dense_ms:.3f} ms")
            for gather_kv in (True, False):
                if phase == 0:
                    configs = list(grid)
                else:  # later phases: the best of phase 0 for this (D, gather) + the default
                    prev = sorted(
                        (
                            r
                            for r in records
                            if (r["d"], r["n"], r["gather_kv"]) == (d, plist[0].n, gather_kv)
                            and r.get("status") == "ok"
                        ),
                        key=lambda r: r["ms"],
                    )
                    configs = [TileConfig(**r["tiles"]) for r in prev[: args.top]]
                    default = get_tiles(d, jnp.bfloat16, CFG.block_size, gather_kv)
                    if default not in configs:
                        configs.append(default)
                for tiles in configs:
                    # Phase 0 may use 75% of the budget; the rest is kept for later phases.
                    limit = args.budget_s * (0.75 if phase == 0 and n_phase > 1 else 1.0)
                    if time.perf_counter() - start > limit:
                        records.append(
                            {
                                "n": p.n,
                                "d": d,
                                "gather_kv": gather_kv,
                                "tiles": dataclasses.asdict(tiles),
                                "status": "skipped (budget)",
                            }
                        )
                        continue
                    rec = run_config(
                        p, tiles, gather_kv, inputs, dense_out, dense_ms,
                        interpret=interpret, smoke=args.smoke,
                    )  # fmt: skip
                    records.append(rec)
                    msg = (
                        f"{rec['ms']:.3f} ms {rec['tflops']:.0f} TFLOP/s "
                        f"x{rec['ratio_vs_cudnn']:.2f}"
                        if rec["status"] == "ok"
                        else f"{rec['status']} {rec.get('error', rec.get('rel_err_vs_dense'))}"
                    )
                    log(f"D={d} N={p.n} gather={gather_kv} {_key(rec)}: {msg}")
            del inputs, dense_out

    stamp = timing.stamp()
    meta = {
        "device": stamp["device"],
        "jax": stamp["jax"],
        "date": stamp["date"],
        "command": command(args),
        "python": platform.python_version(),
        "smoke": args.smoke,
        "block_size": CFG.block_size,
        "segment": CFG.segment_size,
        "dense_impl": "xla" if interpret else "cudnn",
        "wall_s": time.perf_counter() - start,
    }
    return {"meta": meta, "dense": dense, "records": records}


def add_arguments(parser):
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shape, CPU interpret mode: checks the script"
    )
    parser.add_argument(
        "--budget-s", type=float, default=270.0, help="stop starting new configs after this long"
    )
    parser.add_argument(
        "--top", type=int, default=3, help="configs per (D, gather_kv) carried from N=8192 on"
    )
    parser.add_argument("--d", type=int, nargs="*", default=[128, 64], help="head dims")
    parser.add_argument("--n", type=int, nargs="*", default=[8192, 32768], help="lengths")


def main(argv=None):
    timing.benchmark_cli(
        argv, __doc__, "tune_kernel", add_arguments, bench, report, runs_off_gpu=lambda a: a.smoke
    )


if __name__ == "__main__":
    main()
