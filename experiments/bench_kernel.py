"""Kernel and whole-op benchmark of PBS attention against cuDNN, side by side on one card, and
the measurement of ``impl="auto"``'s cost table (pbs_jax/cost_model.py).

Run on a GPU (one call does everything: correctness first, then timing, then the report):
  python -m experiments.capture_qkv --out qkv.npz   # once, on any machine (CPU: a few minutes)
  python -m experiments.bench_kernel --captured qkv.npz
                                     # writes $OUT/bench_kernel.json (+ .md, .png) and prints the
                                     # cost table's Python literal for pbs_jax/cost_model.py
  python -m experiments.bench_kernel --report experiments/results/bench_kernel.json
                                                # re-renders the markdown table and the plots
  python -m experiments.bench_kernel --smoke    # the script's logic on CPU (tiny, untimed)

Shapes (issue 3): B=1, Hq=32, Hkv=8, D=128, bf16, N in 4K..128K. Rows per N:
  * cuDNN: jax.nn.dot_product_attention(implementation="cudnn", is_causal=True);
  * our kernels at 100% density (every causal block listed) and at fixed densities 10/20/40%
    (random earlier-segment blocks plus the always-computed own-segment blocks): the Triton
    kernel and the Mosaic GPU kernel (Hopper);
  * the plan stage by stage, each jitted alone on its real inputs (structured input): proxy,
    permutation sort, block scores, top-p selection, index lists, the whole plan as one jit,
    ``impl="auto"``'s estimate stage and the K/V slot-order copy before the Mosaic kernel;
  * the whole op, pbs_attention(impl="pallas"), on structured input;
  * ``impl="auto"`` on five input families against min(cuDNN, kernel at the plan's density):
    random (``random_qkv``), structured (``structured_qkv``), weakly structured (the same with
    ``structure=WEAK_STRUCTURE``: plans of density ~0.9), paper (the same at the paper's
    Llama-3.1-8B density, ``PAPER_STRUCTURE``, at 8K and 128K) and q/k/v captured from SmolLM2
    (``--captured``: its own shape, 2+ layers as the batch, D=64, 9/3 heads, timed at its own
    length only, 8K).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.lib import capture, kernels, timing
from experiments.lib.kernel_report import cost_table, cost_table_literal, report
from experiments.lib.kernel_trace import gpu_us
from experiments.lib.metrics import rel_err
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import get_tiles, mgpu_supported
from pbs_jax import PBSConfig, blocks, cost_model, permutation, selection

LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DENSITIES = (0.1, 0.2, 0.4)
# Interleaved rounds of the contenders compared side by side (impl="auto" and its choices, the
# densest op and cuDNN): at 8K one median moved ~10% between runs of the same code.
ROUNDS = 3
FAMILIES = ("random", "structured", "weak", "paper", "captured")
# structured_qkv's planted logits scaled by this: PBS plans of density ~0.88 at 8K and 32K
# (PBSConfig.paper(), measured on CPU with 8/2 heads), as inputs with weak structure give.
WEAK_STRUCTURE = 0.1
# The "paper" family: structured_qkv with its planted logits scaled per length so that the
# paper-rule plan's density is the paper's own for Llama-3.1-8B at that length (Table 5, with
# permutation, averaged over layers and heads: 0.579 at 8K, 0.219 at 128K; paper-spec §3.4).
# Calibrated on CPU with 8/2 heads by experiments/calibrate_structure.py (plan density 0.579 at
# 8K, 0.217 at 128K; results/calibrate_structure.md): the whole op measured at the density the
# paper's model has, not at the synthetic family's own.
PAPER_STRUCTURE = {8192: 0.38, 131072: 1.04}
# From this length on each call is timed fewer times (a call takes 50-250 ms there).
LONG = 65536


def timer(n: int, smoke: bool = False):
    """``time(fn, *args) -> ms`` for length ``n``: fewer repeats at long lengths; one untimed-
    quality run per call in smoke mode (the script's logic on CPU)."""
    if smoke:
        return functools.partial(timing.time_call, min_reps=1, max_reps=1, budget_s=0.0)
    if n >= LONG:
        return functools.partial(timing.time_call, min_reps=3, budget_s=1.0)
    return timing.time_call


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


@functools.cache
def op_fns(cfg: PBSConfig) -> dict:
    """Every jitted function the bench times, built once per configuration (so each compiles
    once per shape)."""

    def stage(fn):
        return jax.jit(functools.partial(fn, cfg=cfg))

    return {
        "proxy": stage(permutation.key_importance),
        "permutation": jax.jit(
            lambda scores, n: permutation.segment_permutation(scores, n, cfg), static_argnums=1
        ),
        # Pooling alone, then the whole selection as the op runs it (pooling + block scores +
        # top-p + forced blocks; on GPU the fused pooled top-p kernel).
        "block_scores": stage(selection.pooled_blocks),
        "top_p": stage(selection.select_blocks),
        # The selection as the plan runs it: with its index lists (on GPU the selection kernel
        # writes them); and the lists built from a mask (the kernel-alone timings' input).
        "select_lists": stage(selection.select_blocks_and_lists),
        "lists": stage(blocks.index_lists),
        "plan": jax.jit(lambda q, k: pbs_jax.pbs_plan(q, k, cfg)[::2]),  # (perm, lists)
        "estimate": stage(cost_model.estimate_density),
        "kv_copy": jax.jit(
            lambda k, v, perm: (permutation.gather_keys(k, perm), permutation.gather_keys(v, perm))
        ),
        "op_kernel": op_kernel_fn(cfg),
        "pallas": jax.jit(
            functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="pallas", return_aux=True)
        ),
        "auto": jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="auto")),
        "auto_aux": jax.jit(
            functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="auto", return_aux=True)
        ),
    }


