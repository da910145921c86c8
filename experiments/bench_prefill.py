"""End-to-end prefill of a Llama-3.1-8B-shaped model: full (cuDNN) vs PBS attention, one GPU.

  python -m experiments.bench_prefill            # on a GPU: $OUT/bench_prefill.{json,md,png}
  python -m experiments.bench_prefill --report experiments/results/bench_prefill.json

Random bf16 weights are initialised on the device (no download), batch 1. Random weights do
not give realistic attention (their plans come out dense), so PBS runs two ways:
  (a) the real selector, ``impl="auto"`` (which falls back to cuDNN when a plan is too dense);
  (b) the real permutation and selection are computed (their cost counts), then the kernel runs
      a fixed block density per length: Llama-3.1-8B's own densities with permutation at
      threshold 0.9, from the paper's Table 5 (our accuracy study measures SmolLM2 only).
``--devices N`` splits the model by heads over N GPUs (models/sharding.py) for 256K and beyond;
``--chunk-size C`` prefills C tokens at a time (``Llama.prefill``'s chunked prefill: activations
bounded by a chunk, e.g. 1M tokens on 2 GPUs), every mode alike.
Reported per length: prefill time (jitted, warm, median), the split (attention, plan, rest of
the model, from the per-layer ops timed alone x layers) and the compiled peak memory.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pbs_jax
from experiments.lib import timing
from experiments.lib.forward import compile_prefill
from experiments.lib.report import pyplot, save_figure
from experiments.lib.specs import FixedDensityPBS
from models import FULL_ATTENTION, Llama, LlamaConfig, PBSAttention, chunk_bounds, sharding
from pbs_jax import PBSConfig

LENGTHS = (8192, 16384, 32768, 65536, 131072)
# Llama-3.1-8B, threshold 0.9, with permutation: selected / causal blocks (paper Table 5).
PAPER_DENSITY = {
    8192: 1205 / 2080,
    16384: 4005 / 8256,
    32768: 13337 / 32896,
    65536: 37632 / 131328,
    131072: 114996 / 524800,
}


def fixed_density(n: int) -> float:
    """The paper's Llama-3.1-8B density at N; beyond 128K, the 128K one (density falls with N,
    so this understates the sparsity there)."""
    return PAPER_DENSITY[max(x for x in PAPER_DENSITY if x <= n)] if n >= 8192 else 1.0


def peak_bytes(compiled) -> int:
    """Compiled memory of one call: arguments + outputs + temporaries (XLA's own accounting)."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def fits_or_raise(compiled) -> None:
    """Raise ``MemoryError`` before running a prefill whose compiled peak exceeds a device's
    memory: run on several GPUs, an out-of-memory on one leaves the others waiting in a
    collective until the call's time runs out."""
    limit = jax.devices()[0].memory_stats() or {}
    limit = limit.get("bytes_limit")
    if limit and peak_bytes(compiled) > limit:
        raise MemoryError(
            f"compiled peak {peak_bytes(compiled) / 2**30:.1f} GiB per device exceeds the "
            f"device's {limit / 2**30:.1f} GiB"
        )


def bench(args, out: pathlib.Path) -> dict:
    config = LlamaConfig.preset("llama-3.1-8b")
    model = nnx.jit(lambda: Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
    mesh = sharding.make_mesh(args.devices) if args.devices > 1 else None
    # Several GPUs: parameters split by heads, attention run per device on its own heads.
    graphdef, state = sharding.shard_model(model, mesh) if mesh else nnx.split(model)
    del model
    cfg = PBSConfig.paper()
    ceiling = gemm_ceiling_tflops()  # the card's, measured once
    rows = []
    for n in args.lengths:
        tokens = jax.random.randint(jax.random.key(n), (1, n), 0, config.vocab_size)
        density = fixed_density(n)
        modes = {
            "full": FULL_ATTENTION,
            "pbs_selector": PBSAttention(cfg, impl="auto"),
            "pbs_fixed": FixedDensityPBS(round(density, 4), cfg),
        }
        modes = {
            name: (sharding.HeadParallel(spec, mesh) if mesh else spec)
            for name, spec in modes.items()
            if name in args.modes
        }
        chunk = args.chunk_size if args.chunk_size and args.chunk_size < n else None
        row = {"n": n, "fixed_density": density, "devices": args.devices, "chunk_size": chunk}
        extrapolate = args.extrapolate_full_above and n > args.extrapolate_full_above
        for name, attention in modes.items():
            if name == "full" and extrapolate:
                continue  # estimated below from the per-layer attention split
            try:
                # Compiled once: its memory analysis is the peak, its first call the warm-up
                # (at 512K one prefill takes tens of seconds, so no run is spent twice).
                compiled = compile_prefill(graphdef, state, tokens, attention, chunk)
                fits_or_raise(compiled)
                # Nothing of a run is kept but its density: the cache alone is 64 GiB per GPU at
                # 1M tokens on 2 GPUs, and the split below needs the memory.
                density_of_run = float(jnp.mean(compiled(graphdef, state, tokens)[2].density))
                row[name] = {
                    "ms": timing.time_call(
                        lambda s, t: compiled(graphdef, s, t)[0],
                        state,
                        tokens,
                        min_reps=args.min_reps,
                        budget_s=1.0,
                        warm=True,
                    ),
                    "density": density_of_run,
                    "peak_gib": peak_bytes(compiled) / 2**30,
                }
            except (
                Exception
            ) as err:  # out of memory at the longest lengths is a result, not a crash
                row[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"N={n} {name}: {row[name]['error']}", flush=True)
                continue
            print(
                f"N={n}{gpus(row)} {name}: {row[name]['ms']:.1f} ms, density "
                f"{row[name]['density']:.3f}, peak {row[name]['peak_gib']:.1f} GiB",
                flush=True,
            )
        row["split"] = layer_split(n, density, cfg, config, mesh, row, chunk, ceiling)
        if extrapolate:
            row["full"] = {"ms": full_lower_bound_ms(row["split"]), "extrapolated": True}
        for name in ("pbs_selector", "pbs_fixed"):
            if "ms" in row.get(name, {}) and "ms" in row.get("full", {}):
                row[name]["speedup_vs_full"] = row["full"]["ms"] / row[name]["ms"]
                if "peak_gib" in row["full"]:
                    row[name]["peak_vs_full"] = row[name]["peak_gib"] / row["full"]["peak_gib"]
        print(f"N={n}{gpus(row)} split: {row['split']}", flush=True)
        rows.append(row)
        timing.write_json(out / f"{output_name(args)}.json", {"rows": rows})  # keep what finished
        del tokens
    return {
        "stamp": timing.stamp(),
        "model": "llama-3.1-8b (random bf16 weights)",
        "cfg": dataclasses.asdict(cfg),
        "rows": rows,
    }


def gemm_ceiling_tflops(size: int = 8192) -> float:
    """The card's bf16 matmul rate (TFLOP/s): a square ``size``³ GEMM, jitted, warm."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    ms = timing.time_call(jax.jit(lambda a, b: a @ b), a, a)
    return 2 * size**3 / ms / 1e9


def rest_of_model_flops(n: int, config: LlamaConfig, devices: int) -> float:
    """Matmul FLOPs per device of everything but attention in an N-token prefill: the q/k/v/o
    projections and the SwiGLU MLP of every layer (``LlamaConfig.layer_linears``; the last
    token's logits are negligible)."""
    return 2.0 * n * config.layer_matmul_params * config.num_layers / devices


def full_lower_bound_ms(split: dict) -> float:
    """An estimate from below of a full prefill too long to run: its attention timed alone (one
    layer × layers; in a 128K prefill cuDNN took the same time a layer as alone, so this part is a
    bound) plus the rest of the model at the square GEMM's rate. That rate is no ceiling: the
    model's own GEMMs ran at 121% of it (results/profile_layer.md), and at 128K on one H200 the
    estimate came out 10.9 s for a measured 10.4 s (80.2 s ≥ 76.9 s at 512K on two; 2026-11-30).
    A speed-up against it is therefore an estimate; against the attention part alone, a bound.

    (Swapping PBS (b)'s attention timed alone for full attention's in PBS (b)'s prefill is no
    estimate at 1M tokens: there the chunks of PBS attention timed alone summed to more than
    the whole chunked prefill took.)"""
    return split["attention_full_ms"] + split["rest_at_ceiling_ms"]


def layer_split(n, density, cfg, config, mesh, row, chunk, ceiling) -> dict:
    """One layer's attention ops timed alone (on each device's own heads when ``mesh``) × layers:
        full attention, PBS (b)'s attention (plan + lists + kernel) and its plan alone; the rest of
        the model (a prefill minus its attention) beside its matmul FLOPs at the card's GEMM rate
    ``ceiling`` (TFLOP/s, :func:`gemm_ceiling_tflops`).

        ``chunk``: PBS (b) and its plan as the chunked prefill runs them, each chunk's queries
        (the last ``end - start``) over keys ``0 … end-1``, summed over chunks; full attention
        whole (cuDNN over all N: the same causal work as its chunks, and no chunk plumbing that
        could slow it)."""
    h, hk, d, layers = config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers

    heads = P(None, None, sharding.AXIS, None)

    def per_device(fn, out_spec=heads):
        """``fn`` jitted, run by each device on its own heads when there is a mesh."""
        if mesh:
            fn = jax.shard_map(
                fn, mesh=mesh, in_specs=(heads,) * 3, out_specs=out_spec, check_vma=False
            )
        return jax.jit(fn)

    def operand(shape, key):
        x = jax.random.normal(jax.random.key(key), shape, jnp.bfloat16)
        return jax.device_put(x, NamedSharding(mesh, heads)) if mesh else x

    k, v = operand((1, n, hk, d), 2), operand((1, n, hk, d), 3)
    dense = per_device(pbs_jax.dense_attention)
    fixed = per_device(lambda q, k, v: FixedDensityPBS(round(density, 4), cfg)(q, k, v)[0])
    # The plan's block mask [B, Hq, Tq, T]: heads on axis 1.
    plan = per_device(
        lambda q, k, v: pbs_jax.pbs_plan(q, k, cfg)[1], P(None, sharding.AXIS, None, None)
    )
    split = {"attention_full_ms": 0.0, "attention_pbs_fixed_ms": 0.0, "plan_ms": 0.0}
    q = operand((1, n, h, d), 1)
    split["attention_full_ms"] = layers * timing.time_call(dense, q, k, v, min_reps=2)
    for start, end in chunk_bounds(n, chunk):
        qc, kc, vc = q[:, start:end], k[:, :end], v[:, :end]
        split["attention_pbs_fixed_ms"] += layers * timing.time_call(fixed, qc, kc, vc, min_reps=2)
        split["plan_ms"] += layers * timing.time_call(plan, qc, kc, vc, min_reps=2)
        del qc, kc, vc
    devices = mesh.shape[sharding.AXIS] if mesh else 1
    split["gemm_ceiling_tflops"] = ceiling
    split["rest_at_ceiling_ms"] = rest_of_model_flops(n, config, devices) / ceiling / 1e9
    if "ms" in row.get("full", {}) and not row["full"].get("extrapolated"):
        split["rest_of_model_ms"] = row["full"]["ms"] - split["attention_full_ms"]
    elif "ms" in row.get("pbs_fixed", {}):
        rest = row["pbs_fixed"]["ms"] - split["attention_pbs_fixed_ms"]
        if rest > 0:  # at 1M (chunked) the attention timed alone exceeded the whole prefill
            split["rest_of_model_ms"] = rest
    return split


def gpus(row) -> str:
    """ " on 2 × NVIDIA H200" for a multi-GPU row (its own run's card), "" for one GPU; and
    ", chunks of C" for a chunked prefill."""
    chunks = f", chunks of {row['chunk_size']}" if row.get("chunk_size") else ""
    if row.get("devices", 1) == 1:
        return chunks
    card = row.get("stamp", {}).get("device", "GPUs")
    return f" on {row['devices']} × {card}{chunks}"


def report(payload, out: pathlib.Path, name: str = "bench_prefill"):
    st = payload["stamp"]
    lines = [
        f"# Prefill of a Llama-3.1-8B-shaped model — one {st['device']} (rows on several "
        f"GPUs name theirs), JAX {st['jax']}, "
        f"{st['date']}",
        "",
        "Batch 1, random bf16 weights, jitted prefill (KV cache + last logits), median ms. "
        'PBS (a): the real selector with impl="auto" (random weights give dense plans, so '
        "auto falls back to cuDNN). PBS (b): real permutation + selection computed, kernel at "
        "Llama-3.1-8B's measured density (paper Table 5). Split: one layer's ops timed "
        "alone × 32 (on each GPU's own heads); PBS (b)'s attention includes its plan. Rest of "
        "the model: a prefill minus its attention; in brackets, its matmul FLOPs at the "
        "card's measured bf16 GEMM rate (a square 8192³ GEMM). ≥: the full prefill not run (too "
        "long for one call), estimated instead: its attention timed alone (a bound) plus the "
        "rest of the model at the square GEMM's rate (an estimate: the model's GEMMs ran "
        "faster, results/profile_layer.md), so PBS (b)'s × is an estimate. Peak: XLA's "
        "compiled memory of the whole prefill, per GPU.",
        "",
        "| N | full ms | PBS (a) ms (density, ×) | PBS (b) ms (density, ×) | attention full / "
        "PBS (b) ms | plan ms | rest of model ms (at the GEMM ceiling) | peak GiB per GPU "
        "full / (b) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:

        def cell(m, r=r):
            x = r.get(m)
            if x is None:
                return "not run"
            if "error" in x:
                return x["error"][:60] + "…"
            approx = "≥ " if x.get("extrapolated") else ""
            bound = "≥ " if r.get("full", {}).get("extrapolated") else ""
            extra = (
                f" ({x['density']:.2f}, {bound}{x['speedup_vs_full']:.2f}×)"
                if "speedup_vs_full" in x and m != "full"
                else ""
            )
            return f"{approx}{x['ms']:.1f}{extra}"

        peak = " / ".join(
            f"{r[m]['peak_gib']:.1f}" for m in ("full", "pbs_fixed") if "peak_gib" in r.get(m, {})
        )
        sp = r.get("split", {})
        split = (
            f"{sp['attention_full_ms']:.1f} / {sp['attention_pbs_fixed_ms']:.1f} | "
            f"{sp['plan_ms']:.1f} | "
            + (f"{sp['rest_of_model_ms']:.1f}" if "rest_of_model_ms" in sp else "—")
            + (f" ({sp['rest_at_ceiling_ms']:.0f})" if "rest_at_ceiling_ms" in sp else "")
            if sp
            else " | | "
        )
        lines.append(
            f"| {r['n']}{gpus(r)} | "
            + " | ".join(cell(m) for m in ("full", "pbs_selector", "pbs_fixed"))
            + f" | {split} | {peak} |"
        )
    if payload.get("note"):
        lines += ["", payload["note"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    rows = [r for r in payload["rows"] if "speedup_vs_full" in r.get("pbs_fixed", {})]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for devices in sorted({r.get("devices", 1) for r in rows}):
        mine = [r for r in rows if r.get("devices", 1) == devices]
        ns = [r["n"] for r in mine]
        label = "" if devices == 1 else f", {devices} GPUs head-parallel"
        style = {1: "o-", 2: "^-", 4: "D-"}.get(devices, "v-")
        ax.plot(
            ns,
            [r["pbs_fixed"]["speedup_vs_full"] for r in mine],
            style,
            label=f"PBS (b): Llama-3.1-8B densities{label}",
        )
        if any("speedup_vs_full" in r.get("pbs_selector", {}) for r in mine):
            ax.plot(
                ns,
                [r.get("pbs_selector", {}).get("speedup_vs_full", np.nan) for r in mine],
                "s--",
                label=f"PBS (a): real selector, random weights{label}",
            )
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length N")
    ax.set_ylabel("prefill speedup vs cuDNN full attention (×)")
    ax.set_title(
        f"Llama-3.1-8B-shaped prefill, JAX {st['jax']}, {st['date']}\n"
        f"one GPU: {st['device']}; several GPUs: cards in the table",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / f"{name}.png")


def add_arguments(parser):
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(LENGTHS),
        help="prompt lengths (default 8K..128K)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="GPUs for head-parallel prefill (models/sharding.py; default 1)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["full", "pbs_selector", "pbs_fixed"],
        choices=["full", "pbs_selector", "pbs_fixed"],
        help="which prefills to time (default: all three)",
    )
    parser.add_argument(
        "--extrapolate-full-above",
        type=int,
        default=0,
        help="above this N, the full prefill is not run but estimated: its attention "
        "timed alone on one layer × layers plus the rest of the model at the square GEMM's rate "
        "(0: always run it)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="chunked prefill: this many tokens at a time, for lengths above it (a multiple "
        "of the segment, 256; 0: the whole prompt at once)",
    )
    parser.add_argument(
        "--min-reps",
        type=int,
        default=2,
        help="timed prefills per mode after the warm-up (1 for minute-long prefills)",
    )


def output_name(args) -> str:
    return "bench_prefill" if args.devices == 1 else f"bench_prefill_{args.devices}gpu"


def main(argv=None):
    timing.benchmark_cli(argv, __doc__, output_name, add_arguments, bench, report)


if __name__ == "__main__":
    main()
