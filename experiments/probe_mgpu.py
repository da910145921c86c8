"""GPU probe of the Mosaic GPU kernel: correctness against the exact reference, then speed beside
cuDNN and the Triton kernel, for kernel variants (SMEM stages, launch order).

  python -m experiments.probe_mgpu 8192 131072     # GPU: $OUT/probe_mgpu.{json,md}
  python -m experiments.probe_mgpu --report experiments/results/probe_mgpu.json

Variant names: mgpu_s{stages}{b|h}, b = query blocks fastest in the launch order (the kernel's
default), h = heads fastest.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import traceback

import jax
import jax.numpy as jnp

import pbs_jax
from experiments import benchutil
from experiments.synthetic import structured_qkv
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention_mgpu import block_sparse_attention_mgpu
from pbs_jax import PBSConfig, blocks, permutation


def mgpu_call(cfg, stages=2, blocks_fastest=True):
    spb = cfg.mask_segment_size // cfg.block_size
    return jax.jit(
        functools.partial(
            block_sparse_attention_mgpu,
            block_size=cfg.block_size,
            segment_blocks=spb,
            stages=stages,
            blocks_fastest=blocks_fastest,
        )
    )


def check(n, h, hk, d, gqa, dtype=jnp.bfloat16):
    cfg = PBSConfig(gqa=gqa)
    q, k, v = structured_qkv(jax.random.key(n + h + d), 1, n, h, hk, d, dtype)
    perm, mask = jax.jit(pbs_jax.pbs_plan, static_argnums=2)(q, k, cfg)
    lists = blocks.index_lists(mask, cfg)
    kp, vp = permutation.gather_keys(k, perm), permutation.gather_keys(v, perm)
    out = mgpu_call(cfg)(q, kp, vp, k, v, lists.ids, lists.full_counts)
    ref = pbs_jax.permuted_block_sparse_attention(q, k, v, perm, mask, cfg.block_size)
    return {
        "n": n,
        "h": h,
        "hk": hk,
        "d": d,
        "gqa": gqa,
        "density": float(blocks.density(mask).mean()),
        "rel_err": benchutil.rel_err(out, ref),
        "finite": bool(jnp.isfinite(out).all()),
    }


def speed(n, variants=((2, True), (2, False), (3, True))):
    cfg = PBSConfig()
    b, h, hk, d = 1, 32, 8, 128
    kq, kk, kv = jax.random.split(jax.random.key(n), 3)
    q = jax.random.normal(kq, (b, n, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, n, hk, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, n, hk, d), jnp.bfloat16)
    t = n // cfg.block_size
    cudnn = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    )
    row = {"n": n, "cudnn_ms": benchutil.time_call(cudnn, q, k, v)}
    ident = permutation.identity_permutation(b, hk, n)
    triton = jax.jit(
        functools.partial(block_sparse_attention, block_size=cfg.block_size, gather_kv=False)
    )
    for target in (1.0, 0.2):
        mask = blocks.fixed_density_mask(jax.random.key(7), (b, h, t), target, cfg)
        lists = blocks.index_lists(mask, cfg)
        tag = f"d{int(target * 100)}"
        if target == 1.0:
            ref = cudnn(q, k, v)
        for stages, bf in variants:
            name = f"mgpu_s{stages}{'b' if bf else 'h'}"
            try:
                fn = mgpu_call(cfg, stages, bf)
                out = fn(q, k, v, k, v, lists.ids, lists.full_counts)
                if target == 1.0:
                    row[f"{name}_dense_rel_err_vs_cudnn"] = benchutil.rel_err(out, ref)
                row[f"{name}_{tag}_ms"] = benchutil.time_call(
                    fn, q, k, v, k, v, lists.ids, lists.full_counts
                )
            except Exception:
                row[f"{name}_{tag}_error"] = traceback.format_exc()[-1500:]
                print(row[f"{name}_{tag}_error"], flush=True)
        row[f"triton_{tag}_ms"] = benchutil.time_call(triton, q, k, v, ident, *lists)
        row[f"density_{tag}"] = float(blocks.density(mask).mean())
    print(row, flush=True)
    return row


def report(payload, out):
    """Markdown next to the JSON: correctness rows, then speed ratios vs cuDNN (same run)."""
    st = payload["stamp"]
    lines = [
        f"# Mosaic GPU kernel probe — {st['device']}, JAX {st['jax']}, {st['date']}",
        "",
        "Correctness (bf16, real PBS plans on structured input, vs the exact reference): "
        + "; ".join(
            f"N={c['n']} Hq={c['h']} Hkv={c['hk']} D={c['d']} {c['gqa']}: rel. err "
            f"{c['rel_err']:.1e}"
            for c in payload["checks"]
            if "rel_err" in c
        ),
        "",
        "Speed: B=1, Hq=32, Hkv=8, D=128, bf16, random blocks at the density shown; "
        "cuDNN time / kernel time.",
        "",
        "| N | density | cuDNN ms | "
        + " | ".join(
            variants := sorted(
                {
                    k[: -len("_d100_ms")]
                    for r in payload["speed"]
                    for k in r
                    if k.endswith("_d100_ms")
                }
            )
        )
        + " |",
        "|---|---|---|" + "---|" * len(variants),
    ]
    for r in payload["speed"]:
        for tag in ("d100", "d20"):
            lines.append(
                f"| {r['n']} | {r[f'density_{tag}']:.2f} | {r['cudnn_ms']:.2f} | "
                + " | ".join(
                    f"{r['cudnn_ms'] / r[f'{v}_{tag}_ms']:.2f}×" if f"{v}_{tag}_ms" in r else "—"
                    for v in variants
                )
                + " |"
            )
    (out / "probe_mgpu.md").write_text("\n".join(lines) + "\n")


def main():
    if sys.argv[1:2] == ["--report"]:
        path = pathlib.Path(sys.argv[2])
        report(json.loads(path.read_text()), path.parent)
        return
    out = benchutil.out_dir()
    payload = {"stamp": benchutil.stamp(), "checks": [], "speed": []}
    for args in [
        (1024, 2, 1, 64, "replicate"),
        (4096, 8, 2, 128, "replicate"),
        (4096, 8, 2, 128, "shared"),
        (2048, 4, 4, 64, "replicate"),
    ]:
        try:
            payload["checks"].append(check(*args))
        except Exception:
            payload["checks"].append({"args": args, "error": traceback.format_exc()[-3000:]})
        print(payload["checks"][-1], flush=True)
        benchutil.write_json(out / "probe_mgpu.json", payload)
        if "error" in payload["checks"][-1]:
            sys.exit(1)
    lengths = [int(x) for x in sys.argv[1:]] or [8192, 32768, 131072]
    for n in lengths:
        payload["speed"].append(speed(n))
        benchutil.write_json(out / "probe_mgpu.json", payload)
    report(payload, out)
    print((out / "probe_mgpu.md").read_text())


if __name__ == "__main__":
    main()