def check_correctness(cfg, n=4096, h=8, hk=2, d=128):
    """Kernel (dense lists and real PBS lists) against the exact reference, fresh random input."""
    q, k, v = structured_qkv(jax.random.key(123), 1, n, h, hk, d, jnp.bfloat16)
    perm, mask, lists = jax.jit(pbs_jax.pbs_plan, static_argnums=2)(q, k, cfg)
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


def gpu_ms(fn, *args) -> float:
    """GPU time (ms) of one call's kernels, from a profile of warm calls (0 off the GPU)."""
    return gpu_us(fn, *args) / 1e3


def plan_stages(q, k, v, cfg, time) -> dict:
    """Each plan stage jitted alone on its real inputs (ms), the whole plan as one jit, the
    estimate stage of ``impl="auto"`` and the K/V slot-order copy the Mosaic kernel needs."""
    fns = op_fns(cfg)
    n = q.shape[1]
    scores = fns["proxy"](q, k)
    perm = fns["permutation"](scores, n)
    return {
        "proxy_ms": time(fns["proxy"], q, k),
        "permutation_ms": time(fns["permutation"], scores, n),
        "block_scores_ms": time(fns["block_scores"], q, k, perm),
        "top_p_ms": time(fns["top_p"], q, k, perm) - time(fns["block_scores"], q, k, perm),
        # What the lists add to the selection the plan runs (not index_lists on a mask: the
        # GPU plan does not call it).
        "lists_ms": time(fns["select_lists"], q, k, perm) - time(fns["top_p"], q, k, perm),
        "plan_ms": time(fns["plan"], q, k),
        "estimate_ms": time(fns["estimate"], q, k),
        # What each adds to the op while the host dispatches ahead: its kernels' GPU time
        # (0 off the GPU: no profile).
        "plan_gpu_ms": gpu_ms(fns["plan"], q, k),
        "estimate_gpu_ms": gpu_ms(fns["estimate"], q, k),
        "kv_copy_ms": time(fns["kv_copy"], k, v, perm),
        "kv_copy_gpu_ms": gpu_ms(fns["kv_copy"], k, v, perm),
        # The op's default rule (4 proxy blocks, a dense last block row) beside the paper's.
        "default_proxy_ms": time(op_fns(PBSConfig())["proxy"], q, k),
        "default_plan_ms": time(op_fns(PBSConfig())["plan"], q, k),
    }


