"""Tile sweep of the Pallas block-sparse attention kernel at 100% density, beside cuDNN.

GPU script (H100/H200, JAX 0.11.x). For B=1, Hq=32, Hk=8, bf16, D in {128, 64}:
  phase 1: N=8192, every tile config of the grid (block_m x block_n x num_warps x num_stages),
           gather_kv True (Hp=Hq, "replicate") and False (Hp=Hk, K/V passed as already permuted);
  phase 2: N=32768, the best few configs of phase 1 per (D, gather_kv) plus the table default.
100% density = all causal blocks of the PBS layout (segment 256, block 128): the blocks before
the query's segment listed as full, the 2 blocks of its own segment as masked. key_pos is the
identity, so the result must equal dense causal attention: each config is first checked against
`jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)` (relative error < 2e-2)
and timed only if it passes. cuDNN is timed in the same run.

Timing: warm-up, then `--trials` trials of `--reps` back-to-back calls of one jitted function
(async dispatch keeps the GPU busy), block_until_ready on the last; the median per-call time.
TFLOP/s = causal FLOPs 4*B*Hq*N^2*D/2 / time (the skipped future half is not counted; the
kernel's wasted future block of each own segment is not counted either).

Writes $OUT/tune_kernel.json (OUT defaults to ./out) and prints the best configs.
`--smoke` runs the same helpers on CPU in interpret mode on a tiny shape (checks the script).

Usage:  python -m experiments.tune_kernel [--budget-s 270] [--top 3] [--d 128 64] [--n 8192 32768]
        python -m experiments.tune_kernel --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

if __package__ in (None, ""):  # `python experiments/tune_kernel.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import TileConfig, block_sparse_attention, get_tiles

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)

BLOCK_SIZE = 128
SEGMENT = 256
TOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Problem:
    b: int
    n: int
    hq: int
    hk: int
    d: int
    dtype: str = "bfloat16"

    @property
    def causal_flops(self) -> float:
        return 4.0 * self.b * self.hq * self.n * self.n * self.d / 2.0


def tile_grid(smoke: bool) -> list[TileConfig]:
    if smoke:
        return [TileConfig(64, 32, 4, 2), TileConfig(128, 64, 8, 3)]
    return [
        TileConfig(bm, bn, w, s)
        for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    ]


def full_density_lists(b, hq, n, block_size=BLOCK_SIZE, segment=SEGMENT):
    """All causal blocks in the PBS layout: [0, seg_start) full, own segment masked.

    Lists are simply 0..T-1 for every query block: full = first block of the query's segment,
    total = end of that segment (clipped to T). Returns ids [B,Hq,T,T], full, total [B,Hq,T].
    """
    t = -(-n // block_size)
    spb = segment // block_size
    qb = jnp.arange(t, dtype=jnp.int32)
    s0 = (qb // spb) * spb
    ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, hq, t, t))
    full = jnp.broadcast_to(s0, (b, hq, t))
    total = jnp.broadcast_to(jnp.minimum(s0 + spb, t), (b, hq, t))
    return ids, full, total


def make_inputs(p: Problem, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dt = jnp.dtype(p.dtype)
    q = jax.random.normal(kq, (p.b, p.n, p.hq, p.d), jnp.float32).astype(dt)
    k = jax.random.normal(kk, (p.b, p.n, p.hk, p.d), jnp.float32).astype(dt)
    v = jax.random.normal(kv, (p.b, p.n, p.hk, p.d), jnp.float32).astype(dt)
    return q, k, v


def rel_err(x, ref) -> float:
    x = jnp.asarray(x, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def time_fn(fn, args, *, reps: int, trials: int) -> float:
    """Median seconds per call over `trials` runs of `reps` back-to-back calls (after warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def make_kernel_fn(p: Problem, tiles: TileConfig, gather_kv: bool, interpret: bool):
    """A kernel call taking (q, k, v). The lists and key_pos are jit *arguments* (built once
    here), not closed-over constants: big constants would be baked into the HLO."""
    hp = p.hq if gather_kv else p.hk  # replicate when gathering; shared permuted K/V otherwise
    ids, full, total = full_density_lists(p.b, p.hq, p.n)
    key_pos = jnp.broadcast_to(jnp.arange(p.n, dtype=jnp.int32), (p.b, hp, p.n))
    extra = (key_pos, ids, full, total)
    jfn = jax.jit(
        functools.partial(
            block_sparse_attention,
            block_size=BLOCK_SIZE,
            gather_kv=gather_kv,
            tiles=tiles,
            interpret=interpret,
        )
    )
    return (lambda q, k, v: jfn(q, k, v, *extra)), hp


def make_dense_fn(interpret: bool):
    impl = None if interpret else "cudnn"  # no cuDNN on CPU: XLA for the smoke run
    return jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    )


def run_config(p, tiles, gather_kv, inputs, dense_out, dense_s, *, interpret, reps, trials):
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
        sec = time_fn(fn, inputs, reps=reps, trials=trials)
    except Exception as e:  # noqa: BLE001 - compile failures (smem, registers) are data here
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["traceback_tail"] = traceback.format_exc()[-800:]
        return rec
    rec.update(
        status="ok", ms=sec * 1e3, tflops=p.causal_flops / sec / 1e12, ratio_vs_cudnn=dense_s / sec
    )
    return rec


def _key(rec):
    t = rec["tiles"]
    return (t["block_m"], t["block_n"], t["num_warps"], t["num_stages"])


