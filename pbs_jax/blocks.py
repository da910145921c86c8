"""Block-mask metadata: block mask → compact per-row index lists (the kernel's input), density.

Kept apart from the selectors (as splash attention keeps its mask info) so every selector feeds
the same kernel through the same lists, and the lists have their own tests.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pbs_jax import grid
from pbs_jax.config import PBSConfig


class BlockLists(NamedTuple):
    """Compact CSR-like rows of a block mask.

    ids: ``[B, H, Tq, Tk]`` int32, per query block the selected key-block ids ascending, then
      zeros the kernel never reads.
    full_counts: ``[B, H, Tq]`` int32, ids ``[0, full)`` lie in earlier segments: no token mask.
    total_counts: ``[B, H, Tq]`` int32, ids ``[full, total)`` lie in the query's own segment:
      masked on original positions (key_pos > q_pos).
    """

    ids: jax.Array
    full_counts: jax.Array
    total_counts: jax.Array


def index_lists(block_mask: jax.Array, cfg: PBSConfig) -> BlockLists:
    """Compact ``block_mask [B, H, Tq, Tk]`` bool into :class:`BlockLists` (``Tq < Tk``: a chunk
    of the last Tq query blocks).

    Ascending order puts off-segment blocks first: own-segment blocks are the largest causal ids.

    One cumsum along the rows and one scatter on the ``[rows, Tk]`` layout (a scatter with a
    batch dimension, no vmap): linear, where a sort of the mask row would be T log T. Kept block
    c goes to slot ``kept_upto[c] - 1``, a dropped one to its own out-of-bounds slot ``Tk + c``:
    the indices are unique (declared to XLA) and depend on the cumsum alone, so XLA fuses the
    cumsum's last stage into the scatter instead of materializing it; both counts are read off
    the same cumsum, with no masked row sums over the mask.

    The CPU path and the tests' oracle: the GPU plan (``pbs_jax.selection.
    select_blocks_and_lists`` with the ``"meanpool"`` selector) takes its lists from the
    selection kernel, which writes them in the launch that selects the blocks
    (``pallas_kernels.pooled_selection``: 12.4 µs for mask and lists at 8K tokens, 32 heads, H200,
    results/profile_plan.md). Other
    selectors, and masks built elsewhere, still come here.

    In the plan's GPU profile at 128K tokens, 32 heads (H200, JAX 0.11.2, results/profile_plan.json
    as committed in d5a10c4 against cc7de94's), when the plan still ran this on GPU: the vmapped
    scatter's two row sums (one 102 µs kernel) are gone, a zero fill (40 µs) and a cumsum stage
    (11 µs) came; the scatter stays (~161 µs).
    """
    t = block_mask.shape[-1]
    rows = block_mask.reshape(-1, t)  # [B * H * Tq, Tk]
    kept_upto = jnp.cumsum(rows, axis=-1, dtype=jnp.int32)  # kept blocks <= c
    col = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 1)
    row_scatter = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(),
        inserted_window_dims=(1,),
        scatter_dims_to_operand_dims=(1,),
        operand_batching_dims=(0,),
        scatter_indices_batching_dims=(0,),
    )
    ids = jax.lax.scatter(
        jnp.zeros(rows.shape, jnp.int32),
        jnp.where(rows, kept_upto - 1, t + col)[..., None],
        col,
        row_scatter,
        indices_are_sorted=False,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )
    # Earlier segments precede the query's own: their blocks are a prefix of every row, so
    # full is the cumsum at the prefix's last block (0 for an empty prefix).
    with jax.ensure_compile_time_eval():
        earlier = grid.earlier_segment_blocks(t, cfg, t - block_mask.shape[-2])
        prefix = jnp.sum(earlier, axis=-1, dtype=jnp.int32)  # [Tq]
    counts_shape = block_mask.shape[:-1]
    prefix_rows = jnp.broadcast_to(prefix, counts_shape).reshape(-1, 1)
    at_prefix_end = jnp.take_along_axis(kept_upto, jnp.maximum(prefix_rows - 1, 0), axis=-1)
    full = jnp.where(prefix_rows > 0, at_prefix_end, 0)
    total = kept_upto[:, -1]
    return BlockLists(
        ids.reshape(block_mask.shape), full.reshape(counts_shape), total.reshape(counts_shape)
    )


def density(block_mask: jax.Array, row_blocks: jax.Array | None = None) -> jax.Array:
    """Computed blocks / causal blocks, float32 ``[B, H]``: dense attention is exactly 1.

    Counts what a causal kernel computes (:func:`grid.computed_causal_blocks`): the selected
    earlier-segment blocks plus the own segment's causal blocks. The official kernel also runs
    the own-segment blocks above the diagonal on permuted keys; that extra
    ``(T / blocks per segment) / (T (T + 1) / 2)`` is not work our kernels do.

    ``row_blocks [B]`` (a ragged batch, :func:`grid.real_block_counts`): each row's causal
    blocks are those of its own grid, the density of the row alone (its mask selects nothing
    outside that grid).
    """
    t = block_mask.shape[-1]
    computed = grid.computed_causal_blocks(block_mask)
    row_t = t if row_blocks is None else row_blocks[:, None]
    causal = grid.causal_block_count(row_t, t - block_mask.shape[-2])  # a chunk: its rows only
    return jnp.sum(computed, axis=(-2, -1), dtype=jnp.float32) / causal


def fixed_density_mask(
    key: jax.Array,
    shape: tuple[int, int, int],
    target: float,
    cfg: PBSConfig,
    q_offset: int = 0,
) -> jax.Array:
    """A random block mask for benchmarks: own-segment blocks plus random earlier-segment blocks.

    Args:
      shape: ``(B, H, T)``.
      target: wanted density; earlier-segment blocks are kept with the probability that gives it
        in expectation (clipped to [0, 1]).
      q_offset: a chunk's mask (queries continuing a cache): only query blocks
        ``[q_offset, T)``, the density that of those rows.
    Returns:
      ``[B, H, T - q_offset, T]`` bool.
    """
    b, h, t = shape
    own = grid.own_segment_blocks(t, cfg, q_offset)
    # The static block grid, concrete even under jit (it depends on T alone), so it counts.
    with jax.ensure_compile_time_eval():
        earlier = grid.earlier_segment_blocks(t, cfg, q_offset)
        n_earlier = int(earlier.sum())
    causal = grid.causal_block_count(t, q_offset)
    keep_p = 1.0 if n_earlier == 0 else (target * causal - (causal - n_earlier)) / n_earlier
    keep_p = min(max(keep_p, 0.0), 1.0)
    rand = jax.random.uniform(key, (b, h, t - q_offset, t)) < keep_p
    return own | (earlier & rand)


def sink_local_mask(shape: tuple[int, int, int], window: int) -> jax.Array:
    """The static sink + local-window baseline: key block 0 and the ``window`` most recent key
    blocks (the diagonal included) of every query block; no permutation, no scoring.

    Args:
      shape: ``(B, H, T)``.
      window: recent key blocks per query block, ``>= 1`` (1 keeps only the diagonal).
    Returns:
      ``[B, H, T, T]`` bool over (query block, key block), for identity-permuted keys.
    """
    if window < 1:
        raise ValueError(f"sink_local_mask needs window >= 1 (the diagonal block), got {window}")
    b, h, t = shape
    qb, kb = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = (kb == 0) | ((kb <= qb) & (kb > qb - window))
    return jnp.broadcast_to(mask, (b, h, t, t))


def sink_local_window(t: int, target: float) -> int:
    """The window (in blocks) whose :func:`sink_local_mask` density is closest to ``target``.

    Densities grow with the window in discrete steps, so ties and overshoots are unavoidable;
    the smaller window wins a tie. Pure numpy on the static block count T.
    """
    w = np.arange(1, t + 1)
    # Computed blocks: query block i keeps min(i + 1, w) recent blocks, plus the sink when i >= w.
    counts = w * (w + 1) // 2 + (t - w) * w + (t - w)
    return int(np.argmin(np.abs(counts / grid.causal_block_count(t) - target))) + 1
