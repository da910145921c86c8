"""What the accuracy extensions cost in speed: the whole op (plan + kernel) per selection rule
against cuDNN dense attention, timed side by side on one card.

The extensions (``dense_tail``, ``proxy_blocks``) only add blocks to the lists or rows to the
proxy, never a pass; this measures that claim on the structured inputs of ``bench_kernel``
(B=1, Hq=32, Hkv=8, D=128, bf16). Output: ``bench_rules.{json,md}``.

    python -m experiments.bench_rules [--lengths 8192 131072] [--report results/bench_rules.json]
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.lib import timing
from experiments.lib.metrics import rel_err
from experiments.lib.synthetic import structured_qkv
from pbs_jax import PBSConfig

RULES = {
    "paper (τ 0.9)": PBSConfig.paper(),
    "dense tail 128": PBSConfig.paper(dense_tail=128),
    "dense tail 128, τ 0.85": PBSConfig.paper(dense_tail=128, threshold=0.85),
    "dense tail 128, proxy 4 blocks": PBSConfig.paper(dense_tail=128, proxy_blocks=4),
    "dense tail 128, proxy 4, τ 0.88": PBSConfig.paper(
        dense_tail=128, proxy_blocks=4, threshold=0.88
    ),
    "dense tail 128, proxy 2 blocks": PBSConfig.paper(dense_tail=128, proxy_blocks=2),
    "dense tail 128, proxy 2, τ 0.88": PBSConfig.paper(
        dense_tail=128, proxy_blocks=2, threshold=0.88
    ),
    "PBSConfig() default": PBSConfig(),
}


def bench(args, out: pathlib.Path) -> dict:
    rows = []
    for n in args.lengths:
        q, k, v = structured_qkv(jax.random.key(n + 1), 1, n, 32, 8, 128, jnp.bfloat16)
        cudnn = jax.jit(pbs_jax.dense_attention)
        row = {"n": n, "cudnn_ms": timing.time_call(cudnn, q, k, v), "rules": {}}
        reference = cudnn(q, k, v)
        for name, cfg in RULES.items():
            op = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="pallas"))
            _, aux = pbs_jax.pbs_attention(q, k, v, cfg, impl="pallas", return_aux=True)
            ms = timing.time_call(op, q, k, v)
            row["rules"][name] = {
                "ms": ms,
                "density": float(aux.density),
                "speedup_vs_cudnn": row["cudnn_ms"] / ms,
                # Sparse vs dense attention differ by the dropped mass; finite and bounded.
                "rel_diff_vs_dense": rel_err(op(q, k, v), reference),
            }
            print(f"N={n} {name}: {ms:.2f} ms, density {float(aux.density):.3f}", flush=True)
        rows.append(row)
    return {**timing.stamp(), "shape": "B=1, Hq=32, Hkv=8, D=128, bf16", "rows": rows}


def report(payload, out: pathlib.Path, name: str = "bench_rules"):
    lines = [
        "# Whole op per selection rule vs cuDNN",
        "",
        f"{payload['device']}, JAX {payload['jax']}, {payload['date']}; {payload['shape']}; "
        "structured inputs (planted local + heavy-hitter keys, `experiments/synthetic.py`); "
        'the op = permutation + selection + lists + kernel (`impl="pallas"`). '
        "Script: `experiments/bench_rules.py`.",
        "",
        *([f"Note: {payload['note']}", ""] if "note" in payload else []),
        "| N | cuDNN ms | rule | op ms | density | × cuDNN |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        for rule, r in row["rules"].items():
            lines.append(
                f"| {row['n']} | {row['cudnn_ms']:.2f} | {rule} | {r['ms']:.2f} | "
                f"{r['density']:.3f} | {r['speedup_vs_cudnn']:.2f}× |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])


def main(argv=None):
    timing.benchmark_cli(argv, __doc__, "bench_rules", add_arguments, bench, report)


if __name__ == "__main__":
    main()