def print_table(records, dense, top):
    print(
        "\nBest configs (B=1, Hq=32, Hk=8, bf16; TFLOP/s counts causal work; ratio = "
        "cuDNN time / kernel time):"
    )
    hdr = (
        f"{'D':>4} {'N':>6} {'gather':>6} {'bm':>4} {'bn':>4} {'w':>2} {'s':>2} "
        f"{'ms':>8} {'TFLOP/s':>8} {'vs cuDNN':>8}"
    )
    print(hdr)
    groups = {}
    for r in records:
        if r.get("status") == "ok":
            groups.setdefault((r["d"], r["n"], r["gather_kv"]), []).append(r)
    for d, n, g in sorted(groups, key=lambda x: (-x[0], x[1], not x[2])):
        rs = sorted(groups[(d, n, g)], key=lambda r: r["ms"])[:top]
        for r in rs:
            bm, bn, w, s = _key(r)
            print(
                f"{d:>4} {n:>6} {str(g):>6} {bm:>4} {bn:>4} {w:>2} {s:>2} "
                f"{r['ms']:>8.3f} {r['tflops']:>8.1f} {r['ratio_vs_cudnn']:>8.2f}"
            )
        dk = f"{d}/{n}"
        if dk in dense:
            print(
                f"{d:>4} {n:>6} {'cuDNN':>6} {'':>4} {'':>4} {'':>2} {'':>2} "
                f"{dense[dk]['ms']:>8.3f} {dense[dk]['tflops']:>8.1f} {1.0:>8.2f}"
            )
    bad = [r for r in records if r.get("status") in ("failed", "wrong")]
    if bad:
        print(f"\n{len(bad)} configs failed to compile/run or were wrong, e.g.:")
        for r in bad[:5]:
            print(
                "  ",
                _key(r),
                r["gather_kv"],
                r["d"],
                r["n"],
                r["status"],
                r.get("error", r.get("rel_err_vs_dense")),
            )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shape, CPU interpret mode: checks the script's helpers",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="stop starting new configs after this many seconds",
    )
    ap.add_argument(
        "--top",
        type=int,
        default=3,
        help="configs per (D, gather_kv) carried from N=8192 to N=32768",
    )
    ap.add_argument("--d", type=int, nargs="*", default=[128, 64])
    ap.add_argument("--n", type=int, nargs="*", default=[8192, 32768])
    args = ap.parse_args(argv)

    interpret = args.smoke or jax.default_backend() != "gpu"
    if interpret and not args.smoke:
        print("no GPU backend found: use --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.smoke:
        problems = {d: [Problem(1, 256, 4, 2, d)] for d in (64,)}
        reps, trials = 1, 1
    else:
        problems = {d: [Problem(1, n, 32, 8, d) for n in args.n] for d in args.d}
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)

    start = time.perf_counter()
    records, dense = [], {}
    grid = tile_grid(args.smoke)
    n_phase = max(len(v) for v in problems.values())
    for phase in range(n_phase):
        for d, plist in problems.items():
            if phase >= len(plist):
                continue
            p = plist[phase]
            if not args.smoke:
                reps, trials = (10, 5) if p.n <= 8192 else (3, 5)
            inputs = make_inputs(p)
            dfn = make_dense_fn(interpret)
            dense_out = jax.block_until_ready(dfn(*inputs))
            dense_s = time_fn(dfn, inputs, reps=reps, trials=trials)
            dense[f"{d}/{p.n}"] = {"ms": dense_s * 1e3, "tflops": p.causal_flops / dense_s / 1e12}
            print(
                f"[{time.perf_counter() - start:6.1f}s] D={d} N={p.n}: "
                f"{'cuDNN' if not interpret else 'XLA'} {dense_s * 1e3:.3f} ms",
                flush=True,
            )
            for gather_kv in (True, False):
                if phase == 0:
                    configs = list(grid)
                else:  # later phases: the best of phase 0 for this (D, gather) + the default
                    prev = sorted(
                        (
                            r
                            for r in records
                            if r["d"] == d
                            and r["n"] == plist[0].n
                            and r["gather_kv"] == gather_kv
                            and r.get("status") == "ok"
                        ),
                        key=lambda r: r["ms"],
                    )
                    configs = [TileConfig(**r["tiles"]) for r in prev[: args.top]]
                    default = get_tiles(d, jnp.bfloat16, BLOCK_SIZE, gather_kv)
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
                        p,
                        tiles,
                        gather_kv,
                        inputs,
                        dense_out,
                        dense_s,
                        interpret=interpret,
                        reps=reps,
                        trials=trials,
                    )
                    records.append(rec)
                    msg = (
                        f"{rec['ms']:.3f} ms {rec['tflops']:.0f} TFLOP/s "
                        f"x{rec['ratio_vs_cudnn']:.2f}"
                        if rec["status"] == "ok"
                        else rec["status"]
                        + " "
                        + str(rec.get("error", rec.get("rel_err_vs_dense")))
                    )
                    print(
                        f"[{time.perf_counter() - start:6.1f}s] D={d} N={p.n} "
                        f"gather={gather_kv} {_key(rec)}: {msg}",
                        flush=True,
                    )
            del inputs, dense_out

    meta = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "block_size": BLOCK_SIZE,
        "segment": SEGMENT,
        "dense_impl": "xla" if interpret else "cudnn",
        "wall_s": time.perf_counter() - start,
    }
    path = os.path.join(out_dir, "tune_kernel.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "dense": dense, "records": records}, f, indent=1)
    print_table(records, dense, args.top)
    print(f"\nwrote {path} ({len(records)} records, {meta['wall_s']:.0f} s)")
    ok = [r for r in records if r.get("status") == "ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
