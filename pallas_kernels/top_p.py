"""The block selection's row rules: the softmax over a row's allowed blocks and the top-p cut.

One statement of each, written in plain jnp on any ``[..., T]`` rows so that the same function
runs in the jnp planner (``pbs_jax.selection``), in the pure-jnp reference and inside the Pallas
kernel body (:mod:`pallas_kernels.pooled_top_p`, on a ``[block_rows, T]`` register tile). Only
ops the Triton lowering takes are used: elementwise ops (integer shifts and products by
constants, no integer division), row reductions, broadcasts, a bitcast and a ``lax.fori_loop``
of fixed trip count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._checks import is_int

__all__ = [
    "CUTS_PER_STEP",
    "cutoff_search_bits",
    "cutoff_search_steps",
    "masked_softmax",
    "top_p_blocks",
]

# The top-p cut-off is searched over the bit patterns of non-negative float32 values (ordered
# as the values): each step evaluates ``cuts_per_step`` = 2**b - 1 independent masked row sums
# and so decides b bits of the answer (1: bisection).
CUTS_PER_STEP = (1, 3, 7)
_ONE_BITS = 0x3F800000  # bits of 1.0
# The search window reaches at least this many ulps above 1.0: a softmax value is <= 1 with
# IEEE division, and within a few ulps of it with an approximate one (Triton's fp32 divide).
_ULPS_ABOVE_ONE = 16
# Rounding allowance of a row softmax's mass, per block: its sum, its division and the masked
# row sum err by less than (2T + 4)·2**-24 together; 2**-19 per block, (T + 1)·2**-19, is 10
# to 16 times that.
_MASS_ROUNDING_PER_BLOCK = 2.0**-19


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


def cutoff_search_bits(cuts_per_step, name: str = "cuts_per_step") -> int:
    """b, the bits of the cut-off one search step decides with ``cuts_per_step`` = 2**b - 1
    masked sums; ValueError (naming the argument ``name``) unless one of ``CUTS_PER_STEP``."""
    if not is_int(cuts_per_step) or cuts_per_step not in CUTS_PER_STEP:
        raise ValueError(f"{name} must be one of {CUTS_PER_STEP}, got {cuts_per_step!r}")
    return int(cuts_per_step).bit_length()


def _cutoff_window(num_blocks: int, threshold: float, bits_per_step: int) -> tuple[int, int]:
    """``(lowest, bits)``: the bit patterns ``[lowest, lowest + 2**bits)`` that the cut-off of
    rows of T = ``num_blocks`` values is searched in (static), ``bits`` a multiple of
    ``bits_per_step``.

    ``lowest`` is the bits of the largest float32 v0 <= (1 - τ - ε_T) / (2T), ε_T = (T + 1)·
    2**-19, τ the threshold (rounded up to float32, as the comparison sees it); 0 where that is
    not positive (τ within ε_T of 1: the whole range). The top lies at least
    ``_ULPS_ABOVE_ONE`` ulps above 1.0 and below +inf (2**bits <= 2**30, ``lowest`` < bits of
    1.0), so the window never wraps int32.
    """
    tau = max(threshold, float(np.float32(threshold)))
    slack = 1.0 - tau - (num_blocks + 1) * _MASS_ROUNDING_PER_BLOCK
    lowest = 0
    if slack > 0.0:
        v0 = slack / (2 * num_blocks)
        lowest = int(np.float32(v0).view(np.int32))
        if float(np.float32(v0)) > v0:  # rounded up to float32: take the float below
            lowest -= 1
    bits = (_ONE_BITS + _ULPS_ABOVE_ONE - lowest).bit_length()  # <= 30
    return lowest, -(-bits // bits_per_step) * bits_per_step  # <= 30 for b in 1, 2, 3


def cutoff_search_steps(num_blocks: int, threshold: float, cuts_per_step: int = 1) -> int:
    """Dependent steps of :func:`top_p_blocks`' cut-off search on ``[..., T]`` rows (each
    ``cuts_per_step`` independent masked row sums); 0 for ``threshold >= 1``. At T = 1024,
    τ = 0.88: 27 steps of 1 cut, 14 of 3, 9 of 7 (31 bisections over [0, +inf] before)."""
    bits_per_step = cutoff_search_bits(cuts_per_step)
    if threshold >= 1.0:
        return 0
    return _cutoff_window(num_blocks, threshold, bits_per_step)[1] // bits_per_step


def top_p_blocks(
    probs: jax.Array, allowed: jax.Array, threshold: float, *, cuts_per_step: int = 1
) -> jax.Array:
    """Smallest set of highest-probability blocks whose cumulative mass reaches ``threshold``.

    Args:
      probs: ``[..., T]`` float32 row softmax over the allowed blocks (0 elsewhere; e.g.
        :func:`masked_softmax`): values in [0, 1] (a few ulps above 1 are fine), each row's
        mass within rounding of 1, or 0 (the search window below says exactly which rows).
      allowed: ``[..., T]`` bool (broadcastable).
      threshold: a Python float in (0, 1] (static: ``>= 1`` is decided at trace time).
      cuts_per_step: one of ``CUTS_PER_STEP`` (static): masked row sums per search step; 2**b
        - 1 cuts decide b bits of the cut-off per step (1: bisection). The mask does not
        depend on it, only the number of dependent steps (:func:`cutoff_search_steps`) and
        the work per step.
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

    G is a step function, so that smallest v, as bits b* (non-negative float32 values are
    ordered as their bit patterns), is found by a search over bit patterns (masked row sums, all
    rows at once) instead of a sort per row. Float addition is monotone, so G summed in float32
    is still non-increasing (every masked sum is the same reduction of a same-shaped row: the
    same additions in the same order, only some addends 0) and the search exact for it; only
    the order of the additions differs from the sorted cumulative sum, which matters only where
    a partial mass lies within rounding of the threshold.

    The search window (static, :func:`_cutoff_window`; τ the threshold) holds b* whenever
    G(0) ≥ τ. Rows with G(0) < τ (nothing allowed, or a mass that never reaches τ) have b* = 0;
    where the window starts above 0 that test answers them directly (cut-off 0: the mask
    keeps every allowed block). A softmax row's mass lies far above τ then, so only rows
    outside the contract can have a mass within rounding of τ, where the test's sum and the
    search's might round apart. The window's top lies above every value (1 + 16 ulps), so
    G(top) = 0 < τ. Its bottom v0 = (1 - τ - ε_T) / (2T) lies at or below b*: every v < v0 has
    G(v) ≥ τ. The values ≤ v hold at most T·v of mass, so the float32 masked sum G(v) ≥
    (Σ p - T·v0)(1 - γ), γ ≤ T·2**-24 its rounding; a row softmax has Σ p ≥ 1 - γ',
    γ' ≤ (T + 4)·2**-24 (its own sum and a division of up to 2 ulps; a flushed denormal costs
    2**-126); so G(v) ≥ (1 - γ' - (1 - τ - ε_T)/2)(1 - γ) ≥ τ + (1 - τ + ε_T)/2 - γ - γ' > τ,
    as ε_T = (T + 1)·2**-19 > 2(γ + γ'). (Any other row without a value in (0, v0) is exact
    too: there G(v) = G(0) for v < v0, the same masked sum.) Where 1 - τ ≤ ε_T the bottom is 0
    (the whole range, 30 bits). The window is about 2**27 patterns wide, not 2**31.

    Each search step holds ``[base, base + width)`` ∋ b*, with G(base + width - 1) < τ and
    G ≥ τ below base. Its 2**b - 1 cuts ``base + j·width/2**b - 1`` (j = 1, …) are independent
    masked sums (instruction-level parallelism hides the reductions' latency); G ≥ τ holds at a
    prefix of them (G is monotone), and base moves past that prefix to the sub-range of width
    ``width / 2**b`` that holds b*. ``bits / b`` steps (``bits`` a multiple of b) end on b*.
    """
    bits_per_step = cutoff_search_bits(cuts_per_step)
    if threshold >= 1.0:
        return jnp.broadcast_to(allowed, probs.shape)
    probs = probs.astype(jnp.float32)
    lowest, window_bits = _cutoff_window(probs.shape[-1], threshold, bits_per_step)

    def mass_above(cut):  # [..., 1] float32 → G(cut), [..., 1]
        return jnp.sum(jnp.where(probs > cut, probs, 0.0), axis=-1, keepdims=True)

    def narrow(_, state):
        # base, width: [..., 1] int32, width a power of two (every row's); the new width is a
        # shift and the cuts width times a static int (the Triton lowering has no integer
        # divide). The cuts stay in the window, below 2**31.
        base, width = state
        sub = jnp.right_shift(width, bits_per_step)
        cuts = [_as_float32(base + (j * sub - 1)) for j in range(1, 1 << bits_per_step)]
        above = [mass_above(cut) >= threshold for cut in cuts]
        return base + sum(jnp.where(a, sub, 0) for a in above), sub

    rows = probs.shape[:-1] + (1,)
    start = (jnp.full(rows, lowest, jnp.int32), jnp.full(rows, 1 << window_bits, jnp.int32))
    cutoff_bits, _ = jax.lax.fori_loop(0, window_bits // bits_per_step, narrow, start)
    cutoff = _as_float32(cutoff_bits)
    if lowest > 0:  # rows with G(0) < τ: b* = 0 lies below the window
        cutoff = jnp.where(mass_above(0.0) < threshold, 0.0, cutoff)
    return allowed & (probs >= cutoff)


def _as_float32(bits: jax.Array) -> jax.Array:
    """The float32 values of int32 bit patterns."""
    return jax.lax.bitcast_convert_type(bits, jnp.float32)