def family_inputs(name: str, n: int, args, captured):
    """(q, k, v) of an input family at length n, or None where the family has no input there
    (the captured q/k/v exist at their own length only)."""
    b, h, hk, d = 1, args.heads, args.kv_heads, args.dim
    if name == "random":
        return kernels.random_qkv(jax.random.key(n), b, n, h, hk, d)
    if name == "structured":
        return structured_qkv(jax.random.key(n + 1), b, n, h, hk, d, jnp.bfloat16)
    if name == "weak":
        return structured_qkv(
            jax.random.key(n + 2), b, n, h, hk, d, jnp.bfloat16, structure=WEAK_STRUCTURE
        )
    if name == "paper":
        if n not in PAPER_STRUCTURE:
            return None
        return structured_qkv(
            jax.random.key(n + 1), b, n, h, hk, d, jnp.bfloat16, structure=PAPER_STRUCTURE[n]
        )
    if name == "captured":
        return captured if captured is not None and captured[0].shape[1] == n else None
    raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")


def family_row(q, k, v, cfg, time) -> dict:
    """``impl="auto"`` on one input against its two choices: dense (cuDNN) and sparse (the op
    with ``impl="pallas"``: plan + kernel), the three timed in interleaved rounds; and, stricter,
    against cuDNN and the kernel alone at the plan's density (no plan counted: no auto that plans
    can reach it where the plan is a large share of the sparse path)."""
    fns = op_fns(cfg)
    _, aux = fns["pallas"](q, k, v)
    lists = fns["lists"](aux.block_mask)
    kernel_ms = time(fns["op_kernel"], q, k, v, aux.perm, *lists)
    contenders = {
        "cudnn": kernels.cudnn_attention,
        "sparse": lambda q, k, v: fns["pallas"](q, k, v)[0],
        "auto": fns["auto"],
    }
    ms = timing.time_interleaved(contenders, q, k, v, rounds=ROUNDS, time=time)
    cudnn_ms, sparse_ms, auto_ms = ms["cudnn"], ms["sparse"], ms["auto"]
    best = min(cudnn_ms, kernel_ms)
    return {
        "shape": list(q.shape) + [k.shape[2]],
        "density": float(aux.density),
        "estimate_density": float(fns["estimate"](q, k)),
        "cudnn_ms": cudnn_ms,
        "kernel_ms": kernel_ms,
        "auto_ms": auto_ms,
        "auto_sparse": bool(fns["auto_aux"](q, k, v)[1].sparse),
        "sparse_op_ms": sparse_ms,
        "auto_vs_choices": min(cudnn_ms, sparse_ms) / auto_ms,
        "best_ms": best,
        "auto_vs_best": best / auto_ms,
    }


