"""Exact pure-jnp oracles: dense causal attention and permuted block-sparse attention.

O(N²) memory, fp32 softmax: for tests and the CPU path. They share no attention code with the
kernels (only the row gather to slot order); pallas_kernels has its own, lists-based oracles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pbs_jax.grid import real_tokens
from pbs_jax.permutation import gather_keys


def _masked_attention(q, k, v, allowed):
    """q ``[B, M, Hq, D]``, k/v ``[B, N, Hk, D]``, allowed ``[B|1, Hq|1, M, N]`` bool → out.

    fp32 throughout (inputs upcast); JAX's own XLA attention does the masked softmax (it fuses
    the N² passes better than a hand-written einsum chain on CPU). Rows with no
    allowed key give zeros, as the official reference does for empty rows.
    """
    out = jax.nn.dot_product_attention(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        mask=allowed,
        implementation="xla",
    )
    has_key = jnp.broadcast_to(allowed, (q.shape[0], q.shape[2]) + allowed.shape[2:]).any(-1)
    return jnp.where(has_key.transpose(0, 2, 1)[..., None], out, 0.0).astype(q.dtype)


def _query_positions(m: int, n: int) -> jax.Array:
    """``[M]`` positions of the query rows: the last M of the N keys' positions."""
    return jnp.arange(n - m, n)


def padding_mask(
    allowed: jax.Array, lengths: jax.Array | None, key_pos: jax.Array | None = None
) -> jax.Array:
    """``allowed [B|1, H|1, M, N]`` restricted to a right-padded batch's real tokens: no padded
    key is attended (causality already ensures it for real queries; the oracle states it), and
    padded queries attend nothing, so their output is 0. The M query rows are the last M of
    the N positions. ``key_pos [B, H, N]``: the original position of each key slot (default:
    slot order is original order). ``lengths`` None: ``allowed`` unchanged."""
    if lengths is None:
        return allowed
    m, n = allowed.shape[-2:]
    real_query = real_tokens(lengths, n)[:, n - m :, None][:, None]  # [B, 1, M, 1]
    key_pos = jnp.arange(n)[None, None, :] if key_pos is None else key_pos
    real_key = (key_pos < lengths[:, None, None])[:, :, None, :]
    return allowed & real_query & real_key


def exact_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None
) -> jax.Array:
    """The exact causal-attention oracle (fp32, O(N²)); the fast path is ``dense_attention``.

    q ``[B, M, Hq, D]``, k/v ``[B, N, Hkv, D]`` → ``[B, M, Hq, D]``; M ≤ N: the queries are the
    last M positions (query row i sits at position N - M + i). ``lengths [B]``: a right-padded
    batch, rows past ``lengths[b]`` give 0 (:func:`padding_mask`)."""
    m, n = q.shape[1], k.shape[1]
    causal = _query_positions(m, n)[:, None] >= jnp.arange(n)[None, :]  # [M, N]
    return _masked_attention(q, k, v, padding_mask(causal[None, None], lengths))


def permuted_block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    perm: jax.Array,
    block_mask: jax.Array,
    block_size: int,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Masked dense attention over the permuted keys: the exact meaning of PBS attention.

    Args:
      q: ``[B, M, Hq, D]`` queries in original order: the last M ≤ N positions (N - M a
        multiple of block_size; M = N for a whole prefill).
      k, v: ``[B, N, Hkv, D]`` in original order; permuted here by ``perm``.
      perm: ``[B, Hp, N]`` original position of the key at each slot.
      block_mask: ``[B, Hq, Tq, T]`` bool over (the chunk's query block, key-slot block).
      lengths: ``[B]`` int32 (a right-padded batch) or None: :func:`padding_mask` (keys are
        masked on their original position).
    Returns:
      ``[B, M, Hq, D]`` in q's dtype. Query i (at position p = N - M + i) attends slot j iff
      j's block is selected for i's block and the key's original position ``perm[j] <= p`` (a
      no-op outside the own segment).
    """
    b, m, hq, _ = q.shape
    n = k.shape[1]
    hp = perm.shape[1]
    k_perm = gather_keys(k, perm)
    v_perm = gather_keys(v, perm)
    token_blocks = jnp.repeat(jnp.repeat(block_mask, block_size, axis=-2), block_size, axis=-1)
    token_blocks = token_blocks[..., :m, :n]  # [B, Hq, M, N]
    key_pos = jnp.repeat(perm, hq // hp, axis=1)  # [B, Hq, N]
    causal = key_pos[:, :, None, :] <= _query_positions(m, n)[None, None, :, None]
    allowed = padding_mask(token_blocks & causal, lengths, key_pos)
    return _masked_attention(q, k_perm, v_perm, allowed)
