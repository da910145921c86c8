"""Block selection: which (query block, key block) pairs are computed (paper App. D.1, Alg. 2).

The MeanPooling selector: mean-pool each block of queries (unpermuted) and of permuted keys,
softmax the pooled scores over the *allowed* key blocks, keep the smallest top-p set whose mass
reaches the threshold, then force the sink block and every block of the query's own segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pbs_jax.config import PBSConfig


def num_blocks(seq_len: int, block_size: int) -> int:
  return -(-seq_len // block_size)


def mean_pool_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``[B, N, H, D]`` → ``[B, T, H, D]`` float32 block means; zero padding of a partial last
  block is counted in its mean (official semantics)."""
  b, n, h, d = x.shape
  t = num_blocks(n, block_size)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, t * block_size - n), (0, 0), (0, 0)))
  return x.reshape(b, t, block_size, h, d).mean(axis=2)


def pooled_block_logits(q: jax.Array, k_perm: jax.Array, block_size: int) -> jax.Array:
  """Scaled dot products of pooled query blocks and pooled (permuted) key blocks.

  Args:
    q: ``[B, N, Hq, D]``; k_perm: ``[B, N, Hp, D]`` keys in slot order, Hq a multiple of Hp.
  Returns:
    ``[B, Hq, T, T]`` float32.
  """
  b, _, hq, d = q.shape
  hp = k_perm.shape[2]
  pq = mean_pool_blocks(q, block_size)
  pk = mean_pool_blocks(k_perm, block_size)
  t = pq.shape[1]
  pq = pq.reshape(b, t, hp, hq // hp, d)
  logits = jnp.einsum("bqpgd,bkpd->bpgqk", pq, pk, precision=jax.lax.Precision.HIGHEST)
  return logits.reshape(b, hq, t, t) / jnp.sqrt(jnp.float32(d))


def softmax_domain(t: int, cfg: PBSConfig) -> jax.Array:
  """``[T, T]`` bool: the key blocks that compete in the block softmax of each query block.

  With permutation: blocks of strictly earlier segments (own-segment blocks are computed anyway,
  so they are left out of the competition). Without (MeanPooling baseline): every causal block,
  the diagonal included, as the official baseline does.
  """
  qb = jnp.arange(t)[:, None]
  kb = jnp.arange(t)[None, :]
  if cfg.permute:
    per_segment = cfg.segment_size // cfg.block_size
    return kb // per_segment < qb // per_segment
  return kb <= qb


def own_segment_blocks(t: int, cfg: PBSConfig) -> jax.Array:
  """``[T, T]`` bool: blocks always computed and masked token by token on original positions.

  Every block of the query block's own segment (``cfg.mask_segment_size``), including blocks
  above the block diagonal: permuted keys cross block boundaries inside a segment.
  """
  per_segment = cfg.mask_segment_size // cfg.block_size
  qb = jnp.arange(t)[:, None]
  kb = jnp.arange(t)[None, :]
  return kb // per_segment == qb // per_segment


def top_p_blocks(probs: jax.Array, allowed: jax.Array, threshold: float) -> jax.Array:
  """Smallest set of highest-probability blocks whose cumulative mass reaches ``threshold``.

  Args:
    probs: ``[..., T]`` float32 row-softmax over the allowed blocks (0 elsewhere).
    allowed: ``[..., T]`` bool (broadcastable).
  Returns:
    ``[..., T]`` bool. Sorted position p is kept iff the mass before it is < threshold
    (cumulative ≥ threshold inclusive, as the official code). A row whose mass never reaches
    the threshold keeps all its allowed blocks (the paper's Alg. 2: k = min({…} ∪ {i})).
    ``threshold >= 1`` keeps every allowed block outright, so fp rounding of the row sum cannot
    drop one (the official code's integer-1 path).
  """
  if threshold >= 1.0:
    return jnp.broadcast_to(allowed, probs.shape)
  order = jnp.argsort(-probs, axis=-1, stable=True)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1)
  mass_before = jnp.concatenate(
      [jnp.zeros_like(mass_before[..., :1]), mass_before[..., :-1]], axis=-1)
  keep_sorted = mass_before < threshold
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return keep & allowed


def sink_blocks(perm: jax.Array, num_q_heads: int, block_size: int) -> jax.Array:
  """``[B, Hq, 1, T]`` bool: the key block whose slots hold original token 0, per query head."""
  b, hp, n = perm.shape
  t = num_blocks(n, block_size)
  slot_of_token0 = jnp.argmax(perm == 0, axis=-1)  # [B, Hp]
  sink = jax.nn.one_hot(slot_of_token0 // block_size, t, dtype=jnp.bool_)  # [B, Hp, T]
  return jnp.repeat(sink, num_q_heads // hp, axis=1)[:, :, None, :]


def select_blocks(q: jax.Array, k_perm: jax.Array, perm: jax.Array, cfg: PBSConfig) -> jax.Array:
  """The PBS block mask.

  Args:
    q: ``[B, N, Hq, D]`` queries (original order).
    k_perm: ``[B, N, Hp, D]`` keys in slot order (``permutation.gather_keys``).
    perm: ``[B, Hp, N]`` original position of each slot.
  Returns:
    ``block_mask [B, Hq, T, T]`` bool, T = ceil(N / block_size).
  """
  hq = q.shape[2]
  t = num_blocks(q.shape[1], cfg.block_size)
  logits = pooled_block_logits(q, k_perm, cfg.block_size)
  allowed = softmax_domain(t, cfg)
  probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  # Rows with nothing allowed (the first segment's query blocks) are all -inf: NaN → select none.
  probs = jnp.where(allowed.any(axis=-1, keepdims=True), probs, 0.0)
  mask = top_p_blocks(probs, allowed, float(cfg.threshold))
  if cfg.force_sink:
    mask = mask | sink_blocks(perm, hq, cfg.block_size)
  return mask | own_segment_blocks(t, cfg)
