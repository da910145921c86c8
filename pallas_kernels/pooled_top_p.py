"""The mean-pooling selector's whole block selection in one kernel (Pallas/Triton).

Written with XLA, the selection is the pooled logits ``[B, Hq, T, T]`` through HBM, a softmax,
then ~27 masked row sums (the cut-off search of :func:`pallas_kernels.top_p.top_p_blocks`),
each its own kernel launch: at T = 64 blocks (8K tokens) that is launch-bound (0.78 ms on an
H200 for a few KiB of data, with 31 of them); then the forced blocks and the compaction of the
mask into block lists (a cumsum, a batched scatter and a zero fill, several launches:
``pbs_jax.blocks.index_lists`` has their profile). Here one launch does it all up to
T_pad = 256 (12.4 µs at 8K tokens, 32 heads, H200: results/profile_plan.md), grid ``(row tiles,
B, Hq)``; one program owns ``block_rows`` query blocks of one head:

1. the logits of its pooled query blocks against all ``T_pad`` pooled key blocks of its
   permutation head, ``[block_rows, T_pad]`` float32 in registers, accumulated over the head
   dim in ``depth_chunk`` slices (each dot operand's chunk of keys fits shared memory);
2. the softmax over the allowed blocks (:func:`pallas_kernels.top_p.masked_softmax`; the domain
   is bit ``CODE_DOMAIN`` of an int8 ``codes [1 or B, Tq, T]`` input, so its one definition
   stays with the caller; Tq < T for a chunk's last query blocks);
3. the top-p cut-off by the same search (:func:`pallas_kernels.top_p.top_p_blocks`: a
   ``lax.fori_loop`` of masked row sums over the register tile, ``cuts_per_step`` independent
   ones per step: 27 steps of 1 at T_pad = 1024, τ = 0.88; 14 of 3; 9 of 7);
4. the end of the selection (:mod:`pallas_kernels.block_lists`): the final mask (the top-p
   blocks, or flagged ``CODE_FORCED``, or the query head's ``sink`` block, never those flagged
   ``CODE_NEVER``: the caller's grid rules as data, the kernel knows no segment, tail or ragged
   row), int8, and with lists (:func:`pooled_selection`) their compaction. Above T_pad = 256
   (``PooledTopPTiles.lists_rows``) this kernel writes the top-p mask alone and a lean second
   kernel does step 4.

T is padded to a power of two >= 16 (Triton tensor shapes are powers of two and ``tl.dot``
dimensions >= 16) and Tq to whole row tiles: padded key blocks carry no code (outside the
domain, never kept: last in every row's permutation, sliced off with the ``[.., T_pad]`` ids
tile's tail), padded query blocks are dropped.
The logits are float32 IEEE dots (HIGHEST precision), as the jnp path's einsum.

The pure-jnp statements of the same contracts are
``pallas_kernels.reference.pooled_top_p_blocks_reference`` and
``pallas_kernels.reference.pooled_selection_reference``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels.block_lists import (
    CODE_DOMAIN,
    codes_spec,
    final_mask,
    finish_selection,
    flagged,
    selection_outputs,
    write_lists,
)
from pallas_kernels.pooled_top_p_tiling import (
    MAX_POOLED_BLOCKS,
    PooledTopPTiles,
    padded_blocks,
    pooled_top_p_tiles,
)
from pallas_kernels.top_p import masked_softmax, top_p_blocks

__all__ = [
    "MAX_POOLED_BLOCKS",
    "PooledSelection",
    "PooledTopPTiles",
    "pooled_selection",
    "pooled_top_p_blocks",
    "pooled_top_p_supported",
    "pooled_top_p_tiles",
]


def _validate(pooled_q, pooled_k, domain, threshold, tiles) -> PooledTopPTiles:
    """Check the contract (static: shapes, dtypes, Python numbers); return the tiles to use."""
    for name, x in (("pooled_q", pooled_q), ("pooled_k", pooled_k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-d array [B, T, heads, D], got {x!r:.80}")
        if x.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 (block means), got {x.dtype}")
    b, tq, hq, d = pooled_q.shape
    kb, t, hp, kd = pooled_k.shape
    if (kb, kd) != (b, d) or t < tq:
        raise ValueError(
            f"pooled_k must be [B, T, Hp, D] with B={b}, D={d} from pooled_q and T >= Tq={tq} "
            f"(pooled_q's query blocks are the last Tq of T), got {pooled_k.shape}"
        )
    if hp <= 0 or hq % hp:
        raise ValueError(f"Hq={hq} (pooled_q) must be a positive multiple of Hp={hp} (pooled_k)")
    if not 1 <= t <= MAX_POOLED_BLOCKS:
        raise ValueError(
            f"T={t} pooled blocks must be in [1, {MAX_POOLED_BLOCKS}] (a [rows, T] register tile)"
        )
    _checks.check_dot_head_dim(d)
    if domain is not None:
        if getattr(domain, "shape", None) != (tq, t):
            raise ValueError(f"domain must be [Tq, T] = [{tq}, {t}], got {domain!r:.80}")
        if not (domain.dtype == jnp.bool_ or jnp.issubdtype(domain.dtype, jnp.integer)):
            raise ValueError(f"domain must be bool or integer, got {domain.dtype}")
    if threshold is not None and not (
        isinstance(threshold, (int, float, np.floating))
        and not isinstance(threshold, bool)
        and 0.0 < float(threshold) <= 1.0
    ):
        raise ValueError(f"threshold must be a Python float in (0, 1], got {threshold!r}")
    if tiles is None:
        return pooled_top_p_tiles(t, d)
    if not isinstance(tiles, PooledTopPTiles):
        raise ValueError(f"tiles must be a PooledTopPTiles or None, got {type(tiles).__name__}")
    if tiles.block_rows > padded_blocks(t):
        raise ValueError(
            f"tiles.block_rows={tiles.block_rows} must be at most T_pad={padded_blocks(t)}"
        )
    if d % tiles.depth_chunk:
        raise ValueError(f"tiles.depth_chunk={tiles.depth_chunk} must divide D={d}")
    return tiles


def _validate_codes(pooled_q, pooled_k, codes, sink) -> None:
    """Check :func:`pooled_selection`'s codes and sink against the pooled blocks (static)."""
    b, tq, hq, _ = pooled_q.shape
    t = pooled_k.shape[1]
    shape = getattr(codes, "shape", None)
    if shape is None or len(shape) != 3 or shape[0] not in (1, b) or shape[1:] != (tq, t):
        raise ValueError(
            f"codes must be [1 or B, Tq, T] = [1 or {b}, {tq}, {t}], got {codes!r:.80}"
        )
    if codes.dtype != jnp.int8:
        raise ValueError(f"codes must be int8 (bit flags), got {codes.dtype}")
    if getattr(sink, "shape", None) != (b, hq) or sink.dtype != jnp.int32:
        raise ValueError(f"sink must be int32 [B, Hq] = [{b}, {hq}], got {sink!r:.80}")


