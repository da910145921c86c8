"""GPU probe of the Mosaic GPU kernel: correctness against the exact reference, then speed beside
cuDNN and the Triton kernel, for kernel variants (SMEM stages, launch order).

  python -m experiments.probe_mgpu 8192 131072     # GPU: $OUT/probe_mgpu.{json,md}
  python -m experiments.probe_mgpu --report experiments/results/probe_mgpu.json

Variant names: mgpu_s{stages}{b|h}, b = query blocks fastest in the launch order (the kernel's
default), h = heads fastest.
"""

from __future__ import annotations

import pathlib
import sys
import traceback

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.lib import kernels, timing
from experiments.lib.metrics import rel_err
from experiments.lib.synthetic import structured_qkv
from pbs_jax import PBSConfig, blocks, permutation

CHECKS = (
    (1024, 2, 1, 64, "replicate"),
    (4096, 8, 2, 128, "replicate"),
    (4096, 8, 2, 128, "shared"),
    (2048, 4, 4, 64, "replicate"),
)


def check(n, h, hk, d, gqa, dtype=jnp.bfloat16):
    cfg = PBSConfig.paper(gqa=gqa)
    q, k, v = structured_qkv(jax.random.key(n + h + d), 1, n, h, hk, d, dtype)
    perm, mask, lists = jax.jit(pbs_jax.pbs_plan, static_argnums=2)(q, k, cfg)
    kp, vp = permutation.gather_keys(k, perm), permutation.gather_keys(v, perm)
    out = kernels.mosaic_kernel(cfg)(q, kp, vp, k, v, lists.ids, lists.full_counts)
    ref = pbs_jax.permuted_block_sparse_attention(q, k, v, perm, mask, cfg.block_size)
    return {
        "n": n,
        "h": h,
        "hk": hk,
        "d": d,
        "gqa": gqa,
        "density": float(blocks.density(mask).mean()),
        "rel_err": rel_err(out, ref),
        "finite": bool(jnp.isfinite(out).all()),
    }


def speed(n, variants=((2, True), (2, False), (3, True))):
    cfg = PBSConfig.paper()
    b, h, hk, d = 1, 32, 8, 128
    q, k, v = kernels.random_qkv(jax.random.key(n), b, n, h, hk, d)
    t = pbs_jax.num_blocks(n, cfg.block_size)
    row = {"n": n, "cudnn_ms": timing.time_call(kernels.cudnn_attention, q, k, v)}
    ident = permutation.identity_permutation(b, hk, n)
    triton = kernels.triton_kernel(cfg, gather_kv=False)
    for target in (1.0, 0.2):
        mask = blocks.fixed_density_mask(jax.random.key(7), (b, h, t), target, cfg)
        lists = blocks.index_lists(mask, cfg)
        tag = f"d{int(target * 100)}"
        if target == 1.0:
            ref = kernels.cudnn_attention(q, k, v)
        for stages, bf in variants:
            name = f"mgpu_s{stages}{'b' if bf else 'h'}"
            try:
                fn = kernels.mosaic_kernel(cfg, stages, bf)
                out = fn(q, k, v, k, v, lists.ids, lists.full_counts)
                if target == 1.0:
                    row[f"{name}_dense_rel_err_vs_cudnn"] = rel_err(out, ref)
                row[f"{name}_{tag}_ms"] = timing.time_call(
                    fn, q, k, v, k, v, lists.ids, lists.full_counts
                )
            except Exception:
                row[f"{name}_{tag}_error"] = traceback.format_exc()[-1500:]
                print(row[f"{name}_{tag}_error"], flush=True)
        row[f"triton_{tag}_ms"] = timing.time_call(triton, q, k, v, ident, *lists)
        row[f"density_{tag}"] = float(blocks.density(mask).mean())
    print(row, flush=True)
    return row


def report(payload, out: pathlib.Path, name: str = "probe_mgpu") -> None:
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
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def bench(args, out: pathlib.Path) -> dict:
    payload = {"stamp": timing.stamp(), "checks": [], "speed": []}
    for shape in CHECKS:
        try:
            payload["checks"].append(check(*shape))
        except Exception:
            payload["checks"].append({"args": shape, "error": traceback.format_exc()[-3000:]})
        print(payload["checks"][-1], flush=True)
        timing.write_json(out / "probe_mgpu.json", payload)
        if "error" in payload["checks"][-1]:
            sys.exit(1)
    for n in args.lengths:
        payload["speed"].append(speed(n))
        timing.write_json(out / "probe_mgpu.json", payload)
    return payload


def add_arguments(parser):
    parser.add_argument(
        "lengths",
        type=int,
        nargs="*",
        default=[8192, 32768, 131072],
        help="sequence lengths of the speed rows (default: 8192 32768 131072)",
    )


def main(argv=None):
    timing.benchmark_cli(argv, __doc__, "probe_mgpu", add_arguments, bench, report)


if __name__ == "__main__":
    main()
