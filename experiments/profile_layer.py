"""Where one decoder layer's prefill time goes: a per-kernel GPU profile of one
Llama-3.1-8B-shaped layer, its kernels grouped into GEMMs, attention and the rest, the GEMMs
against the card's GEMM ceiling; and the wall time of cheap variants of the layer beside it.

Run on a GPU (one call, about 3 minutes on an H200 at the default lengths, mostly compiles):
  python -m experiments.profile_layer            # writes $OUT/profile_layer.json and .md
  python -m experiments.profile_layer --smoke    # the script's logic on CPU (SmolLM2 shapes)
  python -m experiments.profile_layer --report experiments/results/profile_layer.json
                                                 # re-renders the markdown from the JSON

Per length (B=1, bf16, random weights, ``LlamaConfig.preset("llama-3.1-8b")``):
  * ONE ``DecoderLayer`` forward as the prefill runs it (``models.llama``'s layer step: the
    layer jitted on x [1, N, d] and positions [N], full attention (cuDNN), returning the
    hidden state and the layer's k/v), profiled with experiments.lib.kernel_trace's kernel
    profiler: GPU µs per kernel per call, each XLA kernel named with the HLO instruction it
    runs (shape and JAX op, from the compiled module), beside the wall time of the call;
  * the kernels in three groups by name (``experiments.lib.kernel_trace.kernel_group``):
    GEMMs, with their achieved TFLOP/s from the layer's matmul FLOPs
    (``LlamaConfig.layer_linears``) against ``bench_prefill.gemm_ceiling_tflops`` measured in
    the same run (at the start and again at the end: a card that slows when hot shows it);
    attention (reported apart, beside cuDNN timed alone as bench_prefill's split times it);
    everything else (norms, RoPE, SiLU·mul, residual adds, casts, copies), also summed per JAX
    op of the HLO it runs;
  * each distinct matmul of the layer alone (x [rows, n_in] @ w [n_in, n_out] at the rows the
    layer runs it on: N for the attention projections, ``mlp_chunk`` for the MLP's), the
    fused q/k/v and gate/up matmuls and the ceiling's square, each as XLA compiles it and
    with XLA's Triton GEMMs off (cuBLAS only);
  * the wall time of variants of the same layer (same weights): q/k/v as one matmul, gate/up
    as one matmul, both (weights concatenated once, outside the call, or per call inside it,
    as a model keeping the checkpoint's layout would run it), the layer compiled with XLA's
    Triton GEMMs off, and larger MLP chunks. A measurement, not a model change: the variants
    are built from the layer's modules (``experiments.lib.layer_variants``), each checked
    against the model's output (relative error).

The question (issue: 8B prefill ≥ 2.5× at 128K on one H200): bench_prefill's rest of the model
(a prefill minus its attention) had taken 4524 ms at 128K against 2811 ms of its matmul FLOPs
at the GEMM ceiling. Answered on an H200 (results/profile_layer.md, 2026-11-30): one layer's
GEMMs run at 121% of the square GEMM's rate and no variant gains more than noise.
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench_kernel import timer
from experiments.bench_prefill import gemm_ceiling_tflops
from experiments.lib import timing
from experiments.lib.kernel_trace import GROUPS, grouped, hlo_instructions, kernel_profile
from experiments.lib.kernels import causal_tflops
from experiments.lib.layer_variants import CUBLAS_ONLY, layer_call, variant_call, variants
from experiments.lib.metrics import rel_err
from models import LlamaConfig
from models.layers import DecoderLayer
from pbs_jax import dense_attention

LENGTHS = (32768, 131072)
COMMITTED_PREFILL = pathlib.Path(__file__).parent / "results" / "bench_prefill.json"

# -- matmuls alone -----------------------------------------------------------------------------


def matmuls(config: LlamaConfig, n: int, time, ceiling: float, square: int) -> list[dict]:
    """Each distinct matmul of one layer alone, x [rows, n_in] @ w [n_in, n_out] bf16, at the
    rows the layer runs it on (N for attention, ``mlp_chunk`` for the MLP), then the fused q/k/v
    and gate/up ones and the ceiling's ``square``³: ms per call as XLA compiles it and with its
    Triton GEMMs off (``CUBLAS_ONLY``), calls per layer, TFLOP/s and share of the ceiling."""
    chunk = min(n, config.mlp_chunk)
    chunks = -(-n // chunk)
    linears = config.layer_linears
    shapes = collections.defaultdict(list)  # (rows, n_in, n_out, calls per layer, kind): names
    for name, shape in linears.items():
        rows, calls = (chunk, chunks) if name in ("gate_proj", "up_proj", "down_proj") else (n, 1)
        shapes[(rows, shape.n_in, shape.n_out, calls, "layer")].append(name)
    qkv = sum(linears[name].n_out for name in ("q_proj", "k_proj", "v_proj"))
    shapes[(n, config.d_model, qkv, 1, "fused")] = ["fused q/k/v"]
    shapes[(chunk, config.d_model, 2 * config.ffn_dim, chunks, "fused")] = ["fused gate/up"]
    shapes[(square, square, square, 0, "ceiling")] = ["the ceiling's square"]
    out = []
    matmul = jax.jit(jnp.dot)
    for (rows, n_in, n_out, calls, kind), names in shapes.items():
        x = jax.random.normal(jax.random.key(rows + n_in), (rows, n_in), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(n_out), (n_in, n_out), jnp.bfloat16) / n_in**0.5
        ms = time(matmul, x, w)
        cublas_ms = time(matmul.lower(x, w).compile(compiler_options=CUBLAS_ONLY), x, w)
        tflops = 2 * rows * n_in * n_out / ms / 1e9
        out.append(
            {
                "matmuls": ", ".join(names),
                "kind": kind,
                "shape": [rows, n_in, n_out],
                "ms": ms,
                "cublas_ms": cublas_ms,
                "per_layer": calls * len(names) if kind == "layer" else 0,
                "calls_if_fused": calls if kind == "fused" else None,
                "tflops": tflops,
                "of_ceiling": tflops / ceiling,
            }
        )
        del x, w
    return out


# -- one length --------------------------------------------------------------------------------


def committed_rest_ms(n: int) -> float | None:
    """bench_prefill's committed rest of the model (one GPU, unchunked) at N, if any."""
    if not COMMITTED_PREFILL.exists():
        return None
    for row in json.loads(COMMITTED_PREFILL.read_text())["rows"]:
        if row["n"] == n and row.get("devices", 1) == 1 and not row.get("chunk_size"):
            return row.get("split", {}).get("rest_of_model_ms")
    return None


