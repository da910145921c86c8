"""The block selection's row rules: the softmax over a row's allowed blocks and the top-p cut.

One statement of each, written in plain jnp on any ``[..., T]`` rows so that the same function
runs in the jnp planner (``pbs_jax.selection``), in the pure-jnp reference and inside the Pallas
kernel body (:mod:`pallas_kernels.pooled_top_p`, on a ``[block_rows, T]`` register tile). Only
ops the Triton lowering takes are used: elementwise ops, row reductions, broadcasts, a bitcast
and a ``lax.fori_loop`` of fixed trip count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["masked_softmax", "top_p_blocks"]

# Bisection steps of the top-p cut-off: the bit patterns of the non-negative float32 values
# up to +inf are the integers [0, 0x7F800000], fewer than 2**31, so 31 halvings reach one.
_CUTOFF_BISECTION_STEPS = 31
_POSITIVE_INF_BITS = 0x7F800000


def masked_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Row softmax of ``logits`` over the ``allowed`` entries; 0 elsewhere.

    Args:
      logits: ``[..., T]`` float32, finite; allowed: ``[..., T]`` bool (broadcastable).
    Returns:
      ``[..., T]`` float32: ``exp(x - max) / Σ exp(x - max)`` over the allowed entries (the ops
      of ``jax.nn.softmax``, so the values are the same), 0 outside them and on rows with nothing
      allowed (whose max is -inf: shifted by 0 instead, so no ``-inf - -inf`` NaN appears).
    """
    masked = jnp.where(allowed, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    has_any = row_max > -jnp.inf
    unnormalized = jnp.exp(masked - jnp.where(has_any, row_max, 0.0))
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return jnp.where(has_any, unnormalized / jnp.where(has_any, total, 1.0), 0.0)


def top_p_blocks(probs: jax.Array, allowed: jax.Array, threshold: float) -> jax.Array:
    """Smallest set of highest-probability blocks whose cumulative mass reaches ``threshold``.

    Args:
      probs: ``[..., T]`` float32 row-softmax over the allowed blocks (0 elsewhere), >= 0.
      allowed: ``[..., T]`` bool (broadcastable).
      threshold: a Python float in (0, 1] (static: ``>= 1`` is decided at trace time).
    Returns:
      ``[..., T]`` bool. In the row sorted by decreasing probability, sorted position p is kept
      iff the mass before it is < threshold (cumulative ≥ threshold inclusive, as the official
      code). A row whose mass never reaches the threshold keeps all its allowed blocks (the
      paper's Alg. 2: k = min({…} ∪ {i})). ``threshold >= 1`` keeps every allowed block
      outright, so fp rounding of the row sum cannot drop one (the official code's integer-1
      path). Blocks tied with the last kept value are all kept (the official sort breaks such
      ties arbitrarily).

    Sort-free. Write s_1 ≥ … ≥ s_T for the sorted row, K for the number of kept sorted
    positions (a prefix: the mass before position i grows with i; K ≥ 1 as 0 < threshold) and
    c = s_K; the mask is ``allowed & (probs >= c)``. Let ``G(v) = Σ_{p_j > v} p_j``, the mass
    strictly above v, non-increasing in v. Then c is the smallest v ≥ 0 with G(v) < threshold:

    * G(c) < threshold: the values > c are exactly the sorted positions before the first copy
      f ≤ K of c, so G(c) = mass before f ≤ mass before K < threshold;
    * every v < c has G(v) ≥ threshold, when K < T: all of s_1 … s_K exceed v, so G(v) ≥
      s_1 + … + s_K = mass before K + 1 ≥ threshold (position K + 1 is not kept);
    * when K = T (the row never reaches the threshold) a smaller v may qualify too, down to 0,
      but no value of the row lies below c = min(row), so ``probs >= v`` keeps the whole row
      either way: all allowed blocks, as required.

    G is a step function, so that smallest v is found by bisection over the ordered bit
    patterns of non-negative float32 values (``_CUTOFF_BISECTION_STEPS`` masked row sums, all
    rows at once) instead of a sort per row; the answer keeps the same mask. Float addition is
    monotone, so G summed in float32 is still non-increasing and the bisection exact for it;
    only the order of the additions differs from the sorted cumulative sum, which matters only
    where a partial mass lies within rounding of the threshold.
    """
    if threshold >= 1.0:
        return jnp.broadcast_to(allowed, probs.shape)
    probs = probs.astype(jnp.float32)

    def mass_above(bits):  # [..., 1] int32 → G(value of bits), [..., 1]
        cut = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.sum(jnp.where(probs > cut, probs, 0.0), axis=-1, keepdims=True)

    def halve(_, bounds):
        # Invariant: G(hi) < threshold, and the answer lies in [lo, hi]. Once lo == hi the
        # step is a no-op (mid == hi passes), so a fixed trip count is exact. The midpoint is a
        # shift of a non-negative difference (the Triton lowering has no integer floor-divide).
        lo, hi = bounds
        mid = lo + jnp.right_shift(hi - lo, 1)
        below = mass_above(mid) < threshold
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    rows = probs.shape[:-1] + (1,)
    lo = jnp.zeros(rows, jnp.int32)
    hi = jnp.full(rows, _POSITIVE_INF_BITS, jnp.int32)  # G(+inf) = 0 < threshold
    _, cutoff_bits = jax.lax.fori_loop(0, _CUTOFF_BISECTION_STEPS, halve, (lo, hi))
    return allowed & (probs >= jax.lax.bitcast_convert_type(cutoff_bits, jnp.float32))
