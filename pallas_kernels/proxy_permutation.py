"""The planner's key permutation and pooled permuted keys in one pass (Pallas/Triton).

:func:`proxy_permutation` is the planner's whole use of the proxy importance
(:mod:`pallas_kernels.importance`) in one more step: pass 1 is the importance's (each proxy
row's log2-sum-exp2), and its pass 2 (:func:`_segment_order_kernel`, grid ``(segments, B,
Hp)``) owns one permutation segment (``segment_size / block_keys`` key tiles), so when its
column sums are done it holds the finished importance of every key of the segment and, still in
registers,

* ranks the keys (a stable descending order, the one ``jnp.argsort(descending=True,
  stable=True)`` gives) by ``[block_keys, block_keys]`` comparisons of its tiles, and writes
  the permutation ``key_pos`` (slot → original position; the inverse of the rank by a one-hot
  reduction, no scatter);
* writes the block means of the permuted keys (masked float32 sums of the key tiles, exact
  adds whatever the input dtype: no dot, so no TF32).

The importance never reaches HBM, nor do a sort's or a pooling's intermediates. Measured slower
than the unfused stages on an H200 at the default tiles (``pbs_jax.permutation.FUSED_PERMUTATION``
says by how much), so the planner does not use it by default; ``experiments/bench_kernel.py``
times it. The pure-jnp statement of the contract is
``pallas_kernels.reference.proxy_permutation_reference``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels._checks import largest_pow2_divisor
from pallas_kernels.importance import validate_operands
from pallas_kernels.importance_passes import (
    kernel_params,
    key_block_in_specs,
    probability_column_sums,
    row_log2_sum_exp,
    split_key_tiles,
)
from pallas_kernels.importance_tiling import ImportanceTiles
from pallas_kernels.pooling import block_means

__all__ = [
    "GQA_MODES",
    "proxy_permutation",
    "proxy_permutation_supported",
]

# Permutation heads of proxy_permutation: one per query head, or one per KV head ranked by the
# mean importance of its query group.
GQA_MODES = ("replicate", "shared")
# Key tiles of one segment in proxy_permutation's pass 2: the rank takes (S / block_keys)²
# tile comparisons, unrolled at trace time (2 at the paper's S = 256 with 128-key tiles).
_MAX_SEGMENT_TILES = 16


def _validate_permutation(q_proxy, k, segment_size, block_size, gqa, tiles) -> ImportanceTiles:
    """Check :func:`proxy_permutation`'s contract (static); return the tiles to use."""
    for name, val in (("segment_size", segment_size), ("block_size", block_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if segment_size % block_size:
        raise ValueError(
            f"segment_size={segment_size} must be a multiple of block_size={block_size} "
            "(a segment holds whole blocks)"
        )
    if segment_size % 16:
        raise ValueError(
            f"segment_size must be a multiple of 16 (whole Triton key tiles), got {segment_size}"
        )
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")
    if getattr(k, "ndim", None) != 4:
        raise ValueError(f"k must be a 4-d array [B, N, Hkv, D], got {k!r:.80}")
    n = k.shape[1]
    if n < segment_size:
        raise ValueError(
            f"k must hold at least one complete segment: N={n} < segment_size={segment_size}"
        )
    # The importance is a softmax over the complete segments' keys only.
    complete = n // segment_size * segment_size
    given = tiles
    tiles = validate_operands(
        q_proxy, jax.ShapeDtypeStruct((k.shape[0], complete, *k.shape[2:]), k.dtype), tiles
    )
    if given is None:  # the default key tile, shrunk to divide the segment as well
        tiles = dataclasses.replace(
            tiles, block_keys=largest_pow2_divisor(segment_size, tiles.block_keys)
        )
    if segment_size % tiles.block_keys:
        raise ValueError(
            f"tiles.block_keys={tiles.block_keys} must divide segment_size={segment_size} "
            "(pass 2 owns whole segments)"
        )
    if segment_size // tiles.block_keys > _MAX_SEGMENT_TILES:
        raise ValueError(
            f"segment_size={segment_size} spans more than {_MAX_SEGMENT_TILES} key tiles of "
            f"{tiles.block_keys} (the rank compares every pair of them)"
        )
    return tiles


def proxy_permutation_supported(
    q_proxy, k, *, segment_size: int, block_size: int, gqa: str = "replicate"
) -> bool:
    """Whether :func:`proxy_permutation` accepts these operands with its default tiles."""
    return _checks.accepts(_validate_permutation, q_proxy, k, segment_size, block_size, gqa, None)


def proxy_permutation(
    q_proxy: jax.Array,
    k: jax.Array,
    *,
    segment_size: int,
    block_size: int,
    gqa: str = "replicate",
    tiles: ImportanceTiles | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The planner's key permutation and the block means of the permuted keys, in one pass.

    The importance of key j for permutation head p is the mean over the proxy rows of the
    softmax over the G·S complete-segment keys (:func:`proxy_importance`; with ``gqa="shared"``
    averaged over the query heads of KV head p as well). Inside each complete segment the keys
    are sorted by descending importance, ties in original order (``jnp.argsort(descending=True,
    stable=True)``); the keys of an incomplete last segment stay in place.

    Args:
      q_proxy: ``[B, P, Hq, D]`` proxy queries, P a multiple of 16.
      k: ``[B, N, Hkv, D]`` keys (N >= segment_size; any N), Hq a multiple of Hkv, same dtype
        as q_proxy (float32, bfloat16 or float16); D a power of two in [16, 256].
      segment_size: S, a multiple of block_size and of 16, at most 16 key tiles.
      block_size: keys per pooled block.
      gqa: ``"replicate"`` (Hp = Hq: one permutation per query head) or ``"shared"`` (Hp = Hkv).
      tiles: :class:`ImportanceTiles` (block_keys must divide S); default
        :func:`importance_tiles` of (P, G·S, dtype), key tile shrunk to divide S.
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      ``key_pos [B, Hp, N]`` int32, the original position of the key at each slot, and
      ``pooled_k [B, ceil(N / block_size), Hp, D]`` float32, the mean of each block of slots'
      keys (:func:`block_means` of the keys in slot order: zero padding of a partial last block
      counted).

    Raises:
      ValueError: bad ranks, dtypes, shapes, head counts, head dim, segment, block or tiles.
    """
    tiles = _validate_permutation(q_proxy, k, segment_size, block_size, gqa, tiles)
    return _proxy_permutation(
        q_proxy,
        k,
        segment_size=segment_size,
        block_size=block_size,
        shared=gqa == "shared",
        tiles=tiles,
        interpret=_checks.resolve_interpret(interpret),
    )


@functools.partial(
    jax.jit, static_argnames=("segment_size", "block_size", "shared", "tiles", "interpret")
)
def _proxy_permutation(
    q_proxy, k, *, segment_size: int, block_size: int, shared: bool, tiles, interpret: bool
):
    b, p, hq, d = q_proxy.shape
    n, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    num_segments = n // segment_size
    complete = num_segments * segment_size
    blocks_per_segment = segment_size // block_size
    bm, bn = tiles.block_rows, tiles.block_keys
    lse = row_log2_sum_exp(q_proxy, k, num_keys=complete, tiles=tiles, interpret=interpret)
    if shared:
        # KV head p ranks by the mean over its group's heads of their mean over rows: the mean
        # over all group·P rows. Stack the group's rows, [B, group·P, Hkv, D], (g, row) order.
        rows = q_proxy.reshape(b, p, hkv, group, d).transpose(0, 3, 1, 2, 4)
        rows = rows.reshape(b, group * p, hkv, d)
        lse = lse.reshape(b, hkv, group * p)
        num_heads, kv_group = hkv, 1
    else:
        rows, num_heads, kv_group = q_proxy, hq, group
    num_rows = rows.shape[1]

    # Pass 2: per (segment, batch, permutation head) the segment's importance, its order and
    # the means of its blocks of slots.
    key_pos, pooled_k = pl.pallas_call(
        functools.partial(
            _segment_order_kernel,
            block_rows=bm,
            num_row_tiles=num_rows // bm,
            block_keys=bn,
            block_size=block_size,
            **kernel_params(q_proxy),
        ),
        out_shape=(
            jax.ShapeDtypeStruct((b, num_heads, complete), jnp.int32),
            jax.ShapeDtypeStruct((b, num_segments * blocks_per_segment, num_heads, d), jnp.float32),
        ),
        grid=(num_segments, b, num_heads),
        in_specs=key_block_in_specs(num_rows, segment_size, d, kv_group),
        out_specs=(
            pl.BlockSpec((None, None, segment_size), lambda j, bi, h: (bi, h, j)),
            pl.BlockSpec((None, blocks_per_segment, None, d), lambda j, bi, h: (bi, j, h, 0)),
        ),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_importance_segments_m{bm}_n{bn}_s{segment_size}",
    )(rows, k, lse)

    if complete == n:
        return key_pos, pooled_k
    # The incomplete last segment (< S keys, whole blocks from its start) stays in place: its
    # slots are its positions and its block means those of the keys as they are.
    tail_pos = jnp.broadcast_to(
        jnp.arange(complete, n, dtype=jnp.int32), (b, num_heads, n - complete)
    )
    tail_means = jnp.repeat(block_means(k[:, complete:], block_size), num_heads // hkv, axis=2)
    return (
        jnp.concatenate([key_pos, tail_pos], axis=-1),
        jnp.concatenate([pooled_k, tail_means], axis=1),
    )


def _segment_order_kernel(
    q_ref,
    k_ref,
    lse_ref,
    pos_ref,
    pooled_ref,
    *,
    block_rows,
    num_row_tiles,
    block_keys,
    block_size,
    qk_scale,
    precision,
):
    """One program: one segment of S keys of one permutation head, in S / bn key tiles.

    q_ref [R, D] (the head's proxy rows; a shared head's whole group), k_ref [S, D],
    lse_ref [R]; pos_ref [S] int32 (slot → original position), pooled_ref [S / block_size, D]
    float32 (the block means of the keys in slot order).

    The column sums over all R rows order the keys as their mean does (a positive scale keeps
    the order), so the importance is never divided. Key i of tile a goes to slot
    ``rank_i = #{j: imp_j > imp_i} + #{j < i: imp_j == imp_i}`` (stable descending).
    """
    key_tiles = split_key_tiles(k_ref, block_keys)
    importance = probability_column_sums(
        q_ref,
        lse_ref,
        key_tiles,
        block_rows=block_rows,
        num_row_tiles=num_row_tiles,
        qk_scale=qk_scale,
        precision=precision,
    )

    # [bn, bn] comparisons: rows i (the tile being ranked), columns j (the tile ranked against).
    row = lax.broadcasted_iota(jnp.int32, (block_keys, block_keys), 0)
    col = lax.broadcasted_iota(jnp.int32, (block_keys, block_keys), 1)
    ranks = []  # per tile: [bn] int32, the slot of each of its keys inside the segment
    for a, mine in enumerate(importance):
        mine = mine[:, None]
        rank = jnp.zeros((block_keys,), jnp.int32)
        for c, theirs in enumerate(importance):
            theirs = theirs[None, :]
            if c < a:  # every key of tile c lies before every key of tile a: ties go first
                ahead = theirs >= mine
            elif c > a:
                ahead = theirs > mine
            else:
                ahead = (theirs > mine) | ((theirs == mine) & (col < row))
            rank = rank + jnp.sum(ahead.astype(jnp.int32), axis=1)
        ranks.append(rank)

    # key_pos, one tile of slots at a time: slot r holds the key whose rank is r (one-hot over
    # the keys, a sum with one nonzero term).
    segment_start = pl.program_id(0) * k_ref.shape[0]
    for slot_tile in range(len(key_tiles)):
        slot = slot_tile * block_keys + row  # [bn slots, bn keys]
        pos = jnp.zeros((block_keys,), jnp.int32)
        for a, rank in enumerate(ranks):
            pos = pos + jnp.sum(jnp.where(rank[None, :] == slot, a * block_keys + col, 0), axis=1)
        pos_ref[pl.ds(slot_tile * block_keys, block_keys)] = segment_start + pos

    # Block t of slots holds the keys of rank in [t·block_size, (t+1)·block_size): masked sums
    # of the key tiles, float32 adds.
    blocks = [lax.div(rank, block_size) for rank in ranks]
    for t in range(pooled_ref.shape[0]):
        total = jnp.zeros((k_ref.shape[1],), jnp.float32)
        for keys, block in zip(key_tiles, blocks):
            in_block = (block == t)[:, None]
            total = total + jnp.sum(jnp.where(in_block, keys.astype(jnp.float32), 0.0), axis=0)
        pooled_ref[t, :] = total / block_size
