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
    hidden state and the layer's k/v), profiled with profile_plan's Perfetto-trace kernel
    profiler: GPU µs per kernel per call, each XLA kernel named with the HLO instruction it
    runs (shape and JAX op, from the compiled module), beside the wall time of the call;
  * the kernels in three groups by name (:func:`kernel_group`, rules in ``ATTENTION_NAMES``
    and ``GEMM_NAMES``): GEMMs, with their achieved TFLOP/s from the layer's matmul FLOPs
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
    are built here from the layer's modules (``FusedQKVAttention``, ``FusedGateUpMLP``), each
    checked against the model's output (relative error).

The question (issue: 8B prefill ≥ 2.5× at 128K on one H200): bench_prefill's rest of the model
(a prefill minus its attention) took 4524 ms at 128K against 2811 ms of its matmul FLOPs at
the GEMM ceiling. Where does one layer's (1/32 of it) time go?
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench_kernel import timer
from experiments.bench_prefill import gemm_ceiling_tflops
from experiments.lib import timing
from experiments.lib.metrics import rel_err
from experiments.profile_plan import kernel_profile
from models import FULL_ATTENTION, LlamaConfig
from models.layers import MLP, Attention, DecoderLayer
from pbs_jax import dense_attention

LENGTHS = (32768, 131072)
COMMITTED_PREFILL = pathlib.Path(__file__).parent / "results" / "bench_prefill.json"

# Kernel groups, by name (lower case), first match wins:
#   attention: cuDNN's fused attention ("cudnn_generated_fort_native_sdpa_…"), any flash / fmha;
#   GEMM: cuBLAS (sm90_xmma_gemm_…, nvjet_…), CUTLASS, XLA's Triton GEMM fusions (gemm_fusion_…,
#         triton_gemm_…) and any kernel with "dot" between separators;
#   attention again: any other cuDNN kernel (full attention is the layer's only cuDNN call);
#   everything else: XLA's elementwise / reduction / copy kernels (loop_…, input_…, copy_…).
ATTENTION_NAMES = ("sdpa", "flash", "fmha", "attention")
GEMM_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")
GROUPS = ("gemm", "attention", "other")


def kernel_group(name: str) -> str:
    """A GPU kernel's group by its name, the rules above: "gemm", "attention" or "other"."""
    low = name.lower()
    if any(mark in low for mark in ATTENTION_NAMES):
        return "attention"
    if any(mark in low for mark in GEMM_NAMES) or re.search(r"(^|[_.])dot([_.]|$)", low):
        return "gemm"
    return "attention" if "cudnn" in low else "other"


# -- the layer and its variants ----------------------------------------------------------------


class Columns(nnx.Module):
    """Columns [start, stop) of its input's last axis: one projection's share of the output of
    a fused matmul, in the projection's place."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, y: jax.Array) -> jax.Array:
        return y[..., self.start : self.stop]


def concatenated_linear(*linears: nnx.Linear) -> nnx.Linear:
    """One ``nnx.Linear`` computing ``linears`` side by side: kernel [n_in, Σ n_out] (and bias)
    their columns concatenated, so its output's columns are theirs in order."""
    first = linears[0]
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
    bias = jnp.concatenate([lin.bias[...] for lin in linears]) if first.use_bias else None
    return nnx.Linear(
        *kernel.shape,
        use_bias=first.use_bias,
        dtype=first.dtype,
        param_dtype=first.param_dtype,
        kernel_init=lambda *_: kernel,
        bias_init=lambda *_: bias,
        rngs=nnx.Rngs(0),
    )


def column_slices(widths) -> list[Columns]:
    """Consecutive ``Columns`` of the given widths."""
    starts = [sum(widths[:i]) for i in range(len(widths) + 1)]
    return [Columns(a, b) for a, b in zip(starts, starts[1:], strict=False)]


class FusedQKVAttention(Attention):
    """``Attention`` with q/k/v as one matmul, x @ [Wq | Wk | Wv] (the given layer's weights),
    then ``Attention._qkv`` itself (reshape, RoPE) with column slices for projections."""

    def __init__(self, attn: Attention):
        self.config = attn.config
        names = ("q_proj", "k_proj", "v_proj")
        self.qkv_proj = concatenated_linear(*(getattr(attn, name) for name in names))
        widths = [attn.config.layer_linears[name].n_out for name in names]
        self.q_proj, self.k_proj, self.v_proj = column_slices(widths)
        self.o_proj = attn.o_proj

    def _qkv(self, x, positions):
        return super()._qkv(self.qkv_proj(x), positions)


class FusedGateUpMLP(MLP):
    """``MLP`` with gate/up as one matmul, x @ [Wgate | Wup], then ``MLP.__call__`` itself with
    column slices for the two projections."""

    def __init__(self, mlp: MLP):
        self.gate_up_proj = concatenated_linear(mlp.gate_proj, mlp.up_proj)
        self.gate_proj, self.up_proj = column_slices([mlp.gate_proj.out_features] * 2)
        self.down_proj = mlp.down_proj

    def __call__(self, x):
        return super().__call__(self.gate_up_proj(x))


def fuse_qkv(layer: DecoderLayer) -> None:
    layer.attn = FusedQKVAttention(layer.attn)


def fuse_gate_up(layer: DecoderLayer) -> None:
    layer.mlp = FusedGateUpMLP(layer.mlp)


def mlp_chunk_of(tokens: int):
    """The change that runs the layer's MLP over chunks of ``tokens`` (``DecoderLayer``'s)."""

    def set_chunk(layer: DecoderLayer) -> None:
        layer.mlp_chunk = tokens

    return set_chunk


