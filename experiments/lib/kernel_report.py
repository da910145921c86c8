"""The cost table and the report of ``experiments/bench_kernel.py``: the card's measured costs for
``pbs_jax.cost_model`` (from the bench's rows), and the markdown table and plots of a run."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics

import numpy as np

from experiments.lib.report import pyplot, save_figure
from pbs_jax import cost_model

# Estimates leaving out fewer blocks than this fraction say nothing about the gain (noise).
MIN_LEFT_OUT = 0.02

# ---- the cost table ---------------------------------------------------------------------------


def kernel_points(row, kern: str) -> list[tuple[float, float]]:
    """(density, ms) of kernel ``kern`` ("mgpu" or "kernel", the Triton one) at 100/40/20/10%."""
    return [(row[f"{kern}_d{x}"]["density"], row[f"{kern}_d{x}"]["ms"]) for x in (100, 40, 20, 10)]


def length_costs(row) -> cost_model.LengthCosts:
    """One length of the cost table from a row: cuDNN, the kernel fits (the Mosaic one with the
    K/V copy made before it), the estimate and the rest of the plan (their GPU time where the run
    profiled it, else their wall time), the densest op's ratios to cuDNN."""
    st = row["stages"]
    mosaic = None
    if "mgpu_d100" in row:
        # The copy adds its GPU time to the op (the op's dispatch is in the kernel's own points);
        # jitted alone its wall time is mostly dispatch (0.135 ms at 4K for 0.026 of GPU work,
        # results/bench_kernel_one_choice.json).
        kv_copy_ms = st.get("kv_copy_gpu_ms") or st["kv_copy_ms"]
        mosaic = cost_model.fit_kernel(kernel_points(row, "mgpu"), round(kv_copy_ms, 4))
    return cost_model.LengthCosts(
        seq_len=row["n"],
        cudnn_ms=round(row["cudnn_ms"], 4),
        triton=cost_model.fit_kernel(kernel_points(row, "kernel")),
        mosaic=mosaic,
        estimate_ms=round(st.get("estimate_gpu_ms") or st["estimate_ms"], 4),
        plan_ms=round(st.get("plan_gpu_ms") or st["plan_ms"], 4),
        densest_op_ratios=(
            tuple(round(row["densest"]["ratios"][name], 4) for name in cost_model.DENSEST_RULES)
            if "densest" in row
            else None
        ),
    )


def sparsity_gain(rows) -> float:
    """The estimate's calibration (``cost_model.predicted_density``): over every family and
    length, the median ratio of the blocks the PBS plan leaves out to those the estimate leaves
    out, where the estimate leaves out at least MIN_LEFT_OUT; 1.0 where none does."""
    ratios = [
        (1 - f["density"]) / (1 - f["estimate_density"])
        for r in rows
        for f in r.get("families", {}).values()
        if 1 - f["estimate_density"] >= MIN_LEFT_OUT
    ]
    return round(statistics.median(ratios), 3) if ratios else 1.0


def cost_table(payload) -> cost_model.CardCosts | None:
    """The card's cost table from a payload's rows (None: fewer than two lengths with stages)."""
    rows = [r for r in payload["rows"] if "stages" in r]
    if len(rows) < 2:
        return None
    st, shape = payload["stamp"], payload["shape"]
    return cost_model.CardCosts(
        device_kind=st["device"],
        source=f"experiments/bench_kernel.py ({st['device']}, JAX {st['jax']}, {st['date']})",
        sparsity_gain=sparsity_gain(rows),
        lengths=tuple(length_costs(r) for r in rows),
        shape=cost_model.CallShape(batch=1, q_heads=shape["heads"], head_dim=shape["dim"]),
    )


def cost_table_literal(table: cost_model.CardCosts, name: str = "CARD") -> str:
    """Python source of ``table`` for pbs_jax/cost_model.py (run ``ruff format`` after pasting)."""
    lines = [
        f"{name} = CardCosts(",
        f"    device_kind={table.device_kind!r},",
        f"    source={table.source!r},",
        f"    sparsity_gain={table.sparsity_gain!r},",
        "    lengths=(",
        *(f"        {_length_literal(c)}," for c in table.lengths),
        "    ),",
        f"    shape={table.shape!r},",
        ")",
    ]
    return "\n".join(lines)


