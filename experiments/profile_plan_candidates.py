"""The first profile of the plan (before the tuning) and the candidate rewrites it tried, as run
on the H200 on 2026-11-30 (results/profile_plan_candidates.json; the run stopped at its 560 s
limit in the 128K candidates). Kept as the record behind experiments/NOTES.md's numbers; the
study to re-run is experiments/profile_plan.py.

Candidates (paper rule, B=1, 32/8 heads of 128, bf16): the segment sort as a rank by [S, S]
comparisons (two fused reductions, or one and a scatter); the pooled permuted keys from that
rank with 16-bit one-hot operands; the index lists by a sort or by comparisons; importance
tiles. Each checked equal to the op's own stage before it is profiled.

  python -m experiments.profile_plan_candidates   # on a GPU; $OUT/profile_plan_candidates.json
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_kernel import timer
from experiments.lib import timing
from experiments.lib.kernel_trace import kernel_profile
from experiments.lib.synthetic import structured_qkv
from experiments.profile_plan import plan_fn
from pallas_kernels import ImportanceTiles, proxy_importance
from pbs_jax import PBSConfig, blocks, cost_model, permutation, selection

IMPORTANCE_TILES = (
    ImportanceTiles(128, 128, 1024, 8, 2),
    ImportanceTiles(128, 128, 512, 8, 2),
    ImportanceTiles(128, 128, 256, 8, 2),
    ImportanceTiles(64, 128, 512, 4, 2),
    ImportanceTiles(128, 64, 512, 4, 2),
    ImportanceTiles(128, 128, 2048, 8, 3),
    ImportanceTiles(64, 64, 256, 4, 2),
)


def show(title, rows) -> float:
    """Print a profile (``kernel_profile``'s rows); its GPU µs per call."""
    total = sum(r[2] for r in rows)
    print(
        f"\n== {title}: GPU kernel time {total:.1f} us/call, {sum(r[1] for r in rows):.0f} kernels"
    )
    for name, count, us in rows[:14]:
        print(f"  {us:8.1f} us  x{count:4.1f}  {name[:90]}")
    return total


# ---- candidates ----
def segment_ranks(scores, cfg):
    """``scores [B, Hp, G*S]`` → ``[B, Hp, G, S]`` int32, the slot of each key in its segment
    (stable descending), by [S, S] comparisons instead of a sort."""
    b, hp, complete = scores.shape
    s = cfg.segment_size
    x = scores.reshape(b, hp, complete // s, s)
    i = jnp.arange(s)
    ahead = (x[..., None, :] > x[..., :, None]) | (
        (x[..., None, :] == x[..., :, None]) & (i[None, :] < i[:, None])
    )
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def perm_from_segments(perm_seg, n):
    """``[B, Hp, G, S]`` slot → position inside each segment → ``perm [B, Hp, N]`` (the
    remainder in place)."""
    b, hp, g, s = perm_seg.shape
    perm = (perm_seg + (jnp.arange(g) * s)[:, None]).reshape(b, hp, g * s)
    rest = jnp.broadcast_to(jnp.arange(g * s, n, dtype=jnp.int32), (b, hp, n - g * s))
    return jnp.concatenate([perm, rest], -1)


def rank_perm(scores, n, cfg):
    """The inverse of the ranks by a second [S, S] compare-reduce."""
    rank = segment_ranks(scores, cfg)
    i = jnp.arange(cfg.segment_size)
    inverse = jnp.sum(
        jnp.where(rank[..., None, :] == i[:, None], i[None, :], 0), axis=-1, dtype=jnp.int32
    )
    return perm_from_segments(inverse, n), rank


def rank_perm_scatter(scores, n, cfg):
    """The inverse of the ranks by a scatter."""
    rank = segment_ranks(scores, cfg)
    s = cfg.segment_size
    flat = rank.reshape(-1, s)
    rows = jnp.arange(flat.shape[0])[:, None]
    inverse = jnp.zeros_like(flat).at[rows, flat].set(jnp.arange(s, dtype=jnp.int32))
    return perm_from_segments(inverse.reshape(rank.shape), n), rank


def pooled_from_rank(k, rank, cfg, hp):
    # k [B,N,Hkv,D]; rank [B,Hp,G,S]; complete segments only, rest plain block means
    b, n, hkv, d = k.shape
    s = cfg.segment_size
    g = rank.shape[2]
    spb = s // cfg.block_size
    oh = jax.nn.one_hot(rank // cfg.block_size, spb, dtype=k.dtype)  # [B,Hp,G,S,spb]
    oh = oh.reshape(b, hkv, hp // hkv, g, s, spb)
    kg = k[:, : g * s].reshape(b, g, s, hkv, d)
    summed = jnp.einsum("bkrgsj,bgskd->bgjkrd", oh, kg, preferred_element_type=jnp.float32)
    pooled = summed.reshape(b, g * spb, hp, d) / cfg.block_size
    tail = selection.mean_pool_blocks(k[:, g * s :], cfg.block_size) if n > g * s else None
    if tail is not None:
        tail = jnp.repeat(tail, hp // hkv, axis=2)
        pooled = jnp.concatenate([pooled, tail], 1)
    return pooled


def lists_sort(mask):
    """Index-list ids by a sort of (unselected last, then id)."""
    t = mask.shape[-1]
    key = jnp.where(mask, jnp.arange(t), t + jnp.arange(t)).astype(jnp.int32)
    ids = jnp.sort(key, axis=-1)
    return jnp.where(ids < t, ids, 0)


def lists_cmp(mask):
    """Index-list ids by [T, T] comparisons with the running count."""
    t = mask.shape[-1]
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    j = jnp.arange(t)
    ids = jnp.sum(
        jnp.where(mask[..., None, :] & (pos[..., None, :] == j[:, None]), j[None, :], 0),
        -1,
        dtype=jnp.int32,
    )
    return ids


def main():
    payload = {"stamp": timing.stamp()}
    res = payload
    print(payload["stamp"], flush=True)
    for n in (8192, 131072):
        q, k, v = structured_qkv(jax.random.key(n + 1), 1, n, 32, 8, 128, jnp.bfloat16)
        time = timer(n)
        for cname, cfg in (("paper", PBSConfig.paper()), ("default", PBSConfig())):
            f = plan_fn(cfg)
            ms = time(f, q, k)
            rows = kernel_profile(f, q, k)
            tot = show(f"plan {cname} N={n} wall {ms:.3f} ms", rows)
            res[f"plan_{cname}_{n}"] = dict(wall_ms=ms, gpu_us=tot, kernels=rows[:30])
        est = jax.jit(functools.partial(cost_model.estimate_density, cfg=PBSConfig()))
        ms = time(est, q, k)
        rows = kernel_profile(est, q, k)
        res[f"estimate_{n}"] = dict(
            wall_ms=ms, gpu_us=show(f"estimate N={n} wall {ms:.3f}", rows), kernels=rows[:30]
        )
        # candidates (paper cfg)
        cfg = PBSConfig.paper()
        scores = jax.jit(functools.partial(permutation.key_importance, cfg=cfg))(q, k)
        ref_perm = permutation.segment_permutation(scores, n, cfg)
        cands = {
            "argsort": jax.jit(lambda s: permutation.segment_permutation(s, n, cfg)),
            "rank_cmp": jax.jit(lambda s: rank_perm(s, n, cfg)[0]),
            "rank_scatter": jax.jit(lambda s: rank_perm_scatter(s, n, cfg)[0]),
        }
        for name, fn in cands.items():
            same = bool((fn(scores) == ref_perm).all())
            ms = time(fn, scores)
            rows = kernel_profile(fn, scores)
            res[f"perm_{name}_{n}"] = dict(
                wall_ms=ms,
                gpu_us=show(f"perm {name} N={n} same={same} wall {ms:.3f}", rows),
                same=same,
            )
        _, rank = rank_perm(scores, n, cfg)
        pk_ref = jax.jit(lambda k, p: selection.one_hot_pooled_permuted_keys(k, p, 128, 256))
        pk_new = jax.jit(lambda k, r: pooled_from_rank(k, r, cfg, 32))
        a, bb = pk_ref(k, ref_perm), pk_new(k, rank)
        err = float(jnp.max(jnp.abs(a - bb)))
        for name, fn, arg in (("pool_ref", pk_ref, ref_perm), ("pool_rank", pk_new, rank)):
            ms = time(fn, k, arg)
            rows = kernel_profile(fn, k, arg)
            res[f"{name}_{n}"] = dict(
                wall_ms=ms, gpu_us=show(f"{name} N={n} maxdiff={err:.2e} wall {ms:.3f}", rows)
            )
        mask = jax.jit(lambda q, k, p: selection.select_blocks(q, k, p, cfg))(q, k, ref_perm)
        ref_l = blocks.index_lists(mask, cfg)
        for name, fn in (
            ("lists_ref", jax.jit(lambda m: blocks.index_lists(m, cfg))),
            ("lists_sort", jax.jit(lists_sort)),
            ("lists_cmp", jax.jit(lists_cmp)),
        ):
            if name == "lists_cmp" and n > 32768:
                continue
            out = fn(mask)
            ids = out.ids if name == "lists_ref" else out
            tot_ok = np.arange(mask.shape[-1]) < np.asarray(ref_l.total_counts)[..., None]
            same = bool(np.all(np.where(tot_ok, np.asarray(ids) == np.asarray(ref_l.ids), True)))
            ms = time(fn, mask)
            rows = kernel_profile(fn, mask)
            res[f"{name}_{n}"] = dict(
                wall_ms=ms, gpu_us=show(f"{name} N={n} same={same} wall {ms:.3f}", rows), same=same
            )
        # importance tiles sweep (paper proxy: 128 rows) at this n
        proxy = permutation.proxy_queries(q, cfg)
        keys = k[:, : (n // 256) * 256]
        proxy4 = permutation.proxy_queries(q, PBSConfig())
        for nm, px in (("p128", proxy), ("p512", proxy4)):
            for tl in IMPORTANCE_TILES:
                if px.shape[1] % tl.block_rows:
                    continue
                fn = jax.jit(functools.partial(proxy_importance, tiles=tl))
                try:
                    ms = time(fn, px, keys)
                    rows = kernel_profile(fn, px, keys)
                    tot = sum(r[2] for r in rows)
                except Exception as e:
                    print("tile fail", tl, e)
                    continue
                print(f"  importance {nm} N={n} {tl}: wall {ms:.3f} gpu {tot:.1f} us")
                res.setdefault("importance", []).append(
                    dict(n=n, proxy=nm, tiles=str(tl), wall_ms=ms, gpu_us=tot)
                )
        timing.write_json(timing.out_dir() / "profile_plan_candidates.json", payload)


if __name__ == "__main__":
    main()
