"""Kernel and whole-op benchmark of PBS attention against cuDNN, side by side on one card.

Run on a GPU (one call does everything: correctness first, then timing, then the report):
  python -m experiments.bench_kernel            # writes $OUT/bench_kernel.json (+ .md, .png)
  python -m experiments.bench_kernel --report experiments/results/bench_kernel.json
                                                # re-renders the markdown table and the plots

Shapes (issue 3): B=1, Hq=32, Hkv=8, D=128, bf16, N in 4K..128K. Rows per N:
  * cuDNN: jax.nn.dot_product_attention(implementation="cudnn", is_causal=True);
  * our kernel at 100% density (every causal block listed) and at fixed densities 10/20/40%
    (random earlier-segment blocks plus the always-computed own-segment blocks);
  * the whole op, pbs_attention(impl="pallas"), on inputs with planted local + heavy-hitter
    structure (experiments/synthetic.py), its time split by stage.
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
from experiments import benchutil
from experiments.synthetic import structured_qkv
from pbs_jax import PBSConfig, blocks, permutation, selection

LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DENSITIES = (0.1, 0.2, 0.4)


def causal_tflops(b, h, n, d, ms):
  return 4.0 * b * h * n * n * d / 2 / (ms * 1e-3) / 1e12


def computed_tflops(b, h, d, block_size, computed_blocks, ms):
  """Rate over the work actually done: every listed block as a full block_size² tile."""
  return 4.0 * d * block_size * block_size * computed_blocks / (ms * 1e-3) / 1e12 if ms else 0.0


def kernel_fn(cfg, tiles=None):
  from pallas_kernels import block_sparse_attention

  @jax.jit
  def run(q, k, v, perm, ids, full, total):
    return block_sparse_attention(q, k, v, perm, ids, full, total, block_size=cfg.block_size,
                                  gather_kv=True, tiles=tiles)
  return run


@jax.jit
def cudnn(q, k, v):
  # XLA off the GPU only so that the script's logic can be checked on a CPU.
  impl = "cudnn" if jax.default_backend() == "gpu" else None
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def check_correctness(cfg, n=4096, h=8, hk=2, d=128):
  """Kernel (dense lists and real PBS lists) against the exact reference, fresh random input."""
  q, k, v = structured_qkv(jax.random.key(123), 1, n, h, hk, d, jnp.bfloat16)
  perm, mask = jax.jit(pbs_jax.pbs_plan, static_argnums=2)(q, k, cfg)
  lists = blocks.index_lists(mask, cfg)
  out = kernel_fn(cfg)(q, k, v, perm, *lists)
  ref = pbs_jax.permuted_block_sparse_attention(q, k, v, perm, mask, cfg.block_size)
  err_pbs = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) /
                  jnp.linalg.norm(ref.astype(jnp.float32)))
  full = blocks.fixed_density_mask(jax.random.key(0), (1, h, mask.shape[-1]), 1.0, cfg)
  ident = permutation.identity_permutation(1, h, n)
  out = kernel_fn(cfg)(q, k, v, ident, *blocks.index_lists(full, cfg))
  ref = cudnn(q, k, v)
  err_dense = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) /
                    jnp.linalg.norm(ref.astype(jnp.float32)))
  ok = err_pbs < 1e-2 and err_dense < 1e-2 and bool(jnp.isfinite(out).all())
  return {"n": n, "rel_err_vs_reference_pbs_lists": err_pbs,
          "rel_err_vs_cudnn_dense_lists": err_dense, "ok": ok,
          "density_of_checked_plan": float(blocks.density(mask).mean())}


def bench_length(n, args, cfg):
  b, h, hk, d = 1, args.heads, args.kv_heads, args.dim
  kq, kk, kv = jax.random.split(jax.random.key(n), 3)
  q = jax.random.normal(kq, (b, n, h, d), jnp.bfloat16)
  k = jax.random.normal(kk, (b, n, hk, d), jnp.bfloat16)
  v = jax.random.normal(kv, (b, n, hk, d), jnp.bfloat16)
  t = selection.num_blocks(n, cfg.block_size)
  row = {"n": n}
  row["cudnn_ms"] = benchutil.time_call(cudnn, q, k, v)
  row["cudnn_tflops"] = causal_tflops(b, h, n, d, row["cudnn_ms"])
  run = kernel_fn(cfg)
  ident = permutation.identity_permutation(b, h, n)
  for target in (1.0,) + DENSITIES:
    mask = blocks.fixed_density_mask(jax.random.key(7), (b, h, t), target, cfg)
    lists = blocks.index_lists(mask, cfg)
    ms = benchutil.time_call(run, q, k, v, ident, *lists)
    computed = int(mask.sum())
    key = f"kernel_d{int(round(target * 100))}"
    row[key] = {"ms": ms, "density": float(blocks.density(mask).mean()),
                "computed_tflops": computed_tflops(b, h, d, cfg.block_size, computed, ms),
                "speedup_vs_cudnn": row["cudnn_ms"] / ms}
  auto = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="auto"))
  # impl="auto" on unstructured input: plans come out dense, so it should fall back to cuDNN.
  row["auto_random_ms"] = benchutil.time_call(auto, q, k, v)
  del q, k, v

  # The whole op on structured input, stage by stage, in the default (replicate) GQA mode;
  # then the total of the shared mode (one permutation per KV head, contiguous K/V).
  q, k, v = structured_qkv(jax.random.key(n + 1), b, n, h, hk, d, jnp.bfloat16)
  shared = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=dataclasses.replace(
      cfg, gqa="shared"), impl="pallas", return_aux=True))
  out_s, aux_s = shared(q, k, v)
  row["whole_op_shared"] = {
      "ms": benchutil.time_call(lambda q, k, v: shared(q, k, v)[0], q, k, v),
      "density": float(aux_s.density), "finite": bool(jnp.isfinite(out_s).all())}
  row["whole_op_shared"]["speedup_vs_cudnn"] = row["cudnn_ms"] / row["whole_op_shared"]["ms"]
  perm_fn = jax.jit(functools.partial(permutation.compute_permutation, cfg=cfg))
  select_fn = jax.jit(lambda q, k, perm: selection.select_blocks(q, k, perm, cfg))
  lists_fn = jax.jit(functools.partial(blocks.index_lists, cfg=cfg))
  whole = jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=cfg, impl="pallas",
                                    return_aux=True))
  perm = perm_fn(q, k)
  mask = select_fn(q, k, perm)
  lists = lists_fn(mask)
  out, aux = whole(q, k, v)
  finite = bool(jnp.isfinite(out).all())
  stages = {
      "permutation_ms": benchutil.time_call(perm_fn, q, k),
      "selection_ms": benchutil.time_call(select_fn, q, k, perm),
      "index_lists_ms": benchutil.time_call(lists_fn, mask),
      "kernel_ms": benchutil.time_call(run, q, k, v, perm, *lists),
  }
  total = benchutil.time_call(lambda q, k, v: whole(q, k, v)[0], q, k, v)
  row["auto_structured_ms"] = benchutil.time_call(auto, q, k, v)
  dens = float(aux.density)
  row["whole_op"] = {
      "ms": total, "density": dens, "finite": finite, **stages,
      "overhead_fraction": (stages["permutation_ms"] + stages["selection_ms"] +
                            stages["index_lists_ms"]) / total,
      "speedup_vs_cudnn": row["cudnn_ms"] / total,
      "kernel_computed_tflops": computed_tflops(b, h, d, cfg.block_size, int(mask.sum()),
                                                stages["kernel_ms"]),
  }
  return row


def report(payload, out: pathlib.Path):
  """Markdown table and PNG plots from the JSON (on any machine)."""
  rows = payload["rows"]
  st = payload["stamp"]
  lines = [f"# PBS kernel vs cuDNN — {st['device']}, JAX {st['jax']}, {st['date']}", "",
           f"B=1, Hq={payload['shape']['heads']}, Hkv={payload['shape']['kv_heads']}, "
           f"D={payload['shape']['dim']}, bf16, block {payload['cfg']['block_size']}, segment "
           f"{payload['cfg']['segment_size']}. Times are medians in ms; ratios are cuDNN time / "
           "our time in the same run. Kernel TFLOP/s count the work of the listed blocks "
           f"(every listed block as a full tile). Tiles: {payload.get('tiles')}.", "",
           f"Correctness first: {json.dumps(payload['check'])}", "",
           "| N | cuDNN ms (TFLOP/s) | kernel 100% ms (TFLOP/s, ×cuDNN) | 40% | 20% | 10% | "
           "whole op ms (density, ×cuDNN) | perm / select / lists / kernel ms | overhead | "
           "whole op, shared GQA (density, ×cuDNN) | impl=auto ×cuDNN: structured / random |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    k100 = r["kernel_d100"]
    w = r["whole_op"]
    cell = lambda x: f"{x['ms']:.2f} ({x['computed_tflops']:.0f}, {x['speedup_vs_cudnn']:.2f}×)"
    lines.append(
        f"| {r['n']} | {r['cudnn_ms']:.2f} ({r['cudnn_tflops']:.0f}) | {cell(k100)} | "
        f"{cell(r['kernel_d40'])} | {cell(r['kernel_d20'])} | {cell(r['kernel_d10'])} | "
        f"{w['ms']:.2f} ({w['density']:.2f}, {w['speedup_vs_cudnn']:.2f}×) | "
        f"{w['permutation_ms']:.2f} / {w['selection_ms']:.2f} / {w['index_lists_ms']:.2f} / "
        f"{w['kernel_ms']:.2f} | {100 * w['overhead_fraction']:.1f}% | "
        f"{r['whole_op_shared']['ms']:.2f} ({r['whole_op_shared']['density']:.2f}, "
        f"{r['whole_op_shared']['speedup_vs_cudnn']:.2f}×) | "
        f"{r['cudnn_ms'] / r['auto_structured_ms']:.2f}× / {r['cudnn_ms'] / r['auto_random_ms']:.2f}× |")
  (out / "bench_kernel.md").write_text("\n".join(lines) + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  ns = [r["n"] for r in rows]
  for key, label in [("kernel_d100", "kernel, 100%"), ("kernel_d40", "kernel, 40%"),
                     ("kernel_d20", "kernel, 20%"), ("kernel_d10", "kernel, 10%")]:
    ax1.plot(ns, [r[key]["speedup_vs_cudnn"] for r in rows], "o-", label=label)
  ax1.plot(ns, [r["whole_op"]["speedup_vs_cudnn"] for r in rows], "k*-", ms=10,
           label="whole op, replicate GQA (structured input)")
  ax1.plot(ns, [r["whole_op_shared"]["speedup_vs_cudnn"] for r in rows], "m*--", ms=8,
           label="whole op, shared GQA")
  ax1.axhline(1.0, color="gray", ls="--", lw=1)
  ax1.set_xscale("log", base=2)
  ax1.set_xlabel("sequence length N")
  ax1.set_ylabel("speedup vs cuDNN (×)")
  ax1.set_title("Speedup vs N")
  ax1.legend(fontsize=8)
  for r in rows:
    pts = [(r[k]["density"], r[k]["speedup_vs_cudnn"]) for k in
           ("kernel_d10", "kernel_d20", "kernel_d40", "kernel_d100")]
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
  fig.savefig(out / "bench_kernel.png", dpi=120)


def bench(args, out: pathlib.Path) -> dict:
  cfg = PBSConfig()
  from pallas_kernels import get_tiles
  payload = {"stamp": benchutil.stamp(),
             "tiles": {f"gather_kv={g}": dataclasses.asdict(get_tiles(args.dim, jnp.bfloat16,
                                                                      cfg.block_size, g))
                       for g in (True, False)},
             "cfg": {"block_size": cfg.block_size, "segment_size": cfg.segment_size,
                     "threshold": cfg.threshold},
             "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim},
             "check": check_correctness(cfg), "rows": []}
  print("correctness:", payload["check"], flush=True)
  if not payload["check"]["ok"]:
    benchutil.write_json(out / "bench_kernel.json", payload)
    sys.exit("kernel disagrees with the reference: not timing it")
  for n in args.lengths:
    payload["rows"].append(bench_length(n, args, cfg))
    benchutil.write_json(out / "bench_kernel.json", payload)  # keep what finished
    r = payload["rows"][-1]
    print(f"N={n}: cudnn {r['cudnn_ms']:.2f} ms, kernel100 {r['kernel_d100']['ms']:.2f}, "
          f"k20 {r['kernel_d20']['ms']:.2f}, whole {r['whole_op']['ms']:.2f} "
          f"(density {r['whole_op']['density']:.2f})", flush=True)
  return payload


def add_arguments(parser):
  parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS),
                      help="sequence lengths to time (default: 4K..128K)")
  parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
  parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
  parser.add_argument("--dim", type=int, default=128, help="head dim (default 128)")


def main(argv=None):
  benchutil.benchmark_cli(argv, __doc__, "bench_kernel", add_arguments, bench, report)


if __name__ == "__main__":
  main()