def _length_literal(costs: cost_model.LengthCosts) -> str:
    """``repr`` of one length's costs, without the optional fields a run did not measure."""
    values = (
        (f.name, getattr(costs, f.name))
        for f in dataclasses.fields(costs)
        if not (f.default is None and getattr(costs, f.name) is None)
    )
    return f"LengthCosts({', '.join(f'{name}={v!r}' for name, v in values)})"


def stage_lines(rows) -> list[str]:
    """The plan stage table (rows of runs that timed the stages)."""
    rows = [r for r in rows if "stages" in r]
    if not rows:
        return []
    lines = [
        "",
        "Plan stages on structured input, each jitted alone on its real inputs (ms), their sum "
        'and the plan as one jit (what the op pays); the estimate is impl="auto"\'s cheap '
        "stage, the K/V copy what the Mosaic kernel's input preparation adds; the last column is "
        "the op's default rule (PBSConfig(): 4 proxy blocks, dense last block row); fused: the "
        "proxy_permutation kernel (proxy + sort + pooling in one pass) and the selection from "
        "its pooled keys, where the run timed them:",
        "",
        "| N | proxy | permutation sort | pooling | scores + top-p + forced | lists | sum | "
        "plan (one jit) | "
        "plan / cuDNN | estimate | K/V copy | default rule: proxy / plan | fused: permutation "
        "/ selection |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stages"]
        parts = ("proxy_ms", "permutation_ms", "block_scores_ms", "top_p_ms", "lists_ms")
        lines.append(
            f"| {r['n']} | "
            + " | ".join(f"{st[p]:.3f}" for p in parts)
            + f" | {sum(st[p] for p in parts):.3f} | {st['plan_ms']:.3f} | "
            f"{100 * st['plan_ms'] / r['cudnn_ms']:.1f}% | {st['estimate_ms']:.3f} | "
            f"{st['kv_copy_ms']:.3f} | "
            + (
                f"{st['default_proxy_ms']:.3f} / {st['default_plan_ms']:.3f} |"
                if "default_plan_ms" in st
                else "— |"
            )
            # The fused permutation kernel was deleted (slower than the stages it replaced): only
            # committed runs that timed it fill this column; it stays so they re-render as run.
            + (
                f" {st['fused_permutation_ms']:.3f} / {st['select_pooled_ms']:.3f} |"
                if "fused_permutation_ms" in st
                else " — |"
            )
        )
    return lines


