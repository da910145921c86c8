"""Shared test helpers: fresh random inputs (never zeros) with and without attention structure,
and the repository's one ``rel_err``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib.metrics import rel_err  # the one relative error, re-exported for the tests


def make_qkv(
    seed: int, b: int, n: int, hq: int, hk: int, d: int, dtype=jnp.float32, structured: bool = True
):
    """Random ``q [B, N, Hq, D]``, ``k, v [B, N, Hk, D]``.

    ``structured`` plants a few heavy-hitter keys (aligned with a direction every query leans
    towards) at random positions, so attention is sparse the way real heads are and the
    permutation has something to sort.
    """
    kq, kk, kv, kh, ku = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (b, n, hq, d), jnp.float32)
    k = jax.random.normal(kk, (b, n, hk, d), jnp.float32)
    v = jax.random.normal(kv, (b, n, hk, d), jnp.float32)
    if structured:
        u = jax.random.normal(ku, (d,)) / np.sqrt(d)
        heavy = jax.random.uniform(kh, (b, n, hk, 1)) < 0.04
        k = k + jnp.where(heavy, 4.0 * np.sqrt(d) * u, 0.0)
        q = q + 1.5 * u * np.sqrt(d) / 2
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


__all__ = ["make_qkv", "rel_err"]