def pooled_top_p_supported(pooled_q, pooled_k) -> bool:
    """Whether :func:`pooled_top_p_blocks` and :func:`pooled_selection` take these pooled
    blocks with their default tiles."""
    return _checks.accepts(_validate, pooled_q, pooled_k, None, None, None)


class PooledSelection(NamedTuple):
    """What :func:`pooled_selection` writes (Tq query blocks, T key blocks, Hq query heads).

    mask: ``[B, Hq, Tq, T]`` bool, the selected blocks.
    ids: ``[B, Hq, Tq, T]`` int32, per query block the selected key blocks ascending, then
      zeros; None without lists.
    full_counts: ``[B, Hq, Tq]`` int32, selected blocks flagged ``CODE_EARLIER``; None without
      lists.
    total_counts: ``[B, Hq, Tq]`` int32, selected blocks; None without lists.
    """

    mask: jax.Array
    ids: jax.Array | None = None
    full_counts: jax.Array | None = None
    total_counts: jax.Array | None = None


def pooled_selection(
    pooled_q: jax.Array,
    pooled_k: jax.Array,
    codes: jax.Array,
    sink: jax.Array,
    threshold: float,
    *,
    with_lists: bool = True,
    tiles: PooledTopPTiles | None = None,
    interpret: bool | None = None,
) -> PooledSelection:
    """A whole block selection in one launch: the top-p blocks, the forced ones, and the
    compact block lists of the result.

    ``mask[b, h, i, j] = (top_p[b, h, i, j] | codes[b, i, j] & CODE_FORCED | j == sink[b, h])
    & ~(codes[b, i, j] & CODE_NEVER)``, where ``top_p`` is :func:`pooled_top_p_blocks` with the
    domain ``codes & CODE_DOMAIN`` (per batch row where codes has B rows). The caller states
    every grid rule in ``codes`` and ``sink``; the kernel knows none.

    Args:
      pooled_q, pooled_k, threshold, tiles, interpret: as :func:`pooled_top_p_blocks`.
      codes: ``[1 or B, Tq, T]`` int8 bit flags per (query block, key block), shared by the
        batch when its first dim is 1: ``CODE_DOMAIN`` (competes in the softmax),
        ``CODE_FORCED`` (always selected), ``CODE_NEVER`` (never selected; overrides the
        others), ``CODE_EARLIER`` (counted in ``full_counts``).
      sink: ``[B, Hq]`` int32, a key block forced per query head, or -1 for none.
      with_lists: static; also write ids, full_counts and total_counts (else they are None).

    Returns:
      :class:`PooledSelection`. The ids are each row's selected key blocks ascending, then
      zeros; ``total_counts`` counts them, ``full_counts`` those flagged ``CODE_EARLIER``.

    Raises:
      ValueError: as :func:`pooled_top_p_blocks`, and codes or sink of the wrong shape or dtype.
    """
    tiles = _validate(pooled_q, pooled_k, None, threshold, tiles)
    _validate_codes(pooled_q, pooled_k, codes, sink)
    outputs = _pooled_selection(
        pooled_q,
        pooled_k,
        codes,
        sink,
        threshold=float(threshold),
        tiles=tiles,
        with_lists=bool(with_lists),
        interpret=_checks.resolve_interpret(interpret),
    )
    return PooledSelection(*outputs)


