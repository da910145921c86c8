"""The paper-rule plan's density on ``structured_qkv`` inputs as their ``structure`` knob varies:
the calibration behind bench_kernel's "paper" family (``PAPER_STRUCTURE``: the structure per
length that gives the paper's own Llama-3.1-8B density, Table 5: 0.579 at 8K, 0.219 at 128K).

Runs anywhere (the plan on CPU takes ~15 s per point at 128K with 8/2 heads):
  python -m experiments.calibrate_structure          # writes $OUT/calibrate_structure.*
  python -m experiments.calibrate_structure --report experiments/results/calibrate_structure.json

Per (length, structure): the mean density of ``pbs_plan``'s block mask (PBSConfig.paper()) on
``structured_qkv(key(N + 1), 1, N, heads, kv_heads, 128)``, the inputs bench_kernel's structured
and paper families use (bench_kernel's own run reports the plan density at 32/8 heads).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from experiments.bench_kernel import PAPER_STRUCTURE
from experiments.lib import report as report_lib
from experiments.lib import timing
from experiments.lib.synthetic import structured_qkv
from pbs_jax import PBSConfig, blocks, pbs_plan

# The paper's Llama-3.1-8B plan density with permutation (Table 5; paper-spec §3.4).
PAPER_DENSITY = {8192: 0.579, 131072: 0.219}
STRUCTURES = {
    8192: (0.3, 0.37, 0.38, 0.4, 0.42, 0.45, 0.5, 1.0),
    131072: (1.0, 1.03, 1.04, 1.05, 1.07, 1.2),
}


def plan_density(n: int, structure: float, heads: int, kv_heads: int) -> float:
    cfg = PBSConfig.paper()
    q, k, _ = structured_qkv(
        jax.random.key(n + 1), 1, n, heads, kv_heads, 128, jnp.bfloat16, structure=structure
    )
    mask = jax.jit(lambda q, k: pbs_plan(q, k, cfg).block_mask)(q, k)
    return float(jnp.mean(blocks.density(mask)))


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=list(STRUCTURES))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)


def bench(args, out):
    rows = [
        {"n": n, "structure": s, "density": plan_density(n, s, args.heads, args.kv_heads)}
        for n in args.lengths
        for s in STRUCTURES.get(n, (1.0,))
    ]
    return {"stamp": timing.stamp(), "heads": [args.heads, args.kv_heads], "rows": rows}


def report(payload, out: pathlib.Path, name: str = "calibrate_structure"):
    st = payload["stamp"]
    lines = [
        f"# Plan density vs structure — {st['device']}, JAX {st['jax']}, {st['date']}",
        "",
        f"PBSConfig.paper(), {payload['heads'][0]}/{payload['heads'][1]} heads, D 128, bf16; "
        "bench_kernel's paper family uses the structure marked *.",
        "",
        *report_lib.table_header("N", "structure", "plan density", "paper's density"),
    ]
    for r in payload["rows"]:
        mark = " *" if PAPER_STRUCTURE.get(r["n"]) == r["structure"] else ""
        paper = PAPER_DENSITY.get(r["n"])
        lines.append(
            report_lib.table_row(
                r["n"], f"{r['structure']}{mark}", f"{r['density']:.4f}", paper or "—"
            )
        )
    plt = report_lib.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["n"] for r in payload["rows"]}):
        pts = sorted((r["structure"], r["density"]) for r in payload["rows"] if r["n"] == n)
        ax.plot(*zip(*pts), "o-", label=f"N = {n}")
        if n in PAPER_DENSITY:
            ax.axhline(PAPER_DENSITY[n], ls=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("structured_qkv structure")
    ax.set_ylabel("paper-rule plan density")
    ax.legend()
    png = report_lib.save_figure(fig, out / f"{name}.png")
    lines += ["", f"![density vs structure]({png})"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    timing.benchmark_cli(
        argv, __doc__, "calibrate_structure", add_arguments, bench, report, lambda a: True
    )


if __name__ == "__main__":
    main()
