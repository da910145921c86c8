"""The Mosaic kernel's K/V ring depth (``stages``) and grid order (``blocks_fastest``) on the op's
own plans: SmolLM2's captured q/k/v at 8K (D=64, 9/3 heads, its two layers as the batch, paper
rule) and synthetic 8K inputs of 32/8 heads of 128 (structured: a sparse plan; random: a dense
one). Each variant runs the op's kernel step (``pbs_jax.kernel_attention``: K/V copy + kernel),
is checked against the default (stages 2, blocks fastest) and timed in interleaved rounds beside
cuDNN. Kept as the record of the ring-depth measurement (not adopted: one run, mixed at D=128;
experiments/NOTES.md); not a maintained study.

  python -m experiments.explore_mosaic_stages --captured qkv.npz  # on a GPU: $OUT/*.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.lib import capture, kernels, timing
from experiments.lib.synthetic import structured_qkv
from pallas_kernels import planned
from pbs_jax import PBSConfig, blocks

CFG = PBSConfig.paper()
ROUNDS = 5
# The module (the package exports its function under the same name).
mgpu_module = importlib.import_module("pallas_kernels.block_sparse_attention_mgpu")
VARIANTS = list(itertools.product((2, 3, 4), (True, False)))  # (stages, blocks_fastest)


def kernel_step(stages: int, blocks_fastest: bool):
    """The op's kernel step with the Mosaic kernel at these settings (traced now: the module
    global is read at trace time)."""
    planned.block_sparse_attention_mgpu = functools.partial(
        mgpu_module.block_sparse_attention_mgpu, stages=stages, blocks_fastest=blocks_fastest
    )
    return jax.jit(
        lambda q, k, v, perm, *lists: pbs_jax.kernel_attention(
            q, k, v, perm, pbs_jax.BlockLists(*lists), CFG
        )
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captured", required=True)
    args = parser.parse_args(argv)
    print(timing.stamp(), flush=True)
    inputs = {
        "captured": capture.load(args.captured)[0],
        "structured": structured_qkv(jax.random.key(8193), 1, 8192, 32, 8, 128, jnp.bfloat16),
        "random": kernels.random_qkv(jax.random.key(8192), 1, 8192, 32, 8, 128),
    }
    plans = {}
    for name, (q, k, _) in inputs.items():
        perm, mask, lists = jax.jit(lambda q, k: pbs_jax.pbs_plan(q, k, CFG))(q, k)
        plans[name] = (perm, *lists)
        print(name, q.shape, k.shape, "density", float(blocks.density(mask).mean()), flush=True)
    rows = []
    steps = {}
    for variant in VARIANTS:
        fn = kernel_step(*variant)
        try:
            outs = {name: fn(*inputs[name], *plans[name]) for name in inputs}
        except Exception as err:  # e.g. the ring does not fit in shared memory
            print(variant, "failed:", str(err).splitlines()[0][:200], flush=True)
            continue
        steps[variant] = (fn, outs)
    base = steps[(2, True)][1]
    for name in inputs:
        contenders = {"cudnn": kernels.cudnn_attention}
        for variant, (fn, _) in steps.items():
            plan = plans[name]
            contenders[str(variant)] = functools.partial(
                lambda fn, plan, q, k, v: fn(q, k, v, *plan), fn, plan
            )
        ms = timing.time_interleaved(contenders, *inputs[name], rounds=ROUNDS)
        for variant, (_, outs) in steps.items():
            ref = base[name].astype(jnp.float32)
            err = float(jnp.abs(outs[name].astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
            rows.append(
                dict(
                    input=name,
                    stages=variant[0],
                    blocks_fastest=variant[1],
                    ms=ms[str(variant)],
                    cudnn_ms=ms["cudnn"],
                    rel_err_vs_default=err,
                )
            )
            print(
                f"{name:10s} stages {variant[0]} blocks_fastest {variant[1]!s:5s} "
                f"{ms[str(variant)]:.3f} ms (cuDNN {ms['cudnn']:.3f}, "
                f"×{ms['cudnn'] / ms[str(variant)]:.2f}) err {err:.1e}",
                flush=True,
            )
    timing.write_json(
        timing.out_dir() / "explore_mosaic_stages.json", dict(timing.stamp(), rows=rows)
    )


if __name__ == "__main__":
    main()
