"""Kernel and whole-op benchmark of PBS attention against cuDNN, side by side on one card.

Run on a GPU (one call does everything: correctness first, then timing, then the report):
  python -m experiments.bench_kernel            # writes $OUT/bench_kernel.json (+ .md, .png)
  python -m experiments.bench_kernel --report experiments/results/bench_kernel.json
                                                # re-renders the markdown table and the plots

Shapes (issue 3): B=1, Hq=32, Hkv=8, D=128, bf16, N in 4K..128K. Rows per N:
  * cuDNN: jax.nn.dot_product_attention(implementation="cudnn", is_causal=True);
  * our kernels at 100% density (every causal block listed) and at fixed densities 10/20/40%
    (random earlier-segment blocks plus the always-computed own-segment blocks): the Triton
    kernel and the Mosaic GPU kernel (Hopper);
  * the whole op, pbs_attention(impl="pallas"), on inputs with planted local + heavy-hitter
    structure (experiments/lib/synthetic.py), its time split by stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pbs_jax
from experiments.lib import kernels, timing
from experiments.lib.metrics import rel_err
from experiments.lib.report import pyplot, save_figure
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import get_tiles, mgpu_supported
from pbs_jax import PBSConfig, blocks, permutation, selection

LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DENSITIES = (0.1, 0.2, 0.4)


def mgpu_fn(cfg):
    """The Mosaic GPU kernel alone, in the Triton kernel's signature, on keys already in slot
    order (identity plans here, so the caller's k/v serve as both the permuted and the original
    keys)."""
    mosaic = kernels.mosaic_kernel(cfg)
    return jax.jit(lambda q, k, v, perm, ids, full, total: mosaic(q, k, v, k, v, ids, full))


def op_kernel_fn(cfg):
    """The kernel step of the op as pbs_attention runs it (Mosaic GPU on Hopper, else Triton)."""
    return jax.jit(
        lambda q, k, v, perm, *lists: pbs_jax.kernel_attention(
            q, k, v, perm, blocks.BlockLists(*lists), cfg
        )
    )


def check_correctness(cfg, n=4096, h=8, hk=2, d=128):
    """Kernel (dense lists and real PBS lists) against the exact reference, fresh random input."""
    q, k, v = structured_qkv(jax.random.key(123), 1, n, h, hk, d, jnp.bfloat16)
    perm, mask = jax.jit(pbs_jax.pbs_plan, static_argnums=2)(q, k, cfg)
    lists = blocks.index_lists(mask, cfg)
    out = kernels.triton_kernel(cfg)(q, k, v, perm, *lists)
    ref = pbs_jax.permuted_block_sparse_attention(q, k, v, perm, mask, cfg.block_size)
    err_pbs = rel_err(out, ref)
    err_op = rel_err(op_kernel_fn(cfg)(q, k, v, perm, *lists), ref)
    full = blocks.fixed_density_mask(jax.random.key(0), (1, h, mask.shape[-1]), 1.0, cfg)
    ident = permutation.identity_permutation(1, h, n)
    out = kernels.triton_kernel(cfg)(q, k, v, ident, *blocks.index_lists(full, cfg))
    err_dense = rel_err(out, kernels.cudnn_attention(q, k, v))
    ok = max(err_pbs, err_op, err_dense) < 1e-2 and bool(jnp.isfinite(out).all())
    return {
        "n": n,
        "rel_err_vs_reference_pbs_lists": err_pbs,
        "op_kernel_rel_err_vs_reference_pbs_lists": err_op,
        "rel_err_vs_cudnn_dense_lists": err_dense,
        "ok": ok,
        "density_of_checked_plan": float(blocks.density(mask).mean()),
    }


def bench_length(n, args, cfg):
    b, h, hk, d = 1, args.heads, args.kv_heads, args.dim
    q, k, v = kernels.random_qkv(jax.random.key(n), b, n, h, hk, d)
    t = pbs_jax.num_blocks(n, cfg.block_size)
    row = {"n": n}
    row["cudnn_ms"] = timing.time_call(kernels.cudnn_attention, q, k, v)
    row["cudnn_tflops"] = kernels.causal_tflops(b, h, n, d, row["cudnn_ms"])
    ident = permutation.identity_permutation(b, h, n)
    contenders = {"kernel": kernels.triton_kernel(cfg)}
    if jax.default_backend() == "gpu" and mgpu_supported(q, cfg.block_size):
        contenders["mgpu"] = mgpu_fn(cfg)
    for target in (1.0,) + DENSITIES:
        mask = blocks.fixed_density_mask(jax.random.key(7), (b, h, t), target, cfg)
        lists = blocks.index_lists(mask, cfg)
        for name, run in contenders.items():
            ms = timing.time_call(run, q, k, v, ident, *lists)
            computed = int(mask.sum())
            key = f"{name}_d{int(round(target * 100))}"
            row[key] = {
                "ms": ms,
                "density": float(blocks.density(mask).mean()),
                "computed_tflops": kernels.computed_tflops(d, cfg.block_size, computed, ms),
                "speedup_vs_cudnn": row["cudnn_ms"] / ms,
            }
    auto = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="auto"))
    # impl="auto" on unstructured input: plans come out dense, so it should fall back to cuDNN.
    row["auto_random_ms"] = timing.time_call(auto, q, k, v)
    del q, k, v

    # The whole op on structured input, stage by stage, in the default (replicate) GQA mode;
    # then the total of the shared mode (one permutation per KV head, contiguous K/V).
    q, k, v = structured_qkv(jax.random.key(n + 1), b, n, h, hk, d, jnp.bfloat16)
    shared = jax.jit(
        functools.partial(
            pbs_jax.pbs_attention,
            cfg=dataclasses.replace(cfg, gqa="shared"),
            impl="pallas",
            return_aux=True,
        )
    )
    out_s, aux_s = shared(q, k, v)
    row["whole_op_shared"] = {
        "ms": timing.time_call(lambda q, k, v: shared(q, k, v)[0], q, k, v),
        "density": float(aux_s.density),
        "finite": bool(jnp.isfinite(out_s).all()),
    }
    row["whole_op_shared"]["speedup_vs_cudnn"] = row["cudnn_ms"] / row["whole_op_shared"]["ms"]
    perm_fn = jax.jit(functools.partial(permutation.compute_permutation, cfg=cfg))
    select_fn = jax.jit(lambda q, k, perm: selection.select_blocks(q, k, perm, cfg))
    lists_fn = jax.jit(functools.partial(blocks.index_lists, cfg=cfg))
    whole = jax.jit(
        functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="pallas", return_aux=True)
    )
    perm = perm_fn(q, k)
    mask = select_fn(q, k, perm)
    lists = lists_fn(mask)
    out, aux = whole(q, k, v)
    finite = bool(jnp.isfinite(out).all())
    stages = {
        "permutation_ms": timing.time_call(perm_fn, q, k),
        "selection_ms": timing.time_call(select_fn, q, k, perm),
        "index_lists_ms": timing.time_call(lists_fn, mask),
        "kernel_ms": timing.time_call(op_kernel_fn(cfg), q, k, v, perm, *lists),
    }
    total = timing.time_call(lambda q, k, v: whole(q, k, v)[0], q, k, v)
    row["auto_structured_ms"] = timing.time_call(auto, q, k, v)
    dens = float(aux.density)
    row["whole_op"] = {
        "ms": total,
        "density": dens,
        "finite": finite,
        **stages,
        "overhead_fraction": (
            stages["permutation_ms"] + stages["selection_ms"] + stages["index_lists_ms"]
        )
        / total,
        "speedup_vs_cudnn": row["cudnn_ms"] / total,
        "kernel_computed_tflops": kernels.computed_tflops(
            d, cfg.block_size, int(mask.sum()), stages["kernel_ms"]
        ),
    }
    return row


BREAK_EVEN_MARGIN = 0.9


def break_even_densities(rows, kern: str) -> dict:
    """N → the largest density at which plan + kernel ``kern`` ("mgpu" or "kernel", the Triton
    one) still beats cuDNN, with a safety margin: the source of ``AUTO_BREAK_EVEN`` and
    ``AUTO_BREAK_EVEN_TRITON`` in pbs_jax/attention.py. The kernel's time is interpolated
    linearly between the measured densities (its rate falls at low density, so no 1/d model);
    the plan is the whole op's permutation + selection + lists."""
    out = {}
    for r in rows:
        if f"{kern}_d100" not in r:
            continue
        pts = sorted(
            (r[f"{kern}_{k}"]["density"], r[f"{kern}_{k}"]["ms"])
            for k in ("d10", "d20", "d40", "d100")
        )
        w = r["whole_op"]
        budget = r["cudnn_ms"] - (w["permutation_ms"] + w["selection_ms"] + w["index_lists_ms"])
        dens = [d for d, _ in pts]
        times = [t for _, t in pts]
        if budget <= times[0]:
            out[r["n"]] = None
        elif budget >= times[-1]:
            out[r["n"]] = round(BREAK_EVEN_MARGIN * dens[-1], 2)
        else:
            out[r["n"]] = round(BREAK_EVEN_MARGIN * float(np.interp(budget, times, dens)), 2)
    return out


