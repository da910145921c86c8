"""The two passes of the proxy importance, as building blocks (Pallas/Triton): pass 1 (each proxy
row's log2-sum-exp over the keys, split over key ranges and combined in jnp) and the body of pass 2
(the column sums of the row-softmax probabilities over a program's key tiles). Used by
``pallas_kernels.importance`` (the importance itself), whose module docstring describes the
passes.

A ragged batch passes ``counts = (real_rows, real_keys)`` ``[B]`` int32 (:func:`real_counts`):
one scalar operand per program (Pallas Triton has no scalar prefetch; :func:`count_specs`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels.importance_tiling import ImportanceTiles

__all__ = [
    "count_specs",
    "kernel_params",
    "key_block_in_specs",
    "key_tile",
    "probability_column_sums",
    "real_counts",
    "row_log2_sum_exp",
    "split_key_tiles",
]

# Initial running max of pass 1 (log2 units): finite so that exp2(_M_INIT - m) is an exact 0,
# never inf - inf = NaN. Every split walks at least one key tile, so it is always replaced
# (ragged: a split may walk none, then its exp-sum 0 weighs it out of the combine).
_M_INIT = -1e30
# Pass 1's logit (log2 units) at a key past real_keys: far below _M_INIT, so exp2 of it minus any
# running max is an exact 0 and it never becomes the max; finite, so no inf arithmetic.
_PADDED_LOGIT = -1e38


def real_counts(q_proxy, k, real_rows, real_keys) -> tuple[jax.Array, jax.Array] | None:
    """``(real_rows, real_keys)`` as ``[B]`` int32 clipped to [0, P] and [0, L] (a None one:
    all of them), or None when both are None (the unragged kernels)."""
    if real_rows is None and real_keys is None:
        return None
    b, p = q_proxy.shape[:2]
    l = k.shape[1]
    counts = []
    for name, count, full in (("real_rows", real_rows, p), ("real_keys", real_keys, l)):
        if count is None:
            count = jnp.full((b,), full, jnp.int32)
        count = jnp.asarray(count)
        if count.shape != (b,) or not jnp.issubdtype(count.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be a [B] = [{b}] integer array or None, "
                f"got {count.dtype}{list(count.shape)}"
            )
        counts.append(jnp.clip(count, 0, full).astype(jnp.int32))
    return tuple(counts)


def kernel_params(q_proxy) -> dict:
    """Kernel keywords of both passes: the base-2 logit scale and the dot precision."""
    return dict(
        qk_scale=_checks.LOG2E / math.sqrt(q_proxy.shape[-1]),
        precision=_checks.dot_precision(q_proxy.dtype),
    )


def count_specs(counts, index_map):
    """The in_specs of the ragged counts (``[B]`` int32 each): one scalar per program, its batch
    row's (``index_map`` gives the batch index), or none when ``counts`` is None."""
    return [] if counts is None else [pl.BlockSpec((None,), index_map)] * len(counts)