def pooled_top_p_blocks(
    pooled_q: jax.Array,
    pooled_k: jax.Array,
    domain: jax.Array,
    threshold: float,
    *,
    tiles: PooledTopPTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Top-p key blocks of every query block under the mean-pooling selector's softmax.

    ``out[b, h, i] = top_p(softmax over {j : domain[i, j]} of pooled_q[b, i, h] ·
    pooled_k[b, j, h // (Hq/Hp)] / √D)``, the top-p rule of
    :func:`pallas_kernels.top_p.top_p_blocks`; rows with nothing allowed select nothing. No
    forced block (sink, own segment) is added: that is :func:`pooled_selection`, whose kernel
    this runs (the domain as its only code, no sink, no lists).

    Args:
      pooled_q: ``[B, Tq, Hq, D]`` float32 pooled query blocks, Tq ≤ T (Tq < T: a chunk's
        last Tq query blocks; the domain says which key blocks each may see).
      pooled_k: ``[B, T, Hp, D]`` float32 pooled (permuted) key blocks, Hq a multiple of Hp;
        D a power of two in [16, 256]; T in [1, ``MAX_POOLED_BLOCKS``].
      domain: ``[Tq, T]`` bool or int (nonzero = allowed): the key blocks competing per query
        block.
      threshold: Python float in (0, 1] (static).
      tiles: :class:`PooledTopPTiles`; default :func:`pooled_top_p_tiles` (T, D).
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      ``[B, Hq, Tq, T]`` bool.

    Raises:
      ValueError: bad ranks, dtypes, shapes, head counts, head dim, T, domain, threshold or
        tiles (the message names the argument and the rule).
    """
    tiles = _validate(pooled_q, pooled_k, domain, threshold, tiles)
    b, hq = pooled_q.shape[0], pooled_q.shape[2]
    codes = jnp.where(domain != 0, jnp.int8(CODE_DOMAIN), jnp.int8(0))[None]
    (mask,) = _pooled_selection(
        pooled_q,
        pooled_k,
        codes,
        jnp.full((b, hq), -1, jnp.int32),
        threshold=float(threshold),
        tiles=tiles,
        with_lists=False,
        interpret=_checks.resolve_interpret(interpret),
    )
    return mask


@functools.partial(jax.jit, static_argnames=("threshold", "tiles", "with_lists", "interpret"))
def _pooled_selection(pooled_q, pooled_k, codes, sink, *, threshold, tiles, with_lists, interpret):
    b, tq, hq, d = pooled_q.shape
    t, hp = pooled_k.shape[1], pooled_k.shape[2]
    group = hq // hp
    t_pad = padded_blocks(t)
    bm = tiles.block_rows
    rows_pad = pl.cdiv(tq, bm) * bm  # query blocks, in whole row tiles
    pooled_q = jnp.pad(pooled_q, ((0, 0), (0, rows_pad - tq), (0, 0), (0, 0)))
    pooled_k = jnp.pad(pooled_k, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    # Padded key blocks have no flag: outside the domain, never selected (the sink is < T), so
    # they come last in every row's lists. Padded query rows are dropped below.
    codes = jnp.pad(codes, ((0, 0), (0, rows_pad - tq), (0, t_pad - t)))
    finish_here = not tiles.lists_rows  # forced blocks (and lists) in this kernel
    lists_here = with_lists and finish_here
    out_shape, out_specs = selection_outputs(b, hq, rows_pad, t_pad, bm, lists_here)
    cuts_suffix = f"_c{tiles.cuts_per_step}" if tiles.cuts_per_step > 1 else ""
    kind = "pbs_select_lists" if lists_here else "pbs_pooled_top_p"
    outputs = pl.pallas_call(
        functools.partial(
            _pooled_selection_kernel,
            depth_chunk=tiles.depth_chunk,
            num_depth_chunks=d // tiles.depth_chunk,
            # The divisor of the jnp path (logits / √D, √D rounded to float32 first), so the
            # logits agree with it bit for bit wherever the dots do.
            logit_divisor=float(np.sqrt(np.float32(d))),
            threshold=threshold,
            cuts_per_step=tiles.cuts_per_step,
            finish=finish_here,
        ),
        out_shape=out_shape,
        grid=(rows_pad // bm, b, hq),
        in_specs=[
            pl.BlockSpec((None, bm, None, d), lambda r, bi, h: (bi, r, h, 0)),
            # All T_pad key blocks of one permutation head.
            pl.BlockSpec(
                (None, t_pad, None, d), lambda r, bi, h: (bi, 0, _checks.shared_head(h, group), 0)
            ),
            codes_spec(codes, bm, t_pad),
            pl.BlockSpec((None, None), lambda r, bi, h: (bi, h)),
        ],
        out_specs=out_specs,
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"{kind}_t{t_pad}_m{bm}{cuts_suffix}",
    )(pooled_q, pooled_k, codes, sink)
    if not finish_here:
        outputs = finish_selection(outputs[0], codes, sink, tiles.lists_rows, with_lists, interpret)
    # Slices of the padding: no-ops where T is a power of two >= 16 and Tq whole row tiles.
    mask = outputs[0][:, :, :tq, :t] != 0
    if not with_lists:
        return (mask,)
    ids, full, total = outputs[1:]
    return mask, ids[:, :, :tq, :t], full[:, :, :tq], total[:, :, :tq]


def _pooled_selection_kernel(
    q_ref,
    k_ref,
    codes_ref,
    sink_ref,
    mask_ref,
    *list_refs,
    depth_chunk,
    num_depth_chunks,
    logit_divisor,
    threshold,
    cuts_per_step,
    finish,
):
    """One program: ``block_rows`` query blocks of one head against all T_pad key blocks
    (``finish``: the final mask, else the top-p blocks alone for :func:`finish_selection`).

    q_ref [bm, D], k_ref [T_pad, D] float32; codes_ref [bm, T_pad] int8; sink_ref [] int32;
    mask_ref [bm, T_pad] int8; with lists, list_refs = (ids_ref [bm, T_pad] int32, full_ref
    [bm] int32, total_ref [bm] int32).
    """

    def accumulate(c, logits):  # one head-dim slice of the dot
        cols = pl.ds(c * depth_chunk, depth_chunk)
        q, k = q_ref[:, cols], k_ref[:, cols]
        return logits + jnp.dot(
            q, k.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )

    # Starting from 0 keeps a single-chunk dot bit-exact (0 + x == x).
    tile = (q_ref.shape[0], k_ref.shape[0])
    logits = lax.fori_loop(0, num_depth_chunks, accumulate, jnp.zeros(tile, jnp.float32))
    # Only the domain's bit lives through the search; the other flags are read after it (an
    # int tile kept live through the loop would spill registers at large T_pad).
    allowed = flagged(codes_ref[...], CODE_DOMAIN)
    probs = masked_softmax(logits / logit_divisor, allowed)
    top_p = top_p_blocks(probs, allowed, threshold, cuts_per_step=cuts_per_step)
    if not finish:
        mask_ref[...] = top_p.astype(jnp.int8)
        return
    codes = codes_ref[...]
    keep = final_mask(top_p, codes, sink_ref[...])
    mask_ref[...] = keep.astype(jnp.int8)
    if list_refs:
        write_lists(keep, codes, *list_refs)