def family_lines(rows) -> list[str]:
    """impl="auto" on the input families, against the better of its two choices."""
    cells = [(r["n"], name, f) for r in rows for name, f in r.get("families", {}).items()]
    if not cells:
        return []
    lines = [
        "",
        'impl="auto" per input family against its two choices (target ≥ 0.97): '
        'min(cuDNN, sparse op) / auto, the sparse op being impl="pallas" (plan + kernel); and, '
        "stricter, min(cuDNN, the kernel alone at the plan's density) / auto, which no auto that "
        "plans can reach where the plan is a large share of the sparse op. density: the PBS "
        "plan's; estimate: the MeanPooling density on unpermuted keys that auto computes first. "
        "The paper family is the structured one at the paper's Llama-3.1-8B plan density "
        "(Table 5: 0.579 at 8K, 0.219 at 128K), at those lengths only. The captured family "
        "(SmolLM2 q/k/v, its layers as the batch, D=64, 9/3 heads) exists at its capture length "
        "only, with its own cuDNN time. op ×cuDNN: cuDNN / sparse op, the whole op's speed-up.",
        "",
        "| N | family | density | estimate | cuDNN ms | sparse op ms (op ×cuDNN) | kernel ms "
        "| auto ms (took) | min(cuDNN, op) / auto | min(cuDNN, kernel) / auto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, name, f in cells:
        took = "kernel" if f["auto_sparse"] else "cuDNN"
        op_ms, vs_op = f.get("sparse_op_ms"), f.get("auto_vs_choices")
        op = "—" if op_ms is None else f"{op_ms:.3f} ({f['cudnn_ms'] / op_ms:.2f}×)"
        lines.append(
            f"| {n} | {name} | {f['density']:.3f} | {f['estimate_density']:.3f} | "
            f"{f['cudnn_ms']:.3f} | "
            f"{op} | "
            f"{f['kernel_ms']:.3f} | {f['auto_ms']:.3f} ({took}) | "
            f"{'—' if vs_op is None else f'{vs_op:.2f}'} | {f['auto_vs_best']:.2f} |"
        )
    return lines


def densest_lines(rows) -> list[str]:
    """The sparse op at its densest against cuDNN, side by side (the cost table's
    densest_op_ratios: where a rule's is within noise, impl="auto" plans without estimating)."""
    rows = [r for r in rows if "densest" in r]
    if not rows:
        return []
    names = list(rows[0]["densest"]["ratios"])
    lines = [
        "",
        "The sparse op at its densest: random inputs (flat block scores: top-p keeps about as "
        'many blocks as it ever can), impl="pallas" with each rule, cuDNN beside them, the '
        f"median of {rows[0]['densest']['rounds']} interleaved rounds; ms (plan density, ratio "
        'to cuDNN): impl="auto" skips its estimate for a rule where the ratio is at most '
        f"{1 + cost_model.SURE_TOLERANCE}.",
        "",
        "| N | cuDNN ms | " + " | ".join(f"{name} rule" for name in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        d = r["densest"]
        cells = (
            f"{d['ms'][name]:.3f} ({d['densities'][name]:.3f}, {d['ratios'][name]:.3f})"
            for name in names
        )
        lines.append(f"| {r['n']} | {d['ms']['cudnn']:.3f} | " + " | ".join(cells) + " |")
    return lines


def report(payload, out: pathlib.Path, name: str = "bench_kernel"):
    """Markdown table and PNG plots from the JSON (on any machine)."""
    rows = payload["rows"]
    st = payload["stamp"]
    lines = [
        f"# PBS kernel vs cuDNN — {st['device']}, JAX {st['jax']}, {st['date']}",
        "",
        *([payload["note"], ""] if payload.get("note") else []),
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
        shared = r.get("whole_op_shared")
        shared_cell = (
            f"{shared['ms']:.2f} ({shared['density']:.2f}, {shared['speedup_vs_cudnn']:.2f}×)"
            if shared
            else "—"
        )
        auto = lambda key: f"{r['cudnn_ms'] / r[key]:.2f}×" if key in r else "—"
        lines.append(
            f"| {r['n']} | {r['cudnn_ms']:.2f} ({r['cudnn_tflops']:.0f}) | {mg('mgpu_d100')} | "
            f"{mg('mgpu_d40')} | {mg('mgpu_d20')} | {mg('mgpu_d10')} | {cell(k100)} | "
            f"{cell(r['kernel_d20'])} | "
            f"{w['ms']:.2f} ({w['density']:.2f}, {w['speedup_vs_cudnn']:.2f}×) | "
            f"{w['permutation_ms']:.2f} / {w['selection_ms']:.2f} / {w['index_lists_ms']:.2f} / "
            f"{w['kernel_ms']:.2f} | {100 * w['overhead_fraction']:.1f}% | {shared_cell} | "
            f"{auto('auto_structured_ms')} / {auto('auto_random_ms')} |"
        )
    lines += stage_lines(rows) + densest_lines(rows) + family_lines(rows)
    table = cost_table(payload)
    if table is not None:
        lines += [
            "",
            'The cost table of impl="auto" measured here (pbs_jax/cost_model.py; kernel fits: '
            "least squares over the 100/40/20/10% points, the Mosaic fit with the K/V copy; "
            "sparsity gain: the median ratio, over the families and lengths above, of the blocks "
            "the PBS plan leaves out to those the estimate leaves out):",
            "",
            "```python",
            cost_table_literal(table),
            "```",
        ]
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
        if not all(key in r for r in rows):
            continue
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