def profile_length(
    n: int, config: LlamaConfig, ceiling: float, ceiling_size: int, smoke: bool
) -> dict:
    time = timer(n, smoke)
    # Matmuls alone take 1–30 ms: half a second of repeats each is plenty.
    matmul_time = time if smoke else functools.partial(timing.time_call, budget_s=0.5)
    layer = nnx.jit(lambda: DecoderLayer(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(layer)
    del layer
    x = jax.random.normal(jax.random.key(n), (1, n, config.d_model), jnp.bfloat16)
    positions = jnp.arange(n, dtype=jnp.int32)

    call = layer_call(graphdef)
    hlo = hlo_instructions(call.lower(state, x, positions).compile().as_text())
    profile = grouped(kernel_profile(call, state, x, positions), hlo)
    wall_ms = time(call, state, x, positions)
    reference = call(state, x, positions)[0]

    h, hk, d = config.num_heads, config.num_kv_heads, config.head_dim
    q = jax.random.normal(jax.random.key(1), (1, n, h, d), jnp.bfloat16)
    k, v = (jax.random.normal(jax.random.key(i), (1, n, hk, d), jnp.bfloat16) for i in (2, 3))
    attention_alone_ms = time(jax.jit(dense_attention), q, k, v)
    del q, k, v

    gemm_flops = 2.0 * n * config.layer_matmul_params
    gpu = profile["group_us"]
    row = {
        "n": n,
        "wall_ms": wall_ms,
        "gpu_ms": sum(gpu.values()) / 1e3,
        "group_ms": {g: us / 1e3 for g, us in gpu.items()},
        "gemm_tflops": gemm_flops / gpu["gemm"] / 1e6 if gpu["gemm"] else None,
        "gemm_at_ceiling_ms": gemm_flops / ceiling / 1e9,
        "attention_tflops": (
            causal_tflops(1, h, n, d, gpu["attention"] / 1e3) if gpu["attention"] else None
        ),
        "attention_alone_ms": attention_alone_ms,
        "committed_rest_of_model_ms": committed_rest_ms(n),
        "launches": sum(r["launches"] for r in profile["kernels"]),
        "kernels": profile["kernels"],
        "other_by_op": profile["other_by_op"][:15],
        "matmuls": matmuls(config, n, matmul_time, ceiling, ceiling_size),
        "variants": [],
    }
    print(render_length(row, config.num_layers, ceiling), flush=True)

    for name, variant in variants(n, config.mlp_chunk).items():
        fn, fn_state = variant_call(call, graphdef, state, variant, x, positions)
        err = rel_err(fn(fn_state, x, positions)[0], reference)
        row["variants"].append({"name": name, "ms": time(fn, fn_state, x, positions), "err": err})
        print(f"N={n} {name}: {row['variants'][-1]['ms']:.2f} ms, rel. err {err:.1e}", flush=True)
        del fn_state
    return row


def run(lengths, config: LlamaConfig, preset: str, smoke: bool = False) -> dict:
    ceiling_size = 256 if smoke else 8192
    payload = {
        "stamp": timing.stamp(),
        "preset": preset,
        "layers": config.num_layers,
        "mlp_chunk": config.mlp_chunk,
        "gemm_ceiling_size": ceiling_size,
        "gemm_ceiling_tflops": gemm_ceiling_tflops(ceiling_size),
        "rows": [],
    }
    for n in lengths:
        ceiling = payload["gemm_ceiling_tflops"]
        payload["rows"].append(profile_length(n, config, ceiling, ceiling_size, smoke))
    payload["gemm_ceiling_after_tflops"] = gemm_ceiling_tflops(ceiling_size)
    return payload


# -- report ------------------------------------------------------------------------------------


def fmt(x, spec=".1f", none="—") -> str:
    return none if x is None else format(x, spec)


def render_length(r: dict, layers: int, ceiling: float) -> str:
    """One length's detail: groups, matmuls alone, kernels, the "other" group per op."""
    g = r["group_ms"]
    rest_ms = r["wall_ms"] - g["attention"]
    lines = [
        f"\n## N = {r['n']}: one layer\n",
        f"Wall {r['wall_ms']:.2f} ms per call; GPU {r['gpu_ms']:.2f} ms in "
        f"{r['launches']:.0f} launches (the gap, {r['wall_ms'] - r['gpu_ms']:.2f} ms, is "
        f"dispatch and idle GPU). Rest of the layer (wall − attention): {rest_ms:.2f} ms, × "
        f"{layers} layers = {rest_ms * layers:.0f} ms (bench_prefill's committed rest of the "
        f"model: {fmt(r['committed_rest_of_model_ms'], '.0f')} ms); its matmul FLOPs at the "
        f"ceiling ({ceiling:.3g} TFLOP/s): {r['gemm_at_ceiling_ms']:.2f} ms, × {layers} = "
        f"{r['gemm_at_ceiling_ms'] * layers:.0f} ms.\n",
        "| group | GPU ms | share of GPU | TFLOP/s | of ceiling |",
        "|---|---|---|---|---|",
    ]
    total = max(r["gpu_ms"], 1e-9)
    rates = {"gemm": r["gemm_tflops"], "attention": r["attention_tflops"], "other": None}
    for group in GROUPS:
        rate = rates[group]
        share = fmt(rate / ceiling if rate else None, ".0%") if group == "gemm" else ""
        lines.append(
            f"| {group} | {g[group]:.2f} | {g[group] / total:.0%} | {fmt(rate, '.3g')} | {share} |"
        )
    lines.append(
        f"\nAttention alone (cuDNN, bench_prefill's split): {r['attention_alone_ms']:.2f} ms "
        f"wall, in the layer {g['attention']:.2f} ms GPU.\n"
    )
    lines.append(
        "| matmul(s) alone | rows × n_in × n_out | ms | ms, cuBLAS only | per layer | TFLOP/s | "
        "of ceiling |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for m in r["matmuls"]:
        calls = {"layer": m["per_layer"], "fused": f"({m['calls_if_fused']} if fused)"}
        lines.append(
            f"| {m['matmuls']} | {' × '.join(map(str, m['shape']))} | {m['ms']:.2f} | "
            f"{m['cublas_ms']:.2f} | {calls.get(m['kind'], '—')} | {m['tflops']:.3g} | "
            f"{m['of_ceiling']:.0%} |"
        )
    alone = sum(m["ms"] * m["per_layer"] for m in r["matmuls"])
    lines.append(f"\nThe layer's matmuls alone, summed: {alone:.2f} ms.\n")
    if r["kernels"]:
        lines.append("| kernel | group | HLO shape | JAX op | launches | GPU µs |")
        lines.append("|---|---|---|---|---|---|")
        for k in r["kernels"][:25]:
            lines.append(
                f"| {k['kernel'][:60]} | {k['group']} | {k.get('shape', '')} | "
                f"{k.get('op', '')[-50:]} | {k['launches']:.0f} | {k['us']:.0f} |"
            )
        lines.append("\n| other: JAX op | GPU µs |\n|---|---|")
        lines += [f"| {op} | {us:.0f} |" for op, us in r["other_by_op"]]
    else:
        lines.append("(no GPU kernels in the trace: not run on a GPU)")
    return "\n".join(lines)


def render(payload: dict) -> str:
    layers, ceiling = payload["layers"], payload["gemm_ceiling_tflops"]
    lines = [render_length(r, layers, ceiling) for r in payload["rows"]]
    lines += [
        "\n## Summary\n",
        f"GEMM ceiling ({payload['gemm_ceiling_size']}³ bf16, jitted): {ceiling:.3g} TFLOP/s "
        "at the start, "
        f"{fmt(payload.get('gemm_ceiling_after_tflops'), '.3g')} at the end. Per layer, "
        f"× {layers} layers in brackets.\n",
        "| N | layer wall ms | attention GPU ms | GEMM GPU ms (TFLOP/s, of ceiling) | "
        "GEMMs at ceiling ms | other GPU ms | gap ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        g = r["group_ms"]
        rate = r["gemm_tflops"]
        lines.append(
            f"| {r['n']} | {r['wall_ms']:.2f} ({r['wall_ms'] * layers:.0f}) | "
            f"{g['attention']:.2f} ({g['attention'] * layers:.0f}) | "
            f"{g['gemm']:.2f} ({g['gemm'] * layers:.0f}; {fmt(rate, '.3g')}, "
            f"{fmt(rate / ceiling if rate else None, '.0%')}) | "
            f"{r['gemm_at_ceiling_ms']:.2f} ({r['gemm_at_ceiling_ms'] * layers:.0f}) | "
            f"{g['other']:.2f} ({g['other'] * layers:.0f}) | "
            f"{r['wall_ms'] - r['gpu_ms']:.2f} |"
        )
    lines += [
        "",
        "| variant (same weights) | "
        + " | ".join(f"N={r['n']} ms (× model, rel. err)" for r in payload["rows"])
        + " |",
        "|---|" + "---|" * len(payload["rows"]),
    ]
    names = list(dict.fromkeys(v["name"] for r in payload["rows"] for v in r["variants"]))
    for name in names:
        cells = []
        for r in payload["rows"]:
            base = r["variants"][0]["ms"]
            v = next((v for v in r["variants"] if v["name"] == name), None)
            cells.append(
                "—" if v is None else f"{v['ms']:.2f} ({v['ms'] / base:.3f}×, {v['err']:.0e})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--smoke", action="store_true", help="SmolLM2 shapes on CPU (untimed)")


def bench(args, out):
    if args.smoke:  # SmolLM2's layer, its MLP chunked as the 8B's is at 128K
        config = LlamaConfig.preset("smollm2-135m", mlp_chunk=128)
        return run([512], config, "smollm2-135m, mlp_chunk 128", smoke=True)
    return run(args.lengths, LlamaConfig.preset("llama-3.1-8b"), "llama-3.1-8b")


def report(payload, out: pathlib.Path, name: str = "profile_layer"):
    st = payload["stamp"]
    head = (
        f"# One decoder layer's prefill ({payload['preset']}, B=1, bf16, random weights, "
        f"full cuDNN attention) — {st['device']}, JAX {st['jax']}, {st['date']}\n\n"
        "Kernel groups by name: attention = sdpa / flash / fmha / attention / other cuDNN; "
        "GEMM = gemm / nvjet / xmma / cutlass / cublas / matmul / dot; other = the rest.\n"
    )
    (out / f"{name}.md").write_text(head + render(payload) + "\n")


def main(argv=None):
    timing.benchmark_cli(
        argv, __doc__, "profile_layer", add_arguments, bench, report, runs_off_gpu=lambda a: a.smoke
    )


if __name__ == "__main__":
    main()
