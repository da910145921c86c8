"""The importance's column pass on keys × rows tiles, and the cost of ``impl="auto"``'s
conditionals at 8K, as run on one H200 on 2026-11-30 (JAX 0.11.2;
results/explore_columns_transposed.{json,log}). Kept as the record behind experiments/NOTES.md's
7th-session rows and the default importance tiles; not a maintained study.

Paper rule's proxy (128 rows), 32/8 heads of 128, bf16, structured inputs: GPU time of
``proxy_importance`` with the column sums as they were (rows × keys tiles, summed over axis 0)
and transposed (keys × rows, summed over axis 1), over tiles, with the relative difference to the
first; at 8K, cuDNN, auto, the sparse op, and cuDNN after the estimate with and without a
``lax.cond`` between, in two interleaved rounds (too noisy to conclude on the conditionals).
"orig" is the rows × keys version as it was then (kept here: the library has only the transposed
one since), "T" the library's ``probability_column_sums``.

  python -m experiments.explore_columns_transposed  # on a GPU: $OUT/explore_columns_transposed.json
"""

import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

import pbs_jax
from experiments.bench_kernel import WEAK_STRUCTURE, timer
from experiments.lib import timing
from experiments.lib.kernel_trace import kernel_profile
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import ImportanceTiles
from pbs_jax import PBSConfig, cost_model, permutation
from pbs_jax.attention import dense_attention

imp = importlib.import_module("pallas_kernels.importance")
TRANSPOSED = imp.probability_column_sums  # the library's (keys × rows)
OUT = os.environ.get("OUT", "out")
cfg = PBSConfig.paper()
res = {}


def cols_rows_keys(
    q_ref,
    lse_ref,
    key_tiles,
    *,
    block_rows,
    num_row_tiles,
    qk_scale,
    precision,
    real_rows=None,
    keys_in=None,
):
    """The column sums as they were before this exploration (rows × keys logits tiles, summed
    over axis 0: a cross-warp reduction per key tile); the library's computes keys × rows."""

    def step(r, sums):
        start = r * block_rows
        q = q_ref[pl.ds(start, block_rows), :]
        lse = lse_ref[pl.ds(start, block_rows)]
        if real_rows is not None:
            row_in = start + lax.broadcasted_iota(jnp.int32, (block_rows,), 0) < real_rows

        def probabilities(keys, key_in):
            p = jnp.exp2(
                jnp.dot(q, keys.T, precision=precision, preferred_element_type=jnp.float32)
                * qk_scale
                - lse[:, None]
            )
            if real_rows is not None:
                p = jnp.where(row_in[:, None], p, 0.0)
            if key_in is not None:
                p = jnp.where(key_in[None, :], p, 0.0)
            return p

        return tuple(
            acc + jnp.sum(probabilities(keys, key_in), axis=0)
            for acc, keys, key_in in zip(sums, key_tiles, keys_in or (None,) * len(key_tiles))
        )

    zeros = tuple(jnp.zeros((keys.shape[0],), jnp.float32) for keys in key_tiles)
    return lax.fori_loop(0, num_row_tiles, step, zeros)


def gpu(fn, *a):
    rows = kernel_profile(fn, *a)
    return round(sum(r[2] for r in rows), 1), [(x[:34], round(z, 1)) for x, y, z in rows[:4]]


T = [
    ImportanceTiles(128, 64, 512, 4, 2, 2),
    ImportanceTiles(128, 128, 512, 4, 2, 1),
    ImportanceTiles(128, 128, 512, 8, 2, 1),
    ImportanceTiles(128, 64, 512, 4, 2, 1),
    ImportanceTiles(128, 128, 512, 8, 2, 2),
    ImportanceTiles(128, 64, 512, 8, 2, 2),
    ImportanceTiles(128, 128, 512, 4, 3, 1),
]


def main():
    print(timing.stamp(), flush=True)  # card, JAX, date
    for n in (8192, 131072):
        q, k, v = structured_qkv(jax.random.key(1), 1, n, 32, 8, 128)
        proxy = permutation.proxy_queries(q, cfg)
        keys = k
        for name, f in (("orig", cols_rows_keys), ("T", TRANSPOSED)):
            imp.probability_column_sums = f
            for t in T if n == 8192 else T[:3]:
                jax.clear_caches()
                fn = jax.jit(functools.partial(imp.proxy_importance, tiles=t))
                out = fn(proxy, keys)
                if name == "orig" and t == T[0]:
                    ref = out
                rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
                us, rows = gpu(fn, proxy, keys)
                colus = [z for x, z in rows if "columns" in x]
                print(
                    n,
                    name,
                    t.block_keys,
                    t.column_tiles,
                    t.num_warps,
                    t.num_stages,
                    "total",
                    us,
                    "cols",
                    colus,
                    f"rel {rel:.1e}",
                    flush=True,
                )
                res[f"{n} {name} {t}"] = (us, colus, rel)
        imp.probability_column_sums = TRANSPOSED
        jax.clear_caches()
        if n == 8192:
            time = timer(n)
            for fam, (q2, k2, v2) in (
                (
                    "weak",
                    structured_qkv(
                        jax.random.key(n + 2),
                        1,
                        n,
                        32,
                        8,
                        128,
                        jnp.bfloat16,
                        structure=WEAK_STRUCTURE,
                    ),
                ),
                ("structured", (q, k, v)),
            ):
                cud = jax.jit(dense_attention)
                auto = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="auto"))
                pallas = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="pallas"))
                est_cud = jax.jit(
                    lambda q, k, v: (
                        dense_attention(q, k, v),
                        cost_model.estimate_density(q, k, cfg),
                    )
                )
                est_cond = jax.jit(
                    lambda q, k, v: lax.cond(
                        cost_model.estimate_density(q, k, cfg) > 5.0,
                        lambda: dense_attention(q, k, v) * 0,
                        lambda: dense_attention(q, k, v),
                    )
                )
                cond_only = jax.jit(
                    lambda q, k, v: lax.cond(
                        jnp.sum(q[0, 0, 0]) > 1e9,
                        lambda: dense_attention(q, k, v) * 0,
                        lambda: dense_attention(q, k, v),
                    )
                )
                r = {}
                for _ in range(2):  # interleave twice
                    for nm, f in (
                        ("cudnn", cud),
                        ("auto", auto),
                        ("pallas", pallas),
                        ("est+cudnn", est_cud),
                        ("est->cond->cudnn", est_cond),
                        ("cond->cudnn", cond_only),
                    ):
                        r.setdefault(nm, []).append(round(time(f, q2, k2, v2), 4))
                res[f"cond {fam}"] = r
                print("8192", fam, r, flush=True)
        del q, k, v
    json.dump(
        {"stamp": timing.stamp(), "results": res},
        open(f"{OUT}/explore_columns_transposed.json", "w"),
        default=str,
        indent=1,
    )


if __name__ == "__main__":
    main()
