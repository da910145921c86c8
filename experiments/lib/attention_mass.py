"""Exact attention mass inside block masks: how much of each query's true attention a method's
blocks keep (coverage), and the attention-output error when only those blocks are computed.

Everything starts from one layer's q/k/v of a full-attention forward (after RoPE), captured by
:class:`~experiments.lib.specs.CaptureAttention`; only sampled query rows are scored, as whole
query blocks (the exact probabilities of all N rows would be ``[Hq, N, N]``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import pbs_jax
from experiments.lib.specs import Method
from pbs_jax import PBSConfig

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CoveragePlan:
    """Static description of one coverage pass (a jit static argument).

    rows: sampled query positions (whole query blocks); methods × thresholds are the
    thresholded configurations, windows the sink + local ones; the attention-output error
    is computed for the methods at ``error_thresholds`` (a subset of ``thresholds``).
    """

    rows: tuple[int, ...]
    methods: tuple[Method, ...]
    thresholds: tuple[float, ...]
    windows: tuple[int, ...]
    error_thresholds: tuple[float, ...] = ()
    block_size: int = PBSConfig.block_size


def sampled_query_rows(seq_len: int, block_size: int, max_blocks: int) -> tuple[int, ...]:
    """Positions of every ``stride``-th query block counted back from the last one, so at most
    ``max_blocks`` blocks: an unbiased sample of queries over the whole sequence."""
    t = pbs_jax.num_blocks(seq_len, block_size)
    stride = max(1, math.ceil(t / max_blocks))
    chosen = sorted(range(t - 1, -1, -stride))
    return tuple(
        p for b in chosen for p in range(b * block_size, min((b + 1) * block_size, seq_len))
    )


def exact_attention_rows(q: jax.Array, k: jax.Array, rows: jax.Array) -> jax.Array:
    """Causal softmax attention probabilities of some query rows.

    q ``[N, Hq, D]``, k ``[N, Hkv, D]``, rows ``[S]`` int → ``[Hq, S, N]`` float32.
    """
    n, hq, d = q.shape
    k_per_q_head = jnp.repeat(k, hq // k.shape[1], axis=1)  # [N, Hq, D]
    logits = jnp.einsum("shd,nhd->hsn", q[rows], k_per_q_head, precision=HIGHEST) / jnp.sqrt(
        jnp.float32(d)
    )
    causal = jnp.arange(n)[None, :] <= rows[:, None]
    return jax.nn.softmax(jnp.where(causal[None], logits, -jnp.inf), axis=-1)


def slot_block_of_position(perm: jax.Array, num_q_heads: int, block_size: int) -> jax.Array:
    """perm ``[Hp, N]`` (slot → position) → ``[Hq, N]`` int: the slot block of each key."""
    slot_of_position = pbs_jax.inverse_permutation(perm)
    return jnp.repeat(slot_of_position // block_size, num_q_heads // perm.shape[0], axis=0)


def slot_block_mass(probs: jax.Array, perm: jax.Array, block_size: int) -> jax.Array:
    """Attention mass per key-slot block: probs ``[Hq, S, N]`` over original key positions,
    perm ``[Hp, N]`` (slot → position) → ``[Hq, S, T]``."""
    hq, _, n = probs.shape
    one_hot = jax.nn.one_hot(
        slot_block_of_position(perm, hq, block_size),
        pbs_jax.num_blocks(n, block_size),
        dtype=jnp.float32,
    )
    return jnp.einsum("hsn,hnt->hst", probs, one_hot, precision=HIGHEST)


def mask_output_error(
    mask: jax.Array,
    probs: jax.Array,
    perm: jax.Array,
    v: jax.Array,
    rows: jax.Array,
    block_size: int,
) -> jax.Array:
    """Relative error of the attention output when only the mask's blocks are computed.

    mask ``[Hq, T, T]``, probs ``[Hq, S, N]`` (exact, sampled rows), perm ``[Hp, N]``,
    v ``[N, Hkv, D]`` → ``[Hq]``: ‖out_sparse − out‖ / ‖out‖ over the sampled rows, where
    out_sparse renormalises the probabilities over the selected keys (what the kernel computes).
    """
    hq = probs.shape[0]
    key_block = slot_block_of_position(perm, hq, block_size)  # [Hq, N]
    selected = jnp.take_along_axis(
        mask[:, rows // block_size, :], key_block[:, None, :], axis=2
    )  # [Hq, S, N]
    kept = jnp.where(selected, probs, 0.0)
    kept = kept / jnp.maximum(kept.sum(axis=-1, keepdims=True), 1e-30)
    v_per_q_head = jnp.repeat(v, hq // v.shape[1], axis=1)  # [N, Hq, D]

    def attend(p):
        return jnp.einsum("hsn,nhd->hsd", p, v_per_q_head, precision=HIGHEST)

    exact = attend(probs)
    return jnp.linalg.norm(attend(kept) - exact, axis=(1, 2)) / jnp.maximum(
        jnp.linalg.norm(exact, axis=(1, 2)), 1e-30
    )


def mask_coverage(mask: jax.Array, mass: jax.Array, rows: jax.Array, block_size: int) -> jax.Array:
    """Mean over sampled queries of the attention mass in their selected blocks.

    mask ``[Hq, T, T]`` bool, mass ``[Hq, S, T]`` from :func:`slot_block_mass` → ``[Hq]``.
    """
    selected = mask[:, rows // block_size, :]  # [Hq, S, T]
    return jnp.sum(jnp.where(selected, mass, 0.0), axis=-1).mean(axis=-1)


@functools.partial(jax.jit, static_argnames=("plan",))
def layer_coverage(q: jax.Array, k: jax.Array, v: jax.Array, plan: CoveragePlan):
    """One layer's coverage, density and output error for every configuration of ``plan``.

    q ``[1, N, Hq, D]``, k, v ``[1, N, Hkv, D]`` (the full forward's, after RoPE) →
    (coverage, density), each float32 ``[M·τ + W, Hq]``: methods × thresholds in order, then
    the sink + local windows; and output error ``[M·τ_err, Hq]``, methods × error thresholds.
    """
    n, hq = q.shape[1], q.shape[2]
    bs = plan.block_size
    rows = jnp.asarray(plan.rows)
    probs = exact_attention_rows(q[0], k[0], rows)
    identity = pbs_jax.identity_permutation(1, k.shape[2], n)
    mass_by_perm = {}
    coverage, density, error = [], [], []
    for method in plan.methods:
        cfg = method.config(1.0)
        perm = pbs_jax.compute_permutation(q, k, cfg)
        if method.permute not in mass_by_perm:
            mass_by_perm[method.permute] = slot_block_mass(probs, perm[0], bs)
        block_probs = pbs_jax.block_probabilities(q, k, perm, cfg)
        for threshold in plan.thresholds:
            mask = pbs_jax.select_from_probabilities(
                block_probs, perm, dataclasses.replace(cfg, threshold=threshold)
            )
            coverage.append(mask_coverage(mask[0], mass_by_perm[method.permute], rows, bs))
            density.append(pbs_jax.density(mask)[0])
            if threshold in plan.error_thresholds:
                error.append(mask_output_error(mask[0], probs, perm[0], v[0], rows, bs))
    identity_mass = slot_block_mass(probs, identity[0], bs)
    for window in plan.windows:
        mask = pbs_jax.sink_local_mask((1, hq, pbs_jax.num_blocks(n, bs)), window)
        coverage.append(mask_coverage(mask[0], identity_mass, rows, bs))
        density.append(pbs_jax.density(mask)[0])
    return jnp.stack(coverage), jnp.stack(density), jnp.stack(error)


def sequence_coverage(captured: dict, plan: CoveragePlan, layers) -> tuple[np.ndarray, ...]:
    """(coverage, density, output error) of one sequence, each ``[layers, configs, Hq]``.

    captured: ``{"q", "k", "v"}`` stacked over layers, ``[L, 1, N, H, D]`` (CaptureAttention's).
    """
    per_layer = [
        [
            np.asarray(x)
            for x in layer_coverage(
                captured["q"][layer], captured["k"][layer], captured["v"][layer], plan
            )
        ]
        for layer in layers
    ]
    return tuple(np.stack(arrays) for arrays in zip(*per_layer))


@functools.partial(jax.jit, static_argnames=("head", "block_size"))
def block_attention_map(
    q: jax.Array, k: jax.Array, perm: jax.Array, head: int, block_size: int
) -> jax.Array:
    """Exact attention mass of one head summed per (query block, key-slot block).

    q ``[N, Hq, D]``, k ``[N, Hkv, D]``, perm ``[N]`` (slot → position) → ``[T, T]`` float32;
    divided by N, so the entries of a mask's blocks sum to its coverage of all queries.
    """
    n = q.shape[0]
    t = pbs_jax.num_blocks(n, block_size)
    rows = jnp.arange(n)
    probs = exact_attention_rows(
        q[:, head : head + 1], k[:, head // (q.shape[1] // k.shape[1])][:, None], rows
    )  # [1, N, N]
    mass = slot_block_mass(probs, perm[None], block_size)[0]  # [N, T]
    padded = jnp.pad(mass, ((0, t * block_size - n), (0, 0)))
    return padded.reshape(t, block_size, t).sum(axis=1) / n
