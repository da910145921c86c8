"""Key importance and the segmented key permutation (paper §3.2–3.3, Eq. 7–8).

Queries are never permuted; keys (and values, by the same indices) are sorted by importance
inside each complete segment. The importance proxy is the softmax of the last ``block_size``
queries against the complete-segment keys, as in the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import slot_order
from pbs_jax.config import PBSConfig

# Rows of K/V in slot order ``[B, N, Hkv, D] → [B, N, Hp, D]``: one gather rule for the planner,
# the reference and the kernels' input preparation.
gather_keys = slot_order


def key_importance(q: jax.Array, k: jax.Array, cfg: PBSConfig) -> jax.Array:
    """Importance of every complete-segment key for the last ``proxy_blocks × block_size``
    queries (the paper: one block).

    Args:
      q: ``[B, M, Hq, D]`` queries, the last M positions of the keys (M = N: a whole prefill;
        M < N: a chunk continuing a cache, whose proxy is its own last rows; fewer than
        ``proxy_blocks × block_size`` rows: all M of them).
      k: ``[B, N, Hkv, D]`` keys, Hq a multiple of Hkv.
      cfg: static configuration.

    Returns:
      ``[B, Hp, G*S]`` float32, G = N // segment_size complete segments; Hp = Hq (replicate) or
      Hkv (shared: the group's per-head scores averaged). Softmax over complete-segment keys only,
      no causal mask, fp32, averaged over the proxy rows (official semantics).
    """
    b, m, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    complete = (k.shape[1] // cfg.segment_size) * cfg.segment_size
    proxy = q[:, max(m - cfg.proxy_blocks * cfg.block_size, 0) :]  # [B, P, Hq, D]
    proxy = proxy.reshape(b, proxy.shape[1], hkv, group, d)
    keys = k[:, :complete]  # [B, L, Hkv, D]
    logits = jnp.einsum(
        "bpkgd,blkd->bkgpl", proxy, keys, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(d))
    probs = jax.nn.softmax(logits, axis=-1).mean(axis=-2)  # [B, Hkv, G, L]
    if cfg.gqa == "shared":
        return probs.mean(axis=2)
    return probs.reshape(b, hq, complete)


def segment_permutation(scores: jax.Array, seq_len: int, cfg: PBSConfig) -> jax.Array:
    """Sort keys by descending importance inside each complete segment.

    Args:
      scores: ``[B, Hp, G*S]`` from :func:`key_importance`.
      seq_len: N, the full key length; slots ``[G*S, N)`` (the remainder) stay in place.

    Returns:
      ``perm [B, Hp, N]`` int32: ``perm[b, h, j]`` is the original position of the key at slot j.
      Each segment's slice is a bijection of its own range.
    """
    b, hp, complete = scores.shape
    s = cfg.segment_size
    g = complete // s
    order = jnp.argsort(scores.reshape(b, hp, g, s), axis=-1, descending=True, stable=True)
    sorted_complete = (order + (jnp.arange(g) * s)[:, None]).reshape(b, hp, complete)
    remainder = jnp.broadcast_to(jnp.arange(complete, seq_len), (b, hp, seq_len - complete))
    return jnp.concatenate([sorted_complete, remainder], axis=-1).astype(jnp.int32)


def identity_permutation(batch: int, heads: int, seq_len: int) -> jax.Array:
    """``[B, H, N]`` int32 identity (the MeanPooling baseline and the dense fallback)."""
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, heads, seq_len))


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """``[..., N]`` slot → position into position → slot: ``inv[..., perm[..., j]] = j``.

    A scatter of N ints per row (linear; an argsort would be N log N).
    """
    n = perm.shape[-1]
    rows = perm.reshape(-1, n)
    inv = (
        jnp.zeros_like(rows)
        .at[jnp.arange(rows.shape[0])[:, None], rows]
        .set(jnp.arange(n, dtype=perm.dtype))
    )
    return inv.reshape(perm.shape)


def compute_permutation(q: jax.Array, k: jax.Array, cfg: PBSConfig) -> jax.Array:
    """``perm [B, Hp, N]`` for the configuration: sorted segments, or identity without permute.

    q ``[B, M, Hq, D]`` (M ≤ N: the last M positions), k ``[B, N, Hkv, D]``."""
    b, _, hq, _ = q.shape
    n = k.shape[1]
    hp = cfg.num_perm_heads(hq, k.shape[2])
    if not cfg.permute or n < cfg.segment_size:
        return identity_permutation(b, hp, n)
    return segment_permutation(key_importance(q, k, cfg), n, cfg)