def row_log2_sum_exp(
    q_proxy,
    k,
    *,
    num_keys: int,
    tiles: ImportanceTiles,
    interpret: bool,
    counts=None,
    proxy_rows: int | None = None,
):
    """Pass 1: ``lse [B, Hq, P]`` float32, each proxy row's log2-sum-exp2 of its base-2 logits
    over the first ``num_keys`` keys of ``k [B, N, Hkv, D]`` (a multiple of block_keys).

    proxy_rows: P, the last rows of ``q_proxy [B, M, Hq, D]`` read in place (M - P a multiple of
    block_rows); None: all M.

    counts: None or ``(real_rows, real_keys)`` ``[B]`` int32 (:func:`real_counts`): only the
    first real_keys keys enter a row's sum; the rows past real_rows, and every row of a batch
    row without a real key, get anything (-inf when their whole row tile is padding)."""
    b, m, hq, d = q_proxy.shape
    p = proxy_rows or m
    first_tile = (m - p) // tiles.block_rows  # the proxy's first row tile in q_proxy
    n, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bm, bn = tiles.block_rows, tiles.block_keys
    split_keys = min(tiles.split_keys, num_keys)  # never longer than L itself (whole tiles)
    num_splits = pl.cdiv(num_keys, split_keys)
    ragged = counts is not None

    # Per (split, row tile, batch, head) the running max and exp-sum of its split.
    stats_shape = jax.ShapeDtypeStruct((b, hq, num_splits, p), jnp.float32)
    stats_spec = pl.BlockSpec((None, None, None, bm), lambda s, r, bi, h: (bi, h, s, r))
    row_max, row_sum = pl.pallas_call(
        functools.partial(
            _row_stats_kernel,
            block_keys=bn,
            split_tiles=split_keys // bn,
            num_key_tiles=num_keys // bn,
            ragged=ragged,
            **kernel_params(q_proxy),
        ),
        out_shape=(stats_shape, stats_shape),
        grid=(num_splits, p // bm, b, hq),
        in_specs=[
            pl.BlockSpec((None, bm, None, d), lambda s, r, bi, h: (bi, r + first_tile, h, 0)),
            # The whole key sequence of one kv head: only a base pointer for Triton; the loop
            # addresses its tiles.
            pl.BlockSpec(
                (None, n, None, d), lambda s, r, bi, h: (bi, 0, _checks.shared_head(h, group), 0)
            ),
            *count_specs(counts, lambda s, r, bi, h: (bi,)),
        ],
        out_specs=(stats_spec, stats_spec),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_importance_stats_m{bm}_n{bn}" + ("_ragged" if ragged else ""),
    )(q_proxy, k, *(counts or ()))

    # Splits → one log2-sum-exp2 per row, [B, Hq, P] (tiny: no kernel needed).
    top = row_max.max(axis=2)
    return top + jnp.log2(jnp.sum(row_sum * jnp.exp2(row_max - top[:, :, None]), axis=2))


def _row_stats_kernel(*refs, block_keys, split_tiles, num_key_tiles, ragged, qk_scale, precision):
    """One program: ``block_rows`` proxy rows against the key tiles of one split.

    q_ref [bm, D], k_ref [N, D]; max_ref, sum_ref [bm] (log2 units: the row max of
    s = q·k·log2(e)/√D over the split, and Σ exp2(s - max)).

    Ragged: real_rows_ref, real_keys_ref [] (this batch row's counts) follow k_ref. Only the
    split's tiles that hold a real key are walked, keys past real_keys masked; a row tile wholly
    past real_rows walks none. A split that walks none writes (_M_INIT, 0): weight 0 in the
    combine of the splits.
    """
    if ragged:
        q_ref, k_ref, real_rows_ref, real_keys_ref, max_ref, sum_ref = refs
    else:
        q_ref, k_ref, max_ref, sum_ref = refs
    first = pl.program_id(0) * split_tiles
    # The last split may be short; every split holds at least one tile.
    count = jnp.minimum(split_tiles, num_key_tiles - first)
    q = q_ref[...]
    bm = q.shape[0]
    if ragged:
        real_keys = real_keys_ref[...]
        real_tiles = lax.div(real_keys + block_keys - 1, block_keys)  # tiles with a real key
        count = jnp.clip(real_tiles - first, 0, count)
        count = jnp.where(pl.program_id(1) * bm < real_rows_ref[...], count, 0)

    def step(t, carry):
        m_prev, l_prev = carry
        start = (first + t) * block_keys
        keys = k_ref[pl.ds(start, block_keys), :]
        s = jnp.dot(q, keys.T, precision=precision, preferred_element_type=jnp.float32)
        s = s * qk_scale  # [bm, bn]
        if ragged:  # a where: padded keys may hold anything
            key = start + lax.broadcasted_iota(jnp.int32, (block_keys,), 0)
            s = jnp.where((key < real_keys)[None, :], s, _PADDED_LOGIT)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        l_new = l_prev * jnp.exp2(m_prev - m_new) + jnp.sum(jnp.exp2(s - m_new[:, None]), axis=1)
        return m_new, l_new

    carry = (jnp.full((bm,), _M_INIT, jnp.float32), jnp.zeros((bm,), jnp.float32))
    m, l = lax.fori_loop(0, count, step, carry)
    max_ref[...] = m
    sum_ref[...] = l


def key_block_in_specs(
    num_rows: int, key_block: int, d: int, group: int, first_block: int = 0
) -> list:
    """The operands of a pass over key blocks, grid ``(key block j, batch, query head)``: all P
    proxy rows of the head ``[P, D]`` (block ``first_block`` of P rows of the operand: the last
    P of longer queries, read in place), the block's ``key_block`` keys of its KV head
    ``[key_block, D]``, the rows' log-sum-exp ``[P]`` (pass 1's). Pass 2's."""
    return [
        pl.BlockSpec((None, num_rows, None, d), lambda j, bi, h: (bi, first_block, h, 0)),
        pl.BlockSpec(
            (None, key_block, None, d), lambda j, bi, h: (bi, j, _checks.shared_head(h, group), 0)
        ),
        pl.BlockSpec((None, None, num_rows), lambda j, bi, h: (bi, h, 0)),
    ]


def key_tile(t: int, block_keys: int, num_tiles: int):
    """The index of key tile ``t`` of a program's ``num_tiles`` tiles of ``block_keys`` keys
    (static): the whole block when it is one tile."""
    return pl.ds(t * block_keys, block_keys) if num_tiles > 1 else slice(None)


def split_key_tiles(k_ref, block_keys: int) -> tuple:
    """A program's ``[num_tiles · block_keys, D]`` keys as ``[block_keys, D]`` tiles, one load
    each (the tuple :func:`probability_column_sums` takes)."""
    num_tiles = k_ref.shape[0] // block_keys
    return tuple(k_ref[key_tile(t, block_keys, num_tiles), :] for t in range(num_tiles))


def probability_column_sums(
    q_ref,
    lse_ref,
    key_tiles,
    *,
    block_rows,
    num_row_tiles,
    qk_scale,
    precision,
    real_rows=None,
    keys_in=None,
):
    """Σ over all rows of ``q_ref [R, D]`` of ``exp2(s - lse_row)`` for each key of each tile
    of ``key_tiles`` (``[bn, D]`` each): a tuple of ``[bn]`` float32, rows walked
    ``block_rows`` at a time; lse_ref ``[R]`` (log2 units).

    Ragged: ``real_rows`` (a scalar) leaves the rows at or past it out of the sums, ``keys_in``
    (a ``[bn]`` bool per key tile) gives the other keys 0; both by a where, so those rows' and
    keys' logits and lse may be anything (inf included).

    The logits tile is computed transposed, keys × rows (``keys · qᵀ``), so that a key's sum over
    the rows is a reduction along the tile's rows: inside a thread and its quad, with no
    cross-warp exchange through shared memory (the rows × keys tile needs one per key tile). On
    an H200 (JAX 0.11.2, 2026-11-30, 32 heads of 128, bf16, one proxy block;
    experiments/explore_columns_transposed.py, results/explore_columns_transposed.log) the
    columns pass took 26-28 µs instead of 36-39 at 8K keys and 432 instead of 568-588 µs at
    128K, the same sums up to float32 reassociation (relative 2e-7)."""

    def step(r, sums):
        start = r * block_rows
        q = q_ref[pl.ds(start, block_rows), :]
        lse = lse_ref[pl.ds(start, block_rows)]
        if real_rows is not None:
            row_in = start + lax.broadcasted_iota(jnp.int32, (block_rows,), 0) < real_rows

        def probabilities(keys, key_in):  # [bn keys, block_rows rows]
            p = jnp.exp2(
                jnp.dot(keys, q.T, precision=precision, preferred_element_type=jnp.float32)
                * qk_scale
                - lse[None, :]
            )
            if real_rows is not None:
                p = jnp.where(row_in[None, :], p, 0.0)
            if key_in is not None:
                p = jnp.where(key_in[:, None], p, 0.0)
            return p

        return tuple(
            acc + jnp.sum(probabilities(keys, key_in), axis=1)
            for acc, keys, key_in in zip(sums, key_tiles, keys_in or (None,) * len(key_tiles))
        )

    zeros = tuple(jnp.zeros((keys.shape[0],), jnp.float32) for keys in key_tiles)
    return lax.fori_loop(0, num_row_tiles, step, zeros)