def bench_length(n, args, cfg):
    b, h, hk, d = 1, args.heads, args.kv_heads, args.dim
    time = timer(n, args.smoke)
    fns = op_fns(cfg)
    q, k, v = kernels.random_qkv(jax.random.key(n), b, n, h, hk, d)
    t = pbs_jax.num_blocks(n, cfg.block_size)
    row = {"n": n}
    row["cudnn_ms"] = time(kernels.cudnn_attention, q, k, v)
    row["cudnn_tflops"] = kernels.causal_tflops(b, h, n, d, row["cudnn_ms"])
    ident = permutation.identity_permutation(b, h, n)
    contenders = {"kernel": kernels.triton_kernel(cfg)}
    if jax.default_backend() == "gpu" and mgpu_supported(q, cfg.block_size):
        contenders["mgpu"] = mgpu_fn(cfg)
    for target in (1.0,) + DENSITIES:
        mask = blocks.fixed_density_mask(jax.random.key(7), (b, h, t), target, cfg)
        lists = blocks.index_lists(mask, cfg)
        for name, run in contenders.items():
            ms = time(run, q, k, v, ident, *lists)
            computed = int(mask.sum())
            key = f"{name}_d{int(round(target * 100))}"
            row[key] = {
                "ms": ms,
                "density": float(blocks.density(mask).mean()),
                "computed_tflops": kernels.computed_tflops(d, cfg.block_size, computed, ms),
                "speedup_vs_cudnn": row["cudnn_ms"] / ms,
            }
    row["densest"] = densest_row(q, k, v, time)
    del q, k, v

    # The plan stage by stage and the whole op, on structured input.
    q, k, v = family_inputs("structured", n, args, None)
    row["stages"] = plan_stages(q, k, v, cfg, time)
    out, aux = fns["pallas"](q, k, v)
    total = time(lambda q, k, v: fns["pallas"](q, k, v)[0], q, k, v)
    del q, k, v

    row["whole_op"] = {
        "ms": total,
        "density": float(aux.density),
        "finite": bool(jnp.isfinite(out).all()),
        "block_mask_sum": int(aux.block_mask.sum()),
    }
    return row


def densest_row(q, k, v, time) -> dict:
    """The sparse op at its densest: random inputs (flat block scores, so top-p keeps about as
    many blocks as it ever can) with each rule of ``cost_model.DENSEST_RULES`` (the paper's, the
    default), against cuDNN, interleaved; ``ratios``, each op over cuDNN, are the cost table's
    densest_op_ratios."""
    rules = cost_model.DENSEST_RULES
    ops = {name: op_fns(rule)["pallas"] for name, rule in rules.items()}  # (out, aux)
    fns = {"cudnn": kernels.cudnn_attention}
    fns.update((name, lambda q, k, v, op=op: op(q, k, v)[0]) for name, op in ops.items())
    ms = timing.time_interleaved(fns, q, k, v, rounds=ROUNDS, time=time)
    densities = {name: float(op(q, k, v)[1].density) for name, op in ops.items()}
    ratios = {name: ms[name] / ms["cudnn"] for name in rules}
    return {"ms": ms, "densities": densities, "ratios": ratios, "rounds": ROUNDS}


def add_families(row, args, cfg, captured=None):
    """``impl="auto"`` on every input family at the row's length (with the card's cost table
    as it stands: the bench installs the one it has just measured first), and the whole-op
    columns that need the structured family's kernel time."""
    n, d = row["n"], args.dim
    time = timer(n, args.smoke)
    row["families"] = {}
    for name in args.families:
        inputs = family_inputs(name, n, args, captured)
        if inputs is None:
            continue
        row["families"][name] = family_row(*inputs, cfg, time)
        del inputs

    # The columns of earlier runs, from the stages above.
    stages, whole = row["stages"], row["whole_op"]
    structured = row["families"].get("structured")
    plan = stages["proxy_ms"] + stages["permutation_ms"]
    select = stages["block_scores_ms"] + stages["top_p_ms"]
    kernel_ms = structured["kernel_ms"] if structured else float("nan")
    total = whole["ms"]
    whole.update(
        permutation_ms=plan,
        selection_ms=select,
        index_lists_ms=stages["lists_ms"],
        kernel_ms=kernel_ms,
        overhead_fraction=stages["plan_ms"] / total,  # the plan as one jit: what the op pays
        speedup_vs_cudnn=row["cudnn_ms"] / total,
        kernel_computed_tflops=kernels.computed_tflops(
            d, cfg.block_size, whole["block_mask_sum"], kernel_ms
        ),
    )
    for name in ("random", "structured"):
        if name in row["families"]:
            row[f"auto_{name}_ms"] = row["families"][name]["auto_ms"]
    return row


