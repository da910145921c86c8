"""Where the plan's time goes: a per-kernel GPU profile of the plan and of ``impl="auto"``'s
estimate, and the tile sweeps behind the planner kernels' default tiles.

Run on a GPU (one call):
  python -m experiments.profile_plan            # writes $OUT/profile_plan.json and .md
  python -m experiments.profile_plan --smoke    # the script's logic on CPU (tiny, no GPU rows)
  python -m experiments.profile_plan --report experiments/results/profile_plan.json
                                                # re-renders the markdown from the JSON

Per length (B=1, Hq=32, Hkv=8, D=128, bf16, structured input as bench_kernel's):
  * the plan as the op runs it (``pbs_plan``: perm and block lists), for the paper's rule
    and the op's default, and the estimate stage, each profiled with ``jax.profiler`` (a
    Perfetto trace): GPU time per kernel, summed per call, beside the wall time of the call
    (dispatch included, as bench_kernel times it);
  * ``pallas_kernels.proxy_importance`` over a set of ``ImportanceTiles`` (one and four proxy
    blocks) and ``pallas_kernels.pooled_selection`` as the plan runs it (grid codes, sink, the
    lists written in the kernel; runs before this one timed ``pooled_top_p_blocks``, the mask
    alone) over a set of ``PooledTopPTiles`` (checked equal to the default tiles' mask), wall
    time of each call;
  * the permuted keys' pooling: XLA's one-hot einsum and ``pallas_kernels.permuted_block_means``
    over a set of ``PoolTiles``, wall time and GPU µs of each call.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.bench_kernel import timer
from experiments.lib import timing
from experiments.lib.kernel_trace import gpu_us, kernel_profile
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import (
    ImportanceTiles,
    PooledTopPTiles,
    PoolTiles,
    permuted_block_means,
    pooled_selection,
    proxy_importance,
)
from pbs_jax import PBSConfig, cost_model, permutation, selection

LENGTHS = (8192, 131072)
RULES = {"paper": PBSConfig.paper(), "default": PBSConfig()}
IMPORTANCE_TILES = (
    ImportanceTiles(128, 128, 512, 8, 2, column_tiles=2),
    ImportanceTiles(128, 128, 512, 8, 2),
    ImportanceTiles(128, 128, 512, 4, 2),
    ImportanceTiles(128, 128, 1024, 8, 2, column_tiles=2),
    ImportanceTiles(128, 128, 256, 8, 2, column_tiles=2),
    # Several key tiles per pass-2 program: fewer, longer programs where pass 2 is latency-bound
    # (8K keys: 4096 programs of one 128 × 64 dot with 64-key tiles).
    ImportanceTiles(128, 64, 512, 4, 2, column_tiles=2),
    ImportanceTiles(128, 64, 512, 8, 2, column_tiles=2),
    ImportanceTiles(128, 128, 512, 8, 2, column_tiles=4),
)
TOP_P_TILES = (
    PooledTopPTiles(16, 16, 8, 1),
    PooledTopPTiles(32, 16, 8, 1),
    PooledTopPTiles(16, 32, 8, 1),
    PooledTopPTiles(16, 16, 4, 1),
    # The cut-off search with 3 and 7 independent masked sums per step (14 and 9 dependent
    # steps instead of 27): at the 128K default tiles and at the 8K row's fastest.
    PooledTopPTiles(32, 16, 8, 1, cuts_per_step=3),
    PooledTopPTiles(32, 16, 8, 1, cuts_per_step=7),
    PooledTopPTiles(16, 16, 4, 1, cuts_per_step=3),
    PooledTopPTiles(16, 16, 4, 1, cuts_per_step=7),
)
# The permuted-key pooling kernel: rows gathered per load × warps (× stages). Committed
# results name these tiles by their former class, PermutedPoolTiles(gather_rows=...).
POOL_TILES = (
    PoolTiles(16, 4, 2),
    PoolTiles(32, 4, 2),
    PoolTiles(64, 4, 2),
    PoolTiles(32, 8, 2),
    PoolTiles(64, 8, 2),
    PoolTiles(128, 8, 2),
    PoolTiles(32, 2, 2),
    PoolTiles(32, 4, 3),
    PoolTiles(128, 4, 2),
    PoolTiles(128, 16, 2),
)


def plan_fn(cfg: PBSConfig):
    return jax.jit(lambda q, k: pbs_jax.pbs_plan(q, k, cfg)[::2])  # (perm, lists)


def profiled(fn, *args, time) -> dict:
    kernels = kernel_profile(fn, *args)
    return {
        "wall_ms": time(fn, *args),
        "gpu_us": sum(r[2] for r in kernels),
        "launches": sum(r[1] for r in kernels),
        "kernels": kernels[:20],
    }


def sweeps(q, k, time) -> dict:
    """Wall ms of the importance kernel per tiles and proxy size, and of the pooled top-p kernel
    per tiles (with whether its mask equals the default tiles')."""
    n = k.shape[1]
    keys = k[:, : (n // 256) * 256]
    importance = []
    for rule, cfg in RULES.items():
        proxy = permutation.proxy_queries(q, cfg)
        for tiles in IMPORTANCE_TILES:
            fn = jax.jit(functools.partial(proxy_importance, tiles=tiles))
            importance.append({"rule": rule, "tiles": repr(tiles), "ms": time(fn, proxy, keys)})
    cfg = RULES["paper"]
    perm = permutation.compute_permutation(q, k, cfg)
    pooled_q, pooled_k = jax.jit(lambda q, k, p: selection.pooled_blocks(q, k, p, cfg))(q, k, perm)
    # The selection kernel as the plan runs it: grid codes, sink, the lists written in it.
    codes, sink = selection.selection_codes(perm, q.shape[2], cfg)
    select = functools.partial(pooled_selection, codes=codes, sink=sink, threshold=cfg.threshold)
    default = jax.jit(select)(pooled_q, pooled_k).mask
    top_p = [{"tiles": "default", "ms": time(jax.jit(select), pooled_q, pooled_k), "same": True}]
    for tiles in TOP_P_TILES:
        fn = jax.jit(functools.partial(select, tiles=tiles))
        try:
            same = bool((fn(pooled_q, pooled_k).mask == default).all())
        except Exception as err:  # a tile the card cannot hold (shared memory): say so
            top_p.append({"tiles": repr(tiles), "error": str(err)[:160]})
            continue
        top_p.append({"tiles": repr(tiles), "ms": time(fn, pooled_q, pooled_k), "same": same})
    return {"importance": importance, "top_p": top_p, "pooling": pooling_sweep(k, perm, cfg, time)}


def pooling_sweep(k, perm, cfg: PBSConfig, time) -> list[dict]:
    """The permuted keys' block means: XLA's one-hot einsum (the CPU path) and the Pallas kernel
    per tiles, wall ms and GPU µs of each call, and the kernel's largest difference from the
    einsum."""
    sizes = dict(block_size=cfg.block_size, segment_size=cfg.segment_size)
    one_hot = jax.jit(lambda k, p: selection.one_hot_pooled_permuted_keys(k, p, **sizes))
    expected = one_hot(k, perm)
    calls = [("one-hot einsum (XLA)", one_hot)] + [
        (repr(t), jax.jit(functools.partial(permuted_block_means, tiles=t, **sizes)))
        for t in POOL_TILES
    ]
    rows = []
    for name, fn in calls:
        gpu = gpu_us(fn, k, perm)
        diff = float(jnp.max(jnp.abs(fn(k, perm) - expected)))
        rows.append({"tiles": name, "ms": time(fn, k, perm), "gpu_us": gpu, "max_diff": diff})
    return rows


def run(lengths, heads=32, kv_heads=8, dim=128, smoke=False) -> dict:
    payload = {"stamp": timing.stamp(), "shape": [1, heads, kv_heads, dim], "rows": []}
    for n in lengths:
        time = timer(n, smoke)
        q, k, _ = structured_qkv(jax.random.key(n + 1), 1, n, heads, kv_heads, dim, jnp.bfloat16)
        row = {"n": n}
        for rule, cfg in RULES.items():
            row[f"plan_{rule}"] = profiled(plan_fn(cfg), q, k, time=time)
        estimate = jax.jit(functools.partial(cost_model.estimate_density, cfg=PBSConfig()))
        row["estimate"] = profiled(estimate, q, k, time=time)
        row.update(sweeps(q, k, time))
        payload["rows"].append(row)
        print(render([row]), flush=True)
    return payload


def render(rows) -> str:
    lines = []
    for r in rows:
        lines.append(f"\n## N = {r['n']}\n")
        lines.append("| call | wall ms | GPU µs | launches | largest kernels (µs) |")
        lines.append("|---|---|---|---|---|")
        for name in ("plan_paper", "plan_default", "estimate"):
            p = r[name]
            top = ", ".join(f"{k[:40]} {us:.1f}" for k, _, us in p["kernels"][:5])
            lines.append(
                f"| {name} | {p['wall_ms']:.3f} | {p['gpu_us']:.1f} | {p['launches']:.0f} | {top} |"
            )
        lines.append("\n| importance tiles | rule | ms |\n|---|---|---|")
        lines += [f"| {s['tiles']} | {s['rule']} | {s['ms']:.3f} |" for s in r["importance"]]
        lines.append("\n| top-p tiles | ms | mask = default's |\n|---|---|---|")
        lines += [
            f"| {s['tiles']} | {s.get('ms', float('nan')):.3f} | {s.get('same', s.get('error'))} |"
            for s in r["top_p"]
        ]
        if "pooling" in r:
            lines.append("\n| pooling | ms | GPU µs | max diff |\n|---|---|---|---|")
            lines += [
                f"| {s['tiles']} | {s['ms']:.3f} | {s['gpu_us']:.1f} | {s['max_diff']:.1e} |"
                for s in r["pooling"]
            ]
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (untimed)")


def bench(args, out):
    if args.smoke:
        return run([512], heads=2, kv_heads=1, dim=64, smoke=True)
    return run(args.lengths)


def report(payload, out: pathlib.Path, name: str = "profile_plan"):
    st = payload["stamp"]
    head = f"# Plan profile — {st['device']}, JAX {st['jax']}, {st['date']}\n"
    if payload.get("note"):
        head += f"\n{payload['note']}\n"
    (out / f"{name}.md").write_text(head + render(payload["rows"]) + "\n")


def main(argv=None):
    timing.benchmark_cli(
        argv, __doc__, "profile_plan", add_arguments, bench, report, runs_off_gpu=lambda a: a.smoke
    )


if __name__ == "__main__":
    main()
