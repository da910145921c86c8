"""Mean pooling of consecutive blocks of rows: the one statement of the official code's rule,
shared by the planner (``pbs_jax.selection.mean_pool_blocks``), the fused permutation kernel's
incomplete segment and the references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["block_means"]


def block_means(x: jax.Array, block_size: int) -> jax.Array:
    """``[B, N, H, D]`` → ``[B, ceil(N / block_size), H, D]`` float32 means of consecutive
    blocks of rows; the zero padding of a partial last block is counted in its mean (the
    official code's pooling)."""
    b, n, h, d = x.shape
    t = pl.cdiv(n, block_size)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, t * block_size - n), (0, 0), (0, 0)))
    return x.reshape(b, t, block_size, h, d).mean(axis=2)
