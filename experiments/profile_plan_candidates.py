"""The first profile of the plan (before the tuning) and the candidate rewrites it tried, as run
on the H200 on 2026-11-30 (results/profile_plan_candidates.json; the run stopped at its 560 s
limit in the 128K candidates). Kept as the record behind experiments/NOTES.md's numbers; the
study to re-run is experiments/profile_plan.py.

Candidates (paper rule, B=1, 32/8 heads of 128, bf16): the segment sort as a rank by [S, S]
comparisons (two fused reductions, or one and a scatter); the pooled permuted keys from that
rank with 16-bit one-hot operands; the index lists by a sort or by comparisons; importance
tiles. Each checked equal to the op's own stage before it is profiled.

  python -m experiments.profile_plan_candidates   # on a GPU; writes $OUT/explore_plan.json
"""

import collections
import functools
import gzip
import json
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import pbs_jax
from experiments.lib import timing
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import ImportanceTiles, proxy_importance
from pbs_jax import PBSConfig, blocks, cost_model, permutation, selection

OUT = pathlib.Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(exist_ok=True, parents=True)
res = {}


def profile(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    p = next(pathlib.Path(d).rglob("perfetto_trace.json.gz"))
    t = json.load(gzip.open(p))
    names = {
        e["pid"]: e["args"]["name"]
        for e in t["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    agg = collections.defaultdict(lambda: [0, 0.0])
    for e in t["traceEvents"]:
        if e.get("ph") == "X" and "GPU" in str(names.get(e["pid"], "")) and "dur" in e:
            a = agg[e["name"]]
            a[0] += 1
            a[1] += e["dur"]
    rows = sorted(((k, c / reps, us / reps) for k, (c, us) in agg.items()), key=lambda r: -r[2])
    return rows


def show(title, rows):
    tot = sum(r[2] for r in rows)
    print(f"\n== {title}: GPU kernel time {tot:.1f} us/call, {sum(r[1] for r in rows):.0f} kernels")
    for k, c, us in rows[:14]:
        print(f"  {us:8.1f} us  x{c:4.1f}  {k[:90]}")
    return tot


T = functools.partial(timing.time_call, min_reps=10, max_reps=200, budget_s=1.0)


def plan_fn(cfg):
    return jax.jit(
        lambda q, k: (lambda perm, mask: (perm, blocks.index_lists(mask, cfg)))(
            *pbs_jax.pbs_plan(q, k, cfg)
        )
    )


# ---- candidates ----
def rank_perm(scores, n, cfg):
    b, hp, L = scores.shape
    s = cfg.segment_size
    g = L // s
    x = scores.reshape(b, hp, g, s)
    i = jnp.arange(s)
    before = (x[..., None, :] > x[..., :, None]) | (
        (x[..., None, :] == x[..., :, None]) & (i[None, :] < i[:, None])
    )
    rank = jnp.sum(before, axis=-1, dtype=jnp.int32)  # slot of key i in its segment
    perm_seg = jnp.sum(
        jnp.where(rank[..., None, :] == i[:, None], i[None, :], 0), axis=-1, dtype=jnp.int32
    )
    perm = (perm_seg + (jnp.arange(g) * s)[:, None]).reshape(b, hp, L)
    rem = jnp.broadcast_to(jnp.arange(L, n, dtype=jnp.int32), (b, hp, n - L))
    return jnp.concatenate([perm, rem], -1), rank


def rank_perm_scatter(scores, n, cfg):
    b, hp, L = scores.shape
    s = cfg.segment_size
    g = L // s
    x = scores.reshape(b, hp, g, s)
    i = jnp.arange(s)
    before = (x[..., None, :] > x[..., :, None]) | (
        (x[..., None, :] == x[..., :, None]) & (i[None, :] < i[:, None])
    )
    rank = jnp.sum(before, axis=-1, dtype=jnp.int32)
    flat = rank.reshape(-1, s)
    perm_seg = (
        jnp.zeros_like(flat)
        .at[jnp.arange(flat.shape[0])[:, None], flat]
        .set(i.astype(jnp.int32))
        .reshape(rank.shape)
    )
    perm = (perm_seg + (jnp.arange(g) * s)[:, None]).reshape(b, hp, L)
    rem = jnp.broadcast_to(jnp.arange(L, n, dtype=jnp.int32), (b, hp, n - L))
    return jnp.concatenate([perm, rem], -1), rank


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


def lists_sort(mask, cfg):
    t = mask.shape[-1]
    key = jnp.where(mask, jnp.arange(t), t + jnp.arange(t)).astype(jnp.int32)
    ids = jnp.sort(key, axis=-1)
    ids = jnp.where(ids < t, ids, 0)
    earlier = pbs_jax.earlier_segment_blocks(t, cfg, t - mask.shape[-2])
    return ids, jnp.sum(mask & earlier, -1, dtype=jnp.int32), jnp.sum(mask, -1, dtype=jnp.int32)


def lists_cmp(mask, cfg):
    t = mask.shape[-1]
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    j = jnp.arange(t)
    ids = jnp.sum(
        jnp.where(mask[..., None, :] & (pos[..., None, :] == j[:, None]), j[None, :], 0),
        -1,
        dtype=jnp.int32,
    )
    earlier = pbs_jax.earlier_segment_blocks(t, cfg, t - mask.shape[-2])
    return ids, jnp.sum(mask & earlier, -1, dtype=jnp.int32), jnp.sum(mask, -1, dtype=jnp.int32)


def main():
    print(jax.devices()[0].device_kind, jax.__version__)
    for n in (8192, 131072):
        q, k, v = structured_qkv(jax.random.key(n + 1), 1, n, 32, 8, 128, jnp.bfloat16)
        for cname, cfg in (("paper", PBSConfig.paper()), ("default", PBSConfig())):
            f = plan_fn(cfg)
            ms = T(f, q, k)
            rows = profile(f, q, k)
            tot = show(f"plan {cname} N={n} wall {ms:.3f} ms", rows)
            res[f"plan_{cname}_{n}"] = dict(wall_ms=ms, gpu_us=tot, kernels=rows[:30])
        est = jax.jit(functools.partial(cost_model.estimate_density, cfg=PBSConfig()))
        ms = T(est, q, k)
        rows = profile(est, q, k)
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
            ms = T(fn, scores)
            rows = profile(fn, scores)
            res[f"perm_{name}_{n}"] = dict(
                wall_ms=ms,
                gpu_us=show(f"perm {name} N={n} same={same} wall {ms:.3f}", rows),
                same=same,
            )
        _, rank = rank_perm(scores, n, cfg)
        pk_ref = jax.jit(lambda k, p: selection.pooled_permuted_keys(k, p, 128, 256))
        pk_new = jax.jit(lambda k, r: pooled_from_rank(k, r, cfg, 32))
        a, bb = pk_ref(k, ref_perm), pk_new(k, rank)
        err = float(jnp.max(jnp.abs(a - bb)))
        for name, fn, arg in (("pool_ref", pk_ref, ref_perm), ("pool_rank", pk_new, rank)):
            ms = T(fn, k, arg)
            rows = profile(fn, k, arg)
            res[f"{name}_{n}"] = dict(
                wall_ms=ms, gpu_us=show(f"{name} N={n} maxdiff={err:.2e} wall {ms:.3f}", rows)
            )
        mask = jax.jit(lambda q, k, p: selection.select_blocks(q, k, p, cfg))(q, k, ref_perm)
        ref_l = blocks.index_lists(mask, cfg)
        for name, fn in (
            ("lists_ref", jax.jit(lambda m: blocks.index_lists(m, cfg))),
            ("lists_sort", jax.jit(lambda m: lists_sort(m, cfg))),
            ("lists_cmp", jax.jit(lambda m: lists_cmp(m, cfg))),
        ):
            if name == "lists_cmp" and n > 32768:
                continue
            out = fn(mask)
            tot_ok = np.arange(mask.shape[-1]) < np.asarray(ref_l.total_counts)[..., None]
            same = bool(np.all(np.where(tot_ok, np.asarray(out[0]) == np.asarray(ref_l.ids), True)))
            ms = T(fn, mask)
            rows = profile(fn, mask)
            res[f"{name}_{n}"] = dict(
                wall_ms=ms, gpu_us=show(f"{name} N={n} same={same} wall {ms:.3f}", rows), same=same
            )
        # importance tiles sweep (paper proxy: 128 rows) at this n
        proxy = permutation.proxy_queries(q, cfg)
        keys = k[:, : (n // 256) * 256]
        proxy4 = permutation.proxy_queries(q, PBSConfig())
        for nm, px in (("p128", proxy), ("p512", proxy4)):
            for tl in [
                ImportanceTiles(128, 128, 1024, 8, 2),
                ImportanceTiles(128, 128, 512, 8, 2),
                ImportanceTiles(128, 128, 256, 8, 2),
                ImportanceTiles(64, 128, 512, 4, 2),
                ImportanceTiles(128, 64, 512, 4, 2),
                ImportanceTiles(128, 128, 2048, 8, 3),
                ImportanceTiles(64, 64, 256, 4, 2),
            ]:
                if px.shape[1] % tl.block_rows:
                    continue
                fn = jax.jit(functools.partial(proxy_importance, tiles=tl))
                try:
                    ms = T(fn, px, keys)
                    rows = profile(fn, px, keys)
                    tot = sum(r[2] for r in rows)
                except Exception as e:
                    print("tile fail", tl, e)
                    continue
                print(f"  importance {nm} N={n} {tl}: wall {ms:.3f} gpu {tot:.1f} us")
                res.setdefault("importance", []).append(
                    dict(n=n, proxy=nm, tiles=str(tl), wall_ms=ms, gpu_us=tot)
                )
        (OUT / "explore_plan.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