def report(payload, out: pathlib.Path, name: str = "bench_kernel"):
    """Markdown table and PNG plots from the JSON (on any machine)."""
    rows = payload["rows"]
    st = payload["stamp"]
    lines = [
        f"# PBS kernel vs cuDNN — {st['device']}, JAX {st['jax']}, {st['date']}",
        "",
        f"B=1, Hq={payload['shape']['heads']}, Hkv={payload['shape']['kv_heads']}, "
        f"D={payload['shape']['dim']}, bf16, block {payload['cfg']['block_size']}, segment "
        f"{payload['cfg']['segment_size']}. Times are medians in ms; ratios are cuDNN time / "
        "our time in the same run. Kernel TFLOP/s count the work of the listed blocks "
        f"(every listed block as a full tile). Tiles: {payload.get('tiles')}.",
        "",
        f"Correctness first: {json.dumps(payload['check'])}",
        "",
        "Triton: the portable kernel; Mosaic: the Hopper kernel (wgmma + TMA) that the op uses "
        "on this card. The whole op's kernel time is the Mosaic kernel's with its K/V "
        "permutation copy.",
        "",
        "| N | cuDNN ms (TFLOP/s) | Mosaic 100% ms (TFLOP/s, ×cuDNN) | Mosaic 40% | Mosaic 20% | "
        "Mosaic 10% | Triton 100% | Triton 20% | "
        "whole op ms (density, ×cuDNN) | perm / select / lists / kernel ms | overhead | "
        "whole op, shared GQA (density, ×cuDNN) | impl=auto ×cuDNN: structured / random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k100 = r["kernel_d100"]
        w = r["whole_op"]
        cell = lambda x: f"{x['ms']:.2f} ({x['computed_tflops']:.0f}, {x['speedup_vs_cudnn']:.2f}×)"
        mg = lambda key: cell(r[key]) if key in r else "—"
        lines.append(
            f"| {r['n']} | {r['cudnn_ms']:.2f} ({r['cudnn_tflops']:.0f}) | {mg('mgpu_d100')} | "
            f"{mg('mgpu_d40')} | {mg('mgpu_d20')} | {mg('mgpu_d10')} | {cell(k100)} | "
            f"{cell(r['kernel_d20'])} | "
            f"{w['ms']:.2f} ({w['density']:.2f}, {w['speedup_vs_cudnn']:.2f}×) | "
            f"{w['permutation_ms']:.2f} / {w['selection_ms']:.2f} / {w['index_lists_ms']:.2f} / "
            f"{w['kernel_ms']:.2f} | {100 * w['overhead_fraction']:.1f}% | "
            f"{r['whole_op_shared']['ms']:.2f} ({r['whole_op_shared']['density']:.2f}, "
            f"{r['whole_op_shared']['speedup_vs_cudnn']:.2f}×) | "
            f"{r['cudnn_ms'] / r['auto_structured_ms']:.2f}× / "
            f"{r['cudnn_ms'] / r['auto_random_ms']:.2f}× |"
        )
    lines += [
        "",
        'Break-even density of impl="auto" per N (`break_even_densities`: where plan + '
        "kernel time equals cuDNN's, interpolated on the measured density curve, times "
        f"{BREAK_EVEN_MARGIN}):",
        "",
    ]
    for kern, label in (("mgpu", "Mosaic"), ("kernel", "Triton")):
        table = break_even_densities(rows, kern)
        if table:
            lines.append(
                f"- {label}: "
                + ", ".join(
                    f"{n}: {d:.2f}" if d is not None else f"{n}: never" for n, d in table.items()
                )
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ns = [r["n"] for r in rows]
    series = [(f"mgpu_d{d}", f"Mosaic, {d}%") for d in (100, 40, 20, 10)]
    for key, label in series + [("kernel_d100", "Triton, 100%"), ("kernel_d20", "Triton, 20%")]:
        if all(key in r for r in rows):
            style = "o-" if key.startswith("mgpu") else "x:"
            ax1.plot(ns, [r[key]["speedup_vs_cudnn"] for r in rows], style, label=label)
    for key, style, size, label in (
        ("whole_op", "k*-", 10, "whole op, replicate GQA (structured input)"),
        ("whole_op_shared", "m*--", 8, "whole op, shared GQA"),
    ):
        ax1.plot(ns, [r[key]["speedup_vs_cudnn"] for r in rows], style, ms=size, label=label)
    ax1.axhline(1.0, color="gray", ls="--", lw=1)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("sequence length N")
    ax1.set_ylabel("speedup vs cuDNN (×)")
    ax1.set_title("Speedup vs N")
    ax1.legend(fontsize=8)
    for r in rows:
        kern = "mgpu" if "mgpu_d100" in r else "kernel"
        pts = [
            (r[f"{kern}_{k}"]["density"], r[f"{kern}_{k}"]["speedup_vs_cudnn"])
            for k in ("d10", "d20", "d40", "d100")
        ]
        ax2.plot(*zip(*pts), "o-", label=f"N={r['n'] // 1024}K")
    dd = np.linspace(0.05, 1.1, 50)
    ax2.plot(dd, 1 / dd, color="gray", ls=":", lw=1, label="ideal 1/density (at cuDNN rate)")
    ax2.axhline(1.0, color="gray", ls="--", lw=1)
    ax2.set_xlabel("block density")
    ax2.set_ylabel("kernel speedup vs cuDNN (×)")
    ax2.set_yscale("log")
    ax2.set_title("Speedup vs density")
    ax2.legend(fontsize=8)
    fig.suptitle(f"PBS kernel vs cuDNN — {st['device']}, JAX {st['jax']}, {st['date']}")
    fig.tight_layout()
    save_figure(fig, out / f"{name}.png")


def bench(args, out: pathlib.Path) -> dict:
    cfg = PBSConfig.paper()
    payload = {
        "stamp": timing.stamp(),
        "tiles": {
            f"gather_kv={g}": dataclasses.asdict(
                get_tiles(args.dim, jnp.bfloat16, cfg.block_size, g)
            )
            for g in (True, False)
        },
        "cfg": {k: getattr(cfg, k) for k in ("block_size", "segment_size", "threshold")},
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim},
        "check": check_correctness(cfg),
        "rows": [],
    }
    print("correctness:", payload["check"], flush=True)
    if not payload["check"]["ok"]:
        timing.write_json(out / "bench_kernel.json", payload)
        sys.exit("kernel disagrees with the reference: not timing it")
    for n in args.lengths:
        payload["rows"].append(bench_length(n, args, cfg))
        timing.write_json(out / "bench_kernel.json", payload)  # keep what finished
        r = payload["rows"][-1]
        print(
            f"N={n}: cudnn {r['cudnn_ms']:.2f} ms, triton100 {r['kernel_d100']['ms']:.2f}, "
            f"mosaic100 {r.get('mgpu_d100', {}).get('ms', float('nan')):.2f}, "
            f"mosaic20 {r.get('mgpu_d20', {}).get('ms', float('nan')):.2f}, "
            f"whole {r['whole_op']['ms']:.2f} "
            f"(density {r['whole_op']['density']:.2f})",
            flush=True,
        )
    return payload


def add_arguments(parser):
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(LENGTHS),
        help="sequence lengths to time (default: 4K..128K)",
    )
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--dim", type=int, default=128, help="head dim (default 128)")


def main(argv=None):
    timing.benchmark_cli(argv, __doc__, "bench_kernel", add_arguments, bench, report)


if __name__ == "__main__":
    main()
