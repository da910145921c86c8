"""The end of a block selection (Pallas/Triton, kernel side): the caller's grid rules as int8 codes,
the final mask they give with the top-p blocks and a sink per query head, and the compaction of the
mask into the attention kernels' block lists.

Run inside the pooled selection kernel (``pallas_kernels.pooled_top_p``) where its tile is small,
and as a lean kernel of its own (:func:`finish_selection`) on the top-p mask where it is large: the
codes' and lists' int tiles next to the selection's ``[rows, T_pad]`` float32 tile spill registers
(the measurements are in ``pallas_kernels.pooled_top_p_tiling.pooled_top_p_tiles``).

Lists: per row the running count of kept blocks (``lax.cumsum``), its total, the kept blocks
flagged ``CODE_EARLIER`` (``full_counts``), and the ids tile by one unmasked scatter store whose
slots are a permutation of the row's columns: kept column c to slot ``kept_upto[c] - 1`` (value
c), dropped column c to ``total + c - kept_upto[c]`` (value 0): the kept ids ascending, then zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _checks

__all__ = [
    "CODE_DOMAIN",
    "CODE_EARLIER",
    "CODE_FORCED",
    "CODE_NEVER",
    "codes_spec",
    "final_mask",
    "finish_selection",
    "flagged",
    "selection_outputs",
    "write_lists",
]

# The bit flags of ``pallas_kernels.pooled_selection``'s ``codes`` per (query block, key block).
CODE_DOMAIN = 1  # competes in the block softmax (and so in the top-p cut)
CODE_FORCED = 2  # selected whatever its score
CODE_NEVER = 4  # never selected (overrides the others: outside a ragged row's grid)
CODE_EARLIER = 8  # counted in full_counts (an earlier segment's block: no token mask)


def codes_spec(codes, rows: int, t_pad: int) -> pl.BlockSpec:
    """The ``[rows, T_pad]`` tile of ``codes [1 | B, rows_pad, T_pad]`` of a program of the
    ``(row tiles, B, Hq)`` grid (one codes row for the whole batch unless it has B)."""
    per_row = codes.shape[0] > 1
    return pl.BlockSpec((None, rows, t_pad), lambda r, bi, h: (bi if per_row else 0, r, 0))


def selection_outputs(b, hq, rows_pad, t_pad, rows, with_lists):
    """Out shapes and specs on the ``(row tiles, B, Hq)`` grid: the int8 mask, and with lists
    ids int32 ``[B, Hq, rows_pad, T_pad]``, full and total counts int32 ``[B, Hq, rows_pad]``."""

    def row_tile(r, bi, h):
        return (bi, h, r, 0)

    shape = [jax.ShapeDtypeStruct((b, hq, rows_pad, t_pad), jnp.int8)]
    specs = [pl.BlockSpec((None, None, rows, t_pad), row_tile)]
    if with_lists:
        shape += [
            jax.ShapeDtypeStruct((b, hq, rows_pad, t_pad), jnp.int32),
            jax.ShapeDtypeStruct((b, hq, rows_pad), jnp.int32),
            jax.ShapeDtypeStruct((b, hq, rows_pad), jnp.int32),
        ]
        specs += [
            pl.BlockSpec((None, None, rows, t_pad), row_tile),
            pl.BlockSpec((None, None, rows), lambda r, bi, h: (bi, h, r)),
            pl.BlockSpec((None, None, rows), lambda r, bi, h: (bi, h, r)),
        ]
    return shape, specs


def finish_selection(top_p, codes, sink, rows: int, with_lists: bool, interpret):
    """The top-p int8 ``mask [B, Hq, rows_pad, T_pad]`` finished in a lean kernel of ``rows``
    query blocks per program: the forced, never-selected and sink blocks applied, and with
    lists (ids, full_counts, total_counts); all padded as the mask."""
    b, hq, rows_pad, t_pad = top_p.shape
    rows = min(rows, rows_pad & -rows_pad)  # a power of two dividing the padded rows
    out_shape, out_specs = selection_outputs(b, hq, rows_pad, t_pad, rows, with_lists)
    kind = "pbs_finish_lists" if with_lists else "pbs_finish_mask"
    return pl.pallas_call(
        _finish_selection_kernel,
        out_shape=out_shape,
        grid=(rows_pad // rows, b, hq),
        in_specs=[
            pl.BlockSpec((None, None, rows, t_pad), lambda r, bi, h: (bi, h, r, 0)),
            codes_spec(codes, rows, t_pad),
            pl.BlockSpec((None, None), lambda r, bi, h: (bi, h)),
        ],
        out_specs=out_specs,
        compiler_params=_checks.triton_launch_params(
            num_warps=4 if rows * t_pad <= 4096 else 8, num_stages=1
        ),
        interpret=interpret,
        name=f"{kind}_t{t_pad}_m{rows}",
    )(top_p, codes, sink)


def _finish_selection_kernel(top_p_ref, codes_ref, sink_ref, mask_ref, *list_refs):
    """One program of :func:`finish_selection`: top_p_ref, codes_ref [rows, T_pad] int8,
    sink_ref [] int32 → the final mask [rows, T_pad] int8 (and its lists) of its rows."""
    codes = codes_ref[...]
    keep = final_mask(top_p_ref[...] != 0, codes, sink_ref[...])
    mask_ref[...] = keep.astype(jnp.int8)
    if list_refs:
        write_lists(keep, codes, *list_refs)


def final_mask(top_p, codes, sink):
    """The selection's rule on a ``[rows, T_pad]`` tile: the top-p blocks, or forced, or the
    sink column, and never the blocks flagged ``CODE_NEVER``."""
    col = lax.broadcasted_iota(jnp.int32, top_p.shape, 1)
    return (top_p | flagged(codes, CODE_FORCED) | (col == sink)) & ~flagged(codes, CODE_NEVER)


def flagged(codes, code: int):
    """Where the int8 ``codes`` carry the bit ``code``."""
    return (codes & jnp.int8(code)) != 0


def write_lists(keep, codes, ids_ref, full_ref, total_ref):
    """The block lists of a ``[rows, T_pad]`` tile of kept blocks: ids_ref [rows, T_pad] (each
    row's kept columns ascending, then zeros), full_ref (kept and flagged ``CODE_EARLIER``) and
    total_ref (kept) [rows] int32."""
    tile = keep.shape
    kept = keep.astype(jnp.int32)
    kept_upto = lax.cumsum(kept, axis=1)  # kept blocks <= c
    total = jnp.sum(kept, axis=1)  # [rows]
    full_ref[...] = jnp.sum(jnp.where(flagged(codes, CODE_EARLIER), kept, 0), axis=1)
    total_ref[...] = total
    # A permutation of the row's columns: kept column c to slot kept_upto[c] - 1 (ascending
    # ids first), dropped column c to slot total + (dropped columns < c) (zeros after). Every
    # slot is written once, so one unmasked scatter fills the whole tile.
    col = lax.broadcasted_iota(jnp.int32, tile, 1)
    slot = jnp.where(keep, kept_upto - 1, total[:, None] + col - kept_upto)
    row = lax.broadcasted_iota(jnp.int32, tile, 0)
    plt.store(ids_ref.at[row, slot], jnp.where(keep, col, 0))