class Variant(NamedTuple):
    """A variant of the layer: ``changes`` (functions of the merged layer) applied once to its
    weights, or inside each call when ``per_call``; compiled with XLA ``compiler_options``."""

    changes: tuple = ()
    per_call: bool = False
    compiler_options: dict | None = None


# XLA autotunes each dot between cuBLAS and its own Triton GEMMs; this leaves cuBLAS alone.
CUBLAS_ONLY = {"xla_gpu_enable_triton_gemm": False}


def variants(n: int, mlp_chunk: int) -> dict[str, Variant]:
    """The variants timed beside the model's layer, by name. The MLP chunk ones: twice and four
    times the model's chunk and none (the whole prompt), distinct ones only."""
    both = (fuse_qkv, fuse_gate_up)
    out = {
        "model": Variant(),
        "fused q/k/v": Variant((fuse_qkv,)),
        "fused gate/up": Variant((fuse_gate_up,)),
        "fused q/k/v + gate/up": Variant(both),
        "fused q/k/v + gate/up, concatenated per call": Variant(both, per_call=True),
        "model, XLA Triton GEMMs off (cuBLAS only)": Variant(compiler_options=CUBLAS_ONLY),
    }
    for chunk in sorted({min(n, f * mlp_chunk) for f in (2, 4)} | {n}):
        if chunk > mlp_chunk:
            name = "MLP unchunked" if chunk == n else f"MLP chunk {chunk}"
            out[name] = Variant((mlp_chunk_of(chunk),))
    return out


def layer_call(graphdef, changes=(), per_call: bool = False):
    """The layer step of the prefill, jitted: (state, x [1,N,d], positions [N]) -> (hidden
    [1,N,d], (k, v) [1,N,Hkv,D], density); ``changes`` applied to the merged layer inside the
    call when ``per_call`` (else the caller applied them to the state already)."""

    def forward(state, x, positions):
        layer = nnx.merge(graphdef, state)
        for change in changes if per_call else ():
            change(layer)
        return layer(x, positions, FULL_ATTENTION)

    return jax.jit(forward)


def variant_call(call, graphdef, state, variant: Variant, *args):
    """(compiled call, its state) of a variant of the layer ``graphdef, state`` whose own call
    is ``call`` (its arguments after the state: ``args``)."""
    if variant.per_call:
        fn, fn_state = layer_call(graphdef, variant.changes, per_call=True), state
    elif variant.changes:
        layer = nnx.merge(graphdef, state)
        for change in variant.changes:
            change(layer)
        variant_graphdef, fn_state = nnx.split(layer)
        fn = layer_call(variant_graphdef)
    else:
        fn, fn_state = call, state
    if variant.compiler_options:
        fn = fn.lower(fn_state, *args).compile(compiler_options=variant.compiler_options)
    return fn, fn_state


# -- kernels named by the HLO they run ---------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def kernel_key(name: str) -> str:
    """An XLA kernel's name as its HLO instruction's: XLA names a fusion's kernel after the
    instruction with '.' and '-' made '_'."""
    return re.sub(r"[.\-]", "_", name)


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """kernel_key(instruction) -> {"shape", "op"} for every instruction of a compiled module's
    text; ``op``: the JAX op it came from (:func:`op_label`), else the instruction's stem."""
    found = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op = _OP_NAME.search(line)
        op = op_label(op.group(1)) if op else stem(m.group(1))
        found[kernel_key(m.group(1))] = {"shape": m.group(2)[:80], "op": op}
    return found


def op_label(op_name: str) -> str:
    """A JAX ``op_name`` without its jit(…) and closed_call levels: "while/body/mul" (under the
    MLP's lax.map) or "mul"."""
    return "/".join(p for p in op_name.split("/") if "jit(" not in p and p != "closed_call")


def stem(name: str) -> str:
    """An instruction or kernel name without its numeric suffix: what XLA named it after."""
    return re.sub(r"[._]\d+$", "", name)


def grouped(kernels, hlo: dict) -> dict:
    """The profile's kernels with group and HLO, the GPU µs per group, and the "other" group's
    µs per JAX op (:func:`op_label`; a kernel with no op_name: its fusion's name)."""
    rows, groups = [], dict.fromkeys(GROUPS, 0.0)
    other_by_op = collections.defaultdict(float)
    for name, launches, us in kernels:
        group = kernel_group(name)
        where = hlo.get(kernel_key(name), {})
        rows.append({"kernel": name, "launches": launches, "us": us, "group": group, **where})
        groups[group] += us
        if group == "other":
            other_by_op[where.get("op", stem(name))] += us
    other = sorted(other_by_op.items(), key=lambda kv: -kv[1])
    return {"kernels": rows, "group_us": groups, "other_by_op": other}


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
    attention_flops = 2.0 * 2 * h * d * n * (n + 1) / 2  # causal: QKᵀ and PV over i ≤ j
    gpu = profile["group_us"]
    row = {
        "n": n,
        "wall_ms": wall_ms,
        "gpu_ms": sum(gpu.values()) / 1e3,
        "group_ms": {g: us / 1e3 for g, us in gpu.items()},
        "gemm_tflops": gemm_flops / gpu["gemm"] / 1e6 if gpu["gemm"] else None,
        "gemm_at_ceiling_ms": gemm_flops / ceiling / 1e9,
        "attention_tflops": attention_flops / gpu["attention"] / 1e6 if gpu["attention"] else None,
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
