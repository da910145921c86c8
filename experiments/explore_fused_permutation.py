"""Runs at commit 3440a84 only: the module it measures (``pallas_kernels.proxy_permutation``) and
the plan's switch for it were deleted after (slower than the stages it replaced). Check it out
first: ``git worktree add ../pbs-3440a84 3440a84`` (or ``git checkout 3440a84 -- pallas_kernels
pbs_jax``), then run it there.

Where the fused permutation pass (``pallas_kernels.proxy_permutation``) spends its time, as run
on one H200 on 2026-11-30 (JAX 0.11.2; results/explore_fused_permutation.{json,log}). Kept as the
record behind experiments/NOTES.md's 7th-session rows; not a maintained study.

Paper rule, B=1, 32/8 heads of 128, bf16, structured inputs, 8K and 128K: the unfused stages'
GPU time; the fused pass's segment kernel in four variants swapped in for its body (``full``;
``cols``: the column sums alone; ``rank``: + the rank and slot positions; ``dotpool``: the
pooling as a one-hot dot), over importance tiles, each checked against the unfused permutation
(slots that differ) and pooled keys (max difference); the whole plan with the fused pass; the
pooled queries by XLA and by a prototype Pallas kernel.

  python -m experiments.explore_fused_permutation  # on a GPU: $OUT/explore_fused_permutation.json
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
from experiments.lib import timing
from experiments.lib.kernel_trace import kernel_profile
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import ImportanceTiles, _checks
from pallas_kernels.importance_passes import probability_column_sums, split_key_tiles
from pbs_jax import PBSConfig, permutation, selection

try:
    ppm = importlib.import_module("pallas_kernels.proxy_permutation")
except ImportError:
    raise SystemExit(
        "explore_fused_permutation measures pallas_kernels.proxy_permutation, deleted after commit "
        "3440a84: run it at that commit (git worktree add ../pbs-3440a84 3440a84)"
    ) from None
ORIG = ppm._segment_order_kernel
OUT = os.environ.get("OUT", "out")
cfg = PBSConfig.paper()
res = {}


def variant(mode):
    def kern(
        q_ref,
        k_ref,
        lse_ref,
        pos_ref,
        pooled_ref,
        *,
        block_rows,
        num_row_tiles,
        block_keys,
        block_size,
        qk_scale,
        precision,
    ):
        key_tiles = split_key_tiles(k_ref, block_keys)
        importance = probability_column_sums(
            q_ref,
            lse_ref,
            key_tiles,
            block_rows=block_rows,
            num_row_tiles=num_row_tiles,
            qk_scale=qk_scale,
            precision=precision,
        )
        if mode == "cols":
            for t, imp in enumerate(importance):
                pos_ref[pl.ds(t * block_keys, block_keys)] = (imp * 1e6).astype(jnp.int32)
            pooled_ref[...] = jnp.zeros(pooled_ref.shape, jnp.float32)
            return
        row = lax.broadcasted_iota(jnp.int32, (block_keys, block_keys), 0)
        col = lax.broadcasted_iota(jnp.int32, (block_keys, block_keys), 1)
        ranks = []
        for a, mine in enumerate(importance):
            mine = mine[:, None]
            rank = jnp.zeros((block_keys,), jnp.int32)
            for c, theirs in enumerate(importance):
                theirs = theirs[None, :]
                if c < a:
                    ahead = theirs >= mine
                elif c > a:
                    ahead = theirs > mine
                else:
                    ahead = (theirs > mine) | ((theirs == mine) & (col < row))
                rank = rank + jnp.sum(ahead.astype(jnp.int32), axis=1)
            ranks.append(rank)
        segment_start = pl.program_id(0) * k_ref.shape[0]
        for slot_tile in range(len(key_tiles)):
            slot = slot_tile * block_keys + row
            pos = jnp.zeros((block_keys,), jnp.int32)
            for a, rank in enumerate(ranks):
                pos = pos + jnp.sum(
                    jnp.where(rank[None, :] == slot, a * block_keys + col, 0), axis=1
                )
            pos_ref[pl.ds(slot_tile * block_keys, block_keys)] = segment_start + pos
        blocks = [lax.div(rank, block_size) for rank in ranks]
        if mode == "rank":
            pooled_ref[...] = jnp.zeros(pooled_ref.shape, jnp.float32)
            return
        if mode == "dotpool":
            r16 = lax.broadcasted_iota(jnp.int32, (16, block_keys), 0)
            acc = jnp.zeros((16, k_ref.shape[1]), jnp.float32)
            for keys, block in zip(key_tiles, blocks):
                onehot = (block[None, :] == r16).astype(keys.dtype)
                acc = acc + jnp.dot(onehot, keys, preferred_element_type=jnp.float32)
            r16d = lax.broadcasted_iota(jnp.int32, acc.shape, 0)
            for t in range(pooled_ref.shape[0]):
                pooled_ref[t, :] = jnp.sum(jnp.where(r16d == t, acc, 0.0), axis=0) / block_size
            return
        for t in range(pooled_ref.shape[0]):
            total = jnp.zeros((k_ref.shape[1],), jnp.float32)
            for keys, block in zip(key_tiles, blocks):
                in_block = (block == t)[:, None]
                total = total + jnp.sum(jnp.where(in_block, keys.astype(jnp.float32), 0.0), axis=0)
            pooled_ref[t, :] = total / block_size

    return kern


def gpu_us(fn, *args):
    rows = kernel_profile(fn, *args)
    return sum(r[2] for r in rows), rows[:8]


def pool_q_kernel(x_ref, o_ref, *, rows):
    acc = jnp.zeros((x_ref.shape[-1],), jnp.float32)

    def step(i, acc):
        return acc + jnp.sum(x_ref[pl.ds(i * rows, rows), :].astype(jnp.float32), axis=0)

    acc = lax.fori_loop(0, x_ref.shape[0] // rows, step, acc)
    o_ref[...] = acc / x_ref.shape[0]


def pool_q(q, rows=32, warps=4, bs=128):
    b, n, h, d = q.shape
    return pl.pallas_call(
        functools.partial(pool_q_kernel, rows=rows),
        out_shape=jax.ShapeDtypeStruct((b, n // bs, h, d), jnp.float32),
        grid=(n // bs, b, h),
        in_specs=[pl.BlockSpec((None, bs, None, d), lambda t, bi, hh: (bi, t, hh, 0))],
        out_specs=pl.BlockSpec((None, None, None, d), lambda t, bi, hh: (bi, t, hh, 0)),
        compiler_params=_checks.triton_compiler_params(
            ImportanceTiles(num_warps=warps, num_stages=2)
        ),
        name=f"poolq_r{rows}_w{warps}",
    )(q)


TILES = [
    ImportanceTiles(128, 64, 512, 4, 2),
    ImportanceTiles(128, 128, 512, 4, 2),
    ImportanceTiles(128, 128, 512, 8, 2),
    ImportanceTiles(64, 128, 512, 4, 2),
    ImportanceTiles(128, 64, 512, 8, 2),
    ImportanceTiles(128, 128, 512, 8, 3),
]


def main():
    print(timing.stamp(), flush=True)  # card, JAX, date
    for n in (8192, 131072):
        q, k, v = structured_qkv(jax.random.key(1), 1, n, 32, 8, 128)
        r = res[n] = {}
        proxy = permutation.proxy_queries(q, cfg)
        base = jax.jit(lambda q, k: permutation.plan_permutation(q, k, cfg)[0])
        perm0 = base(q, k)
        pk0 = jax.jit(lambda k, p: selection.pooled_permuted_keys(k, p, 128, 256))(k, perm0)
        unfused = jax.jit(
            lambda q, k: (lambda p: (p, selection.pooled_permuted_keys(k, p, 128, 256)))(
                permutation.plan_permutation(q, k, cfg)[0]
            )
        )
        r["unfused"] = gpu_us(unfused, q, k)
        print(
            n,
            "unfused",
            round(r["unfused"][0], 1),
            [(a[:30], round(c, 1)) for a, b, c in r["unfused"][1]],
            flush=True,
        )
        plan = jax.jit(lambda q, k: pbs_jax.pbs_plan(q, k, cfg)[::2])
        r["plan_unfused"] = gpu_us(plan, q, k)[0]
        for mode in ("full", "cols", "rank", "dotpool"):
            ppm._segment_order_kernel = variant(mode)
            for tiles in TILES if n == 8192 or mode == "dotpool" else TILES[:3]:
                jax.clear_caches()
                fn = jax.jit(
                    functools.partial(
                        ppm.proxy_permutation, segment_size=256, block_size=128, tiles=tiles
                    )
                )
                try:
                    pos, pk = fn(proxy, k)
                    us, rows = gpu_us(fn, proxy, k)
                except Exception as e:
                    print(n, mode, tiles, "ERR", str(e)[:200], flush=True)
                    continue
                same = int((pos != perm0).sum()) if mode != "cols" else -1
                diff = float(jnp.abs(pk - pk0).max()) if mode in ("full", "dotpool") else -1
                t = tiles
                key = f"{mode} {t.block_rows}x{t.block_keys} w{t.num_warps} s{t.num_stages}"
                seg = [c for a, b, c in rows if "segments" in a]
                r[key] = dict(us=us, seg=seg, mismatch=same, diff=diff)
                print(n, key, f"total {us:.1f} seg {seg} mism {same} diff {diff:.1e}", flush=True)
        # whole plan with the fused pass (dotpool at default tiles)
        ppm._segment_order_kernel = variant("dotpool")
        permutation.FUSED_PERMUTATION = True
        jax.clear_caches()
        plan = jax.jit(lambda q, k: pbs_jax.pbs_plan(q, k, cfg)[::2])
        r["plan_fused_dotpool"] = gpu_us(plan, q, k)
        permutation.FUSED_PERMUTATION = False
        print(
            n,
            "plan unfused",
            r["plan_unfused"],
            "fused dotpool",
            r["plan_fused_dotpool"][0],
            flush=True,
        )
        # pooled q
        xla = jax.jit(lambda q: selection.mean_pool_blocks(q, 128))
        ref = xla(q)
        r["poolq_xla"] = gpu_us(xla, q)[0]
        for rows, warps in ((16, 4), (32, 4), (64, 4), (32, 8), (128, 8), (64, 2)):
            fn = jax.jit(functools.partial(pool_q, rows=rows, warps=warps))
            try:
                d = float(jnp.abs(fn(q) - ref).max())
                r[f"poolq r{rows} w{warps}"] = (gpu_us(fn, q)[0], d)
            except Exception as e:
                print("poolq ERR", str(e)[:200])
        print(n, {kk: vv for kk, vv in r.items() if "poolq" in kk}, flush=True)
        del q, k, v

    json.dump(
        {"stamp": timing.stamp(), "results": res},
        open(f"{OUT}/explore_fused_permutation.json", "w"),
        default=str,
        indent=1,
    )


if __name__ == "__main__":
    main()