def bench(args, out: pathlib.Path) -> dict:
    cfg = PBSConfig.paper()
    captured, captured_meta = None, None
    if "captured" in args.families and args.captured is not None:
        captured, captured_meta = capture.load(args.captured)
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
        "families": list(args.families),
        "weak_structure": WEAK_STRUCTURE,
        "captured": captured_meta
        and {**captured_meta, "path": str(args.captured), "shape": list(captured[0].shape)},
        "check": check_correctness(cfg, **SMOKE_CHECK) if args.smoke else check_correctness(cfg),
        "rows": [],
    }
    print("correctness:", payload["check"], flush=True)
    if not payload["check"]["ok"]:
        timing.write_json(out / "bench_kernel.json", payload)
        sys.exit("kernel disagrees with the reference: not timing it")
    if "captured" in args.families and captured is None:
        print("no --captured file: the captured family is left out", flush=True)
    # Pass 1: kernels and plan stages at every length, from which the card's cost table comes;
    # it is installed before pass 2 times impl="auto" on the families, so auto decides with the
    # very table this run measures (its sparsity gain is 1 until pass 2 has measured it).
    for n in args.lengths:
        payload["rows"].append(bench_length(n, args, cfg))
        timing.write_json(out / "bench_kernel.json", payload)  # keep what finished
        r = payload["rows"][-1]
        print(
            f"N={n}: cudnn {r['cudnn_ms']:.2f} ms, triton100 {r['kernel_d100']['ms']:.2f}, "
            f"mosaic100 {r.get('mgpu_d100', {}).get('ms', float('nan')):.2f}, "
            f"mosaic20 {r.get('mgpu_d20', {}).get('ms', float('nan')):.2f}, "
            f"plan {r['stages']['plan_ms']:.3f}, estimate {r['stages']['estimate_ms']:.3f}, "
            f"whole {r['whole_op']['ms']:.2f} (density {r['whole_op']['density']:.2f})",
            flush=True,
        )
    measured = cost_table(payload)
    if measured is not None:
        cost_model.COST_TABLES[measured.device_kind] = dataclasses.replace(
            measured, sparsity_gain=1.0
        )
    for r in payload["rows"]:
        add_families(r, args, cfg, captured)
        timing.write_json(out / "bench_kernel.json", payload)
        autos = ", ".join(
            f"{name} {f['auto_vs_choices']:.2f} ({f['auto_vs_best']:.2f})"
            for name, f in r["families"].items()
        )
        print(f"N={r['n']}: auto min(choices)/auto (vs the kernel alone): {autos}", flush=True)
    table = cost_table(payload)
    if table is not None:
        payload["cost_table"] = dataclasses.asdict(table)
        print("\n# The cost table for pbs_jax/cost_model.py:\n" + cost_table_literal(table))
    return payload


# --smoke: the script's logic on CPU at a tiny shape (the kernels in interpret mode), untimed.
SMOKE_SHAPE = dict(heads=2, kv_heads=1, dim=64, lengths=[512, 1024])
SMOKE_CHECK = dict(n=512, h=2, hk=1, d=64)


def add_arguments(parser):
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(LENGTHS),
        help="sequence lengths to time (default: 4K..128K)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        help="input families on which impl=auto is timed (default: all)",
    )
    parser.add_argument(
        "--captured",
        type=pathlib.Path,
        default=None,
        help="q/k/v captured by experiments/capture_qkv.py (the captured family, at its length)",
    )
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--dim", type=int, default=128, help="head dim (default 128)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run the script's logic on CPU at a tiny shape (numbers meaningless)",
    )


def parse_smoke(args):
    """Under --smoke, the tiny shape replaces the defaults; runs off the GPU."""
    if args.smoke:
        for key, value in SMOKE_SHAPE.items():
            setattr(args, key, value)
    return args.smoke


def main(argv=None):
    timing.benchmark_cli(
        argv, __doc__, "bench_kernel", add_arguments, bench, report, runs_off_gpu=parse_smoke
    )


if __name__ == "__main__":
    main()
