"""The block grid: one home for every rule about blocks and segments.

A sequence of N tokens is cut into T = ceil(N / block_size) blocks, both for queries and for
key slots; ``cfg.mask_segment_size`` groups blocks into segments (the permutation segment, or a
single block without permutation). Every piece of the op and every study asks these functions,
never re-derives them:

- :func:`num_blocks` — T;
- :func:`segment_blocks` — blocks per masked segment;
- :func:`own_segment_blocks` — the blocks always computed and token-masked;
- :func:`earlier_segment_blocks` — blocks of strictly earlier segments (never masked);
- :func:`softmax_domain` — the key blocks competing in a query block's top-p;
- :func:`dense_tail_blocks` — the trailing query blocks that attend to every causal block;
- :func:`causal_block_count` / :func:`computed_causal_blocks` — what density divides by and counts;
- :func:`real_tokens`, :func:`zero_padding`, :func:`real_block_counts`, :func:`real_blocks`,
  :func:`permuted_key_counts` — the same rules per row of a right-padded batch (``lengths [B]``).

All masks are ``[T, T]`` bool over (query block, key-slot block). With ``q_offset`` (a chunk
of queries continuing a cache: its query blocks are the LAST ``T - q_offset`` blocks of the
sequence) they are ``[T - q_offset, T]``: row i is the absolute query block ``q_offset + i``. A
mask's offset is always its ``Tk - Tq``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pooling import zero_past_lengths
from pbs_jax.config import PBSConfig


def num_blocks(seq_len: int, block_size: int) -> int:
    """T = ceil(N / block_size): blocks per sequence (a partial last block counts)."""
    return pl.cdiv(seq_len, block_size)


def segment_blocks(cfg: PBSConfig) -> int:
    """Blocks per masked segment: ``mask_segment_size // block_size``."""
    return cfg.mask_segment_size // cfg.block_size


def _block_grid(t: int, q_offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """(absolute query-block ids ``[T - q_offset, 1]``, key-block ids ``[1, T]``)."""
    return jnp.arange(q_offset, t)[:, None], jnp.arange(t)[None, :]


def causal_blocks(t: int, q_offset: int = 0) -> jax.Array:
    """``[T - q_offset, T]`` bool: the causal block grid (key block ≤ query block), what a dense
    causal kernel computes."""
    qb, kb = _block_grid(t, q_offset)
    return kb <= qb


def own_segment_blocks(t: int, cfg: PBSConfig, q_offset: int = 0) -> jax.Array:
    """``[T, T]`` bool: blocks always computed and masked token by token on original positions.

    Every block of the query block's own segment (``cfg.mask_segment_size``), including blocks
    above the block diagonal: permuted keys cross block boundaries inside a segment.
    """
    per_segment = segment_blocks(cfg)
    qb, kb = _block_grid(t, q_offset)
    return kb // per_segment == qb // per_segment


def earlier_segment_blocks(t: int, cfg: PBSConfig, q_offset: int = 0) -> jax.Array:
    """``[T, T]`` bool: key blocks of strictly earlier (masked) segments: causal without a mask."""
    per_segment = segment_blocks(cfg)
    qb, kb = _block_grid(t, q_offset)
    return kb // per_segment < qb // per_segment


def softmax_domain(t: int, cfg: PBSConfig, q_offset: int = 0) -> jax.Array:
    """``[T, T]`` bool: the key blocks that compete in the block softmax of each query block.

    With permutation: blocks of strictly earlier segments (own-segment blocks are computed anyway,
    so they are left out of the competition). Without (MeanPooling baseline): every causal block,
    the diagonal included, as the official baseline does.
    """
    if cfg.permute:
        return earlier_segment_blocks(t, cfg, q_offset)
    return causal_blocks(t, q_offset)


def dense_tail_blocks(
    t: int, cfg: PBSConfig, row_blocks: jax.Array | None = None, q_offset: int = 0
) -> jax.Array:
    """``[T, T]`` bool: every allowed block (:func:`softmax_domain`) of the last
    ``ceil(cfg.dense_tail / block_size)`` query blocks: the rows ``cfg.dense_tail`` computes
    densely, rounded up to whole blocks.

    ``row_blocks [B]`` (a ragged batch: each row's own T, :func:`real_block_counts`): the tail
    of each row's own last blocks, ``[B, T, T]``. ``q_offset``: a chunk's rows only,
    ``[T - q_offset, T]``.
    """
    qb, _ = _block_grid(t, q_offset)
    last = t if row_blocks is None else row_blocks[:, None, None]
    tail = qb >= last - num_blocks(cfg.dense_tail, cfg.block_size)
    return tail & softmax_domain(t, cfg, q_offset)


def causal_block_count(t: int, q_offset: int = 0) -> int:
    """Blocks a dense causal kernel computes over a ``T × T`` block grid: T(T+1)/2; for the
    query blocks ``[q_offset, T)`` only (a chunk), T(T+1)/2 - q_offset(q_offset+1)/2."""
    return t * (t + 1) // 2 - q_offset * (q_offset + 1) // 2


def computed_causal_blocks(block_mask: jax.Array) -> jax.Array:
    """``block_mask [..., Tq, T]`` → the blocks a causal kernel computes for it, same shape
    (``Tq < T``: the chunk of the last Tq query blocks).

    Own-segment blocks above the block diagonal hold permuted keys, but a kernel that reads the
    own segment in original order (the Mosaic kernel; any causal flash kernel) computes exactly
    the own segment's causal blocks: the same key set. So the work is the mask restricted to the
    causal triangle, and keeping every block is a density of exactly 1.
    """
    t = block_mask.shape[-1]
    return block_mask & causal_blocks(t, t - block_mask.shape[-2])


# Batches of different lengths (right padding): row b holds ``lengths[b]`` real tokens, then
# padding up to N. Each rule below is the row's own rule (the row run alone on its real
# tokens) as a mask over the batch's static grid, so one compile serves every length vector.


def real_tokens(lengths: jax.Array, seq_len: int) -> jax.Array:
    """``[B, N]`` bool: the positions that hold a real token (``position < lengths[b]``)."""
    return jnp.arange(seq_len)[None, :] < lengths[:, None]


def zero_padding(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """``x [B, N, ...]`` with every row at a position ``>= lengths[b]`` set to zero: the zero pad
    that a row run alone sees past its last real token (pooled means count it). The rule is
    stated once, in ``pallas_kernels.pooling.zero_past_lengths`` (the kernels' side of it)."""
    return zero_past_lengths(x, lengths)


def real_block_counts(lengths: jax.Array, block_size: int) -> jax.Array:
    """``[B]`` int32: T of each row alone, ``ceil(lengths[b] / block_size)``."""
    return (lengths + block_size - 1) // block_size


def real_blocks(lengths: jax.Array, t: int, block_size: int) -> jax.Array:
    """``[B, T, T]`` bool: (query block, key block) pairs inside the row's own grid (both
    ``< ceil(lengths[b] / block_size)``); the row alone has no other blocks."""
    count = real_block_counts(lengths, block_size)[:, None, None]
    qb, kb = _block_grid(t)
    return (qb[None] < count) & (kb[None] < count)


def permuted_key_counts(lengths: jax.Array, cfg: PBSConfig) -> jax.Array:
    """``[B]`` int32: the leading keys a row sorts, its complete segments
    ``(lengths[b] // segment_size) · segment_size``; 0 for a row of at most ``segment_size``
    tokens, which alone takes dense attention (identity permutation)."""
    s = cfg.segment_size
    return jnp.where(lengths > s, (lengths // s) * s, 0).astype(jnp.int32)
