"""Exact pure-jnp oracles: dense causal attention and permuted block-sparse attention.

O(N²) memory, fp32 softmax, ``Precision.HIGHEST`` matmuls: for tests and the CPU path. They
share no code with the kernel (pallas_kernels has its own, lists-based oracle).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pbs_jax.permutation import gather_keys

_HI = jax.lax.Precision.HIGHEST


def _masked_attention(q, k, v, allowed):
  """q ``[B, N, Hq, D]``, k/v ``[B, N, Hk, D]``, allowed ``[B|1, Hq|1, N, N]`` bool → out.

  Rows with no allowed key give zeros (as the official reference does for empty rows).
  """
  b, n, hq, d = q.shape
  hk = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, n, hk, hq // hk, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32), precision=_HI)
  logits = logits.reshape(b, hq, n, n) / jnp.sqrt(jnp.float32(d))
  allowed = jnp.broadcast_to(allowed, logits.shape)
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  weights = weights.reshape(b, hk, hq // hk, n, n)
  out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v.astype(jnp.float32), precision=_HI)
  return out.reshape(b, n, hq, d).astype(q.dtype)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain causal attention. q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]`` → ``[B, N, Hq, D]``."""
  n = q.shape[1]
  causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  return _masked_attention(q, k, v, causal[None, None])


def permuted_block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, perm: jax.Array,
                                    block_mask: jax.Array, block_size: int) -> jax.Array:
  """Masked dense attention over the permuted keys: the exact meaning of PBS attention.

  Args:
    q: ``[B, N, Hq, D]`` queries in original order.
    k, v: ``[B, N, Hkv, D]`` in original order; permuted here by ``perm``.
    perm: ``[B, Hp, N]`` original position of the key at each slot.
    block_mask: ``[B, Hq, T, T]`` bool over (query block, key-slot block).
  Returns:
    ``[B, N, Hq, D]`` in q's dtype. Query i attends slot j iff j's block is selected for i's
    block and the key's original position ``perm[j] <= i`` (a no-op outside the own segment).
  """
  b, n, hq, _ = q.shape
  hp = perm.shape[1]
  k_perm = gather_keys(k, perm)
  v_perm = gather_keys(v, perm)
  slot_block = jnp.arange(n) // block_size
  token_blocks = block_mask[:, :, slot_block[:, None], slot_block[None, :]]  # [B, Hq, N, N]
  key_pos = jnp.repeat(perm, hq // hp, axis=1)  # [B, Hq, N]
  causal = key_pos[:, :, None, :] <= jnp.arange(n)[None, None, :, None]
  return _masked_attention(q, k_perm, v_perm, token_blocks & causal)
