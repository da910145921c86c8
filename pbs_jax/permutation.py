"""Key importance and the segmented key permutation (paper §3.2–3.3, Eq. 7–8).

Queries are never permuted; keys (and values, by the same indices) are sorted by importance
inside each complete segment. The importance proxy is the softmax of the last ``block_size``
queries against the complete-segment keys, as in the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import (
    proxy_importance,
    proxy_importance_reference,
    proxy_importance_supported,
    slot_order,
)
from pbs_jax.config import PBSConfig
from pbs_jax.grid import permuted_key_counts

# Rows of K/V in slot order ``[B, N, Hkv, D] → [B, N, Hp, D]``: one gather rule for the planner,
# the reference and the kernels' input preparation.
gather_keys = slot_order


def proxy_rows(cfg: PBSConfig, num_queries: int) -> int:
    """P, the proxy's rows: the last ``proxy_blocks × block_size`` of M queries (all M when
    fewer)."""
    return min(cfg.proxy_blocks * cfg.block_size, num_queries)


def proxy_queries(q: jax.Array, cfg: PBSConfig) -> jax.Array:
    """The importance proxy: the last :func:`proxy_rows` rows of ``q [B, M, Hq, D]``,
    ``[B, P, Hq, D]``."""
    return q[:, q.shape[1] - proxy_rows(cfg, q.shape[1]) :]


def ragged_proxy_queries(
    q: jax.Array, cfg: PBSConfig, lengths: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """:func:`proxy_queries` of each row of a right-padded batch, as that row alone: its last
    ``proxy_blocks × block_size`` REAL rows (all of them when it is shorter).

    q ``[B, N, Hq, D]``, lengths ``[B]`` int32 in ``[1, N]`` → (``[B, P, Hq, D]``, real rows
    ``[B]`` int32: a short row's first ``lengths[b]`` proxy rows are its queries, the rest its
    padding). A per-row dynamic slice of P = min(proxy rows, N) rows."""
    n = q.shape[1]
    rows = proxy_rows(cfg, n)
    start = jnp.clip(lengths - rows, 0, n - rows)  # [B]
    proxy = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, rows, axis=0))(q, start)
    return proxy, (lengths - start).astype(jnp.int32)


def key_importance(
    q: jax.Array, k: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """Importance of every complete-segment key for the last ``proxy_blocks × block_size``
    queries (the paper: one block).

    Args:
      q: ``[B, M, Hq, D]`` queries, the last M positions of the keys (M = N: a whole prefill;
        M < N: a chunk continuing a cache, whose proxy is its own last rows; fewer than
        ``proxy_blocks × block_size`` rows: all M of them).
      k: ``[B, N, Hkv, D]`` keys, Hq a multiple of Hkv.
      cfg: static configuration.
      lengths: ``[B]`` int32 real tokens per row of a right-padded batch, or None (all N): each
        row as that row alone — its own proxy (:func:`ragged_proxy_queries`), the softmax over
        its own complete segments (:func:`pbs_jax.grid.permuted_key_counts`), 0 at keys beyond
        them (all 0 for a row of at most ``segment_size`` tokens).

    Returns:
      ``[B, Hp, G*S]`` float32, G = N // segment_size complete segments; Hp = Hq (replicate) or
      Hkv (shared: the group's per-head scores averaged). Softmax over complete-segment keys only,
      no causal mask, fp32, averaged over the proxy rows (official semantics).

    One rule, two evaluations: on GPU the Pallas kernel ``proxy_importance`` (its logits never
    reach HBM); elsewhere, and for shapes the kernel does not take, its pure-jnp statement
    ``proxy_importance_reference`` (interpret mode would be slow inside the op).
    """
    b, _, hq, _ = q.shape
    hkv = k.shape[2]
    complete = (k.shape[1] // cfg.segment_size) * cfg.segment_size
    keys = k[:, :complete]  # [B, L, Hkv, D]
    on_gpu = jax.default_backend() == "gpu"
    rows = proxy_rows(cfg, q.shape[1])
    if lengths is None and on_gpu and proxy_importance_supported(q, keys, rows):
        # The kernel reads the proxy inside q: no copy of the slice (a launch of its own).
        per_head = proxy_importance(q, keys, proxy_rows=rows)
    else:
        if lengths is not None:
            proxy, real_rows = ragged_proxy_queries(q, cfg, lengths)  # [B, P, Hq, D], [B]
            real_keys = permuted_key_counts(lengths, cfg)  # [B]
        else:
            proxy, real_rows, real_keys = proxy_queries(q, cfg), None, None
        if on_gpu and proxy_importance_supported(proxy, keys):
            per_head = proxy_importance(proxy, keys, real_rows, real_keys)  # [B, Hq, L]
        else:
            per_head = proxy_importance_reference(proxy, keys, real_rows, real_keys)
    if cfg.gqa == "shared":
        return per_head.reshape(b, hkv, hq // hkv, complete).mean(axis=2)
    return per_head


def segment_permutation(
    scores: jax.Array, seq_len: int, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """Sort keys by descending importance inside each complete segment.

    Args:
      scores: ``[B, Hp, G*S]`` from :func:`key_importance`.
      seq_len: N, the full key length; slots ``[G*S, N)`` (the remainder) stay in place.
      lengths: ``[B]`` int32 (a right-padded batch) or None: a row sorts only its own complete
        segments (:func:`pbs_jax.grid.permuted_key_counts`); the rest stays in place.

    Returns:
      ``perm [B, Hp, N]`` int32: ``perm[b, h, j]`` is the original position of the key at slot j.
      Each segment's slice is a bijection of its own range.
    """
    b, hp, complete = scores.shape
    s = cfg.segment_size
    g = complete // s
    # Descending and stable as an ascending stable sort of the negated scores (>= 0, so no
    # signed zeros mix): jnp's descending sort reverses its operand and result, two more passes.
    order = jnp.argsort(-scores.reshape(b, hp, g, s), axis=-1, stable=True)
    if lengths is not None:
        sorted_segment = jnp.arange(g)[None, :] < (permuted_key_counts(lengths, cfg) // s)[:, None]
        order = jnp.where(sorted_segment[:, None, :, None], order, jnp.arange(s))
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


def compute_permutation(
    q: jax.Array, k: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """``perm [B, Hp, N]`` for the configuration: sorted segments, or identity without permute
    (or N < segment_size): :func:`key_importance` then :func:`segment_permutation`.

    q ``[B, M, Hq, D]`` (M ≤ N: the last M positions), k ``[B, N, Hkv, D]``. ``lengths [B]``
    (a right-padded batch, M = N only): each row's permutation of its real tokens, as that row
    alone (a row of at most ``segment_size`` tokens keeps the identity), padding in place.
    """
    b, _, hq, _ = q.shape
    n = k.shape[1]
    hp = cfg.num_perm_heads(hq, k.shape[2])
    if not cfg.permute or n < cfg.segment_size:
        return identity_permutation(b, hp, n)
    return segment_permutation(key_importance(q, k, cfg, lengths), n, cfg, lengths)
