"""What ``impl="auto"``'s on-device choices cost at 4K and 8K, and whether XLA's command buffers
(CUDA graphs with conditional nodes) take the host round trip out of a ``lax.cond``.

Per input family (structured, weak, random; SmolLM2's captured q/k/v at 8K with ``--captured``),
in interleaved rounds on one GPU: cuDNN, the sparse op (plan + kernel), ``auto`` (one choice after
the estimate), ``auto`` with the former second choice after the plan, and the two paths with no
choice at all (estimate + cuDNN, estimate + plan + kernel: what each outcome costs without its
host round trip). Each XLA_FLAGS variant runs in its own process (flags are read at start-up).
Kept as the record behind the one-choice ``auto``; not a maintained study.

  python -m experiments.explore_auto_conditionals [--captured qkv.npz]  # on a GPU: $OUT/*.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.bench_kernel import WEAK_STRUCTURE
from experiments.lib import capture, kernels, timing
from experiments.lib.kernel_trace import kernel_profile
from experiments.lib.synthetic import structured_qkv
from pbs_jax import PBSConfig, attention, blocks, cost_model
from pbs_jax.selection import mean_pool_blocks

CFG = PBSConfig.paper()
LENGTHS = (4096, 8192)
ROUNDS = 5
# name → XLA_FLAGS of the child process that times every contender under them.
VARIANTS = {
    "default": "",
    "conditional_command_buffers": (
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL"
        " --xla_gpu_graph_min_graph_size=1"
    ),
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
}


def _estimate(q, k):
    pooled_q = mean_pool_blocks(q, CFG.block_size)
    table, _, _ = attention._auto_costs(q, CFG)
    est = cost_model.estimate_density(q, k, CFG, None, pooled_q)
    floor = cost_model.floor_density(k.shape[1], CFG)
    return pooled_q, cost_model.predicted_density(table, est, floor)


def _choose(q, k, density, stage):
    table, shape, mosaic = attention._auto_costs(q, CFG)
    return cost_model.choose(table, k.shape[1], density, stage=stage, shape=shape, mosaic=mosaic)


def _planned_kernel(q, k, v, pooled_q):
    perm, _, lists = pbs_jax.pbs_plan(q, k, CFG, None, pooled_q)
    return pbs_jax.kernel_attention(q, k, v, perm, lists, CFG)


def two_choices(q, k, v):
    """auto as it was: estimate, choice, plan, second choice, kernel or cuDNN."""
    pooled_q, predicted = _estimate(q, k)

    def planned(q, k, v, pooled_q):
        perm, mask, lists = pbs_jax.pbs_plan(q, k, CFG, None, pooled_q)
        sparse = _choose(q, k, jnp.mean(blocks.density(mask)), cost_model.AFTER_PLAN)
        return jax.lax.cond(
            sparse,
            lambda q, k, v: pbs_jax.kernel_attention(q, k, v, perm, lists, CFG),
            attention.dense_attention,
            q,
            k,
            v,
        )

    sparse = _choose(q, k, predicted, cost_model.AFTER_ESTIMATE)
    return jax.lax.cond(
        sparse, planned, lambda q, k, v, _: attention.dense_attention(q, k, v), q, k, v, pooled_q
    )


def one_choice(q, k, v):
    """auto's one choice: the library's on-device path, called directly so that it runs at every
    length (``impl="auto"`` skips the estimate where the densest op is within noise of cuDNN)."""
    return attention._auto_on_gpu(q, k, v, CFG)[0]


def estimate_then_cudnn(q, k, v):
    _, predicted = _estimate(q, k)
    return attention.dense_attention(q, k, v), predicted


def estimate_then_kernel(q, k, v):
    pooled_q, predicted = _estimate(q, k)
    return _planned_kernel(q, k, v, pooled_q), predicted


CONTENDERS = {
    "cudnn": kernels.cudnn_attention,
    "sparse": jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=CFG, impl="pallas")),
    "auto": jax.jit(functools.partial(pbs_jax.pbs_attention, cfg=CFG, impl="auto")),
    "one_choice": jax.jit(one_choice),
    "two_choices": jax.jit(two_choices),
    "estimate+cudnn": jax.jit(estimate_then_cudnn),
    "estimate+plan+kernel": jax.jit(estimate_then_kernel),
}


def families(n: int, captured):
    yield "structured", structured_qkv(jax.random.key(n + 1), 1, n, 32, 8, 128, jnp.bfloat16)
    yield (
        "weak",
        structured_qkv(
            jax.random.key(n + 2), 1, n, 32, 8, 128, jnp.bfloat16, structure=WEAK_STRUCTURE
        ),
    )
    yield "random", kernels.random_qkv(jax.random.key(n), 1, n, 32, 8, 128)
    if captured is not None and captured[0].shape[1] == n:
        yield "captured", captured


def child(variant: str, captured_path: str | None) -> None:
    captured = capture.load(captured_path)[0] if captured_path else None
    rows = []
    for n in LENGTHS:
        for fam, (q, k, v) in families(n, captured):
            ref = CONTENDERS["cudnn"](q, k, v)
            out = CONTENDERS["one_choice"](q, k, v)
            rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
            _, predicted = jax.jit(_estimate)(q, k)
            ms = timing.time_interleaved(CONTENDERS, q, k, v, rounds=ROUNDS)
            gpu_us = {}
            if variant == "default" and n == LENGTHS[0]:  # GPU time: what the wall adds to it
                for name in ("cudnn", "sparse", "one_choice", "two_choices"):
                    gpu_us[name] = sum(r[2] for r in kernel_profile(CONTENDERS[name], q, k, v))
            row = dict(
                variant=variant,
                n=n,
                family=fam,
                predicted_density=float(predicted),
                one_choice_rel_err_vs_cudnn=rel,
                ms={name: round(t, 4) for name, t in ms.items()},
                gpu_us={name: round(t, 1) for name, t in gpu_us.items()},
            )
            rows.append(row)
            best = min(ms["cudnn"], ms["sparse"])
            ratios = " ".join(
                f"{name} {best / ms[name]:.3f}"
                for name in ("auto", "one_choice", "two_choices", "estimate+cudnn")
            )
            print(variant, n, fam, f"pred {float(predicted):.2f}", ms, "| best/x:", ratios)
            print("   gpu_us", row["gpu_us"], flush=True)
    out = timing.out_dir()
    timing.write_json(
        out / f"explore_auto_conditionals_{variant}.json", dict(timing.stamp(), rows=rows)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captured", default=None)
    parser.add_argument("--variant", default=None, help="(internal) time under this variant")
    args = parser.parse_args(argv)
    if args.variant:
        child(args.variant, args.captured)
        return
    print(json.dumps(timing.stamp()), flush=True)
    for variant, flags in VARIANTS.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, "-m", "experiments.explore_auto_conditionals", "--variant", variant]
        if args.captured:
            cmd += ["--captured", args.captured]
        rc = subprocess.run(cmd, env=env, timeout=300).returncode
        print(variant, "rc", rc, flush=True)


if __name__ == "__main__":
    main()
