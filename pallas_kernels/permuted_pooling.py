"""Block means of the permuted keys in one pass over K (Pallas/Triton).

The planner's pooled keys are the block means of the keys in slot order (slot j of permutation
head p holds the key at position ``perm[b, p, j]``), slots permuted only within segments. With
XLA that is an inverse permutation (a scatter), a one-hot of each position's block and an
einsum that transposes all of K first (``pbs_jax.selection.one_hot_pooled_permuted_keys``, the
CPU path).
Here one launch reads K once, grid ``(complete segments, B, Hkv)``: one program owns one
segment of one KV head, and for each of the ``r = Hp / Hkv`` permutation heads of that KV head
(a static loop: the segment's rows come from HBM once, the other heads' gathers can hit L1/L2;
the cache hits are not measured, the kernel's time is in results/profile_plan.md)

* pooled block t of the segment = the sum of the K rows at positions ``perm[slots of block
  t]``: gather loads of ``tiles.rows`` rows at a time by the permutation itself (each row D
  contiguous elements), so neither the inverse permutation nor an ``[S, S]`` matrix is built;
* float32 adds of the gathered rows (exact conversions whatever the input dtype, no dot), a
  ``[tiles.rows, D]`` accumulator reduced once per block, divided by ``block_size``.

Keys at positions ``>= lengths[b]`` (a right-padded batch) are zeroed in the kernel, from the
position the permutation names. The incomplete last segment (N not a multiple of S) is in its
original order: its blocks are :func:`block_means` of its keys in XLA (zeroed past the lengths
by ``zero_past_lengths``; a partial last block's zero padding counted), concatenated after the
kernel's.

The pure-jnp statement of the contract is
``pallas_kernels.reference.permuted_block_means_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels.pooling import PoolTiles, block_means, resolve_pool_tiles, zero_past_lengths

__all__ = [
    "permuted_block_means",
    "permuted_block_means_supported",
]


def _validate(k, perm, lengths, block_size, segment_size, tiles) -> PoolTiles:
    """Check the contract (static: shapes, dtypes, Python ints); return the tiles to use."""
    for name, val in (("block_size", block_size), ("segment_size", segment_size)):
        if not _checks.is_int(val) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if segment_size % block_size:
        raise ValueError(
            f"segment_size={segment_size} must be a multiple of block_size={block_size} "
            "(a segment holds whole blocks)"
        )
    if getattr(k, "ndim", None) != 4:
        raise ValueError(f"k must be a 4-d array [B, N, Hkv, D], got {k!r:.80}")
    b, n, hkv, d = k.shape
    if n == 0 or hkv == 0:
        raise ValueError(f"k must have N >= 1 keys and Hkv >= 1 heads, got shape {k.shape}")
    if jnp.dtype(k.dtype).name not in _checks.FLOAT_DTYPES:
        raise ValueError(f"k.dtype must be one of {_checks.FLOAT_DTYPES}, got {k.dtype}")
    _checks.check_row_head_dim(d)
    if getattr(perm, "ndim", None) != 3 or perm.shape[0] != b or perm.shape[2] != n:
        raise ValueError(
            f"perm must be [B, Hp, N] = [{b}, Hp, {n}] (B, N from k), got "
            f"{getattr(perm, 'shape', perm)!r:.80}"
        )
    if not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(f"perm must have an integer dtype (int32), got {perm.dtype}")
    hp = perm.shape[1]
    if hp == 0 or hp % hkv:
        raise ValueError(f"Hp={hp} (perm.shape[1]) must be a positive multiple of Hkv={hkv}")
    _checks.check_lengths(lengths, b)
    return resolve_pool_tiles(tiles, block_size, d)


def permuted_block_means_supported(k, perm, *, block_size: int, segment_size: int) -> bool:
    """Whether :func:`permuted_block_means` takes these operands with its default tiles."""
    return _checks.accepts(_validate, k, perm, None, block_size, segment_size, None)


def permuted_block_means(
    k: jax.Array,
    perm: jax.Array,
    *,
    block_size: int,
    segment_size: int,
    lengths: jax.Array | None = None,
    tiles: PoolTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Block means of the keys in slot order, without materialising them.

    ``out[b, t, p] = Σ_{j in block t} k'[b, perm[b, p, j], p // (Hp / Hkv)] / block_size`` with
    ``k'`` the keys, zero at positions ``>= lengths[b]``; the zero padding of a partial last
    block is counted (:func:`block_means` of the keys in slot order).

    Args:
      k: ``[B, N, Hkv, D]`` keys in original order (float32, bfloat16 or float16), any N >= 1;
        D a power of two <= 256.
      perm: ``[B, Hp, N]`` int32, Hp a multiple of Hkv: the original position of the key at
        each slot, permuted only within complete segments of ``segment_size`` (slot j of
        segment g holds a position of segment g); the slots of an incomplete last segment
        hold their own positions. Positions outside their slot's segment are clamped into it
        (memory safety; the contract is not checked, it is data).
      block_size: keys per pooled block (a power-of-two divisor of it is the gather tile).
      segment_size: S, a multiple of block_size.
      lengths: None, or ``[B]`` int: keys at positions ``>= lengths[b]`` count as zeros.
      tiles: :class:`PoolTiles` (rows: slots gathered per load); default
        ``pool_tiles(block_size, D)``.
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      ``[B, ceil(N / block_size), Hp, D]`` float32.

    Raises:
      ValueError: bad ranks, dtypes, shapes, head counts, head dim, sizes or tiles.
    """
    tiles = _validate(k, perm, lengths, block_size, segment_size, tiles)
    return _permuted_block_means(
        k,
        perm.astype(jnp.int32),
        None if lengths is None else lengths.astype(jnp.int32),
        block_size=block_size,
        segment_size=segment_size,
        tiles=tiles,
        interpret=_checks.resolve_interpret(interpret),
    )


@functools.partial(jax.jit, static_argnames=("block_size", "segment_size", "tiles", "interpret"))
def _permuted_block_means(k, perm, lengths, *, block_size, segment_size, tiles, interpret):
    b, n, hkv, d = k.shape
    hp = perm.shape[1]
    group = hp // hkv  # permutation heads per KV head
    num_segments = n // segment_size
    complete = num_segments * segment_size
    blocks_per_segment = segment_size // block_size
    ragged = lengths is not None

    parts = []
    if num_segments:
        in_specs = [
            # The segment's rows of one KV head, in original order (gathered from, never loaded
            # whole).
            pl.BlockSpec((None, segment_size, None, d), lambda g, bi, h: (bi, g, h, 0)),
            # The segment's slots of the KV head's `group` permutation heads.
            pl.BlockSpec((None, group, segment_size), lambda g, bi, h: (bi, h, g)),
        ]
        operands = [k, perm]
        if ragged:
            in_specs.append(pl.BlockSpec((None,), lambda g, bi, h: (bi,)))
            operands.append(lengths)
        parts.append(
            pl.pallas_call(
                functools.partial(
                    _permuted_pool_kernel,
                    block_size=block_size,
                    gather_rows=tiles.rows,
                    ragged=ragged,
                ),
                out_shape=jax.ShapeDtypeStruct(
                    (b, num_segments * blocks_per_segment, hp, d), jnp.float32
                ),
                grid=(num_segments, b, hkv),
                in_specs=in_specs,
                out_specs=pl.BlockSpec(
                    (None, blocks_per_segment, group, d), lambda g, bi, h: (bi, g, h, 0)
                ),
                compiler_params=_checks.triton_compiler_params(tiles),
                interpret=interpret,
                name=f"pbs_permuted_pool_s{segment_size}_b{block_size}_g{tiles.rows}",
            )(*operands)
        )
    if complete < n:
        # The incomplete last segment is in original order: the block means of its keys as
        # they are, the same for every permutation head of a KV head.
        tail = k[:, complete:]
        if ragged:
            tail = zero_past_lengths(tail, lengths, start=complete)
        parts.append(jnp.repeat(block_means(tail, block_size), group, axis=2))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _permuted_pool_kernel(k_ref, perm_ref, *refs, block_size, gather_rows, ragged):
    """One program: one segment of S keys of one KV head, for its ``r`` permutation heads.

    k_ref [S, D] (the segment's keys in original order); perm_ref [r, S] int32 (absolute
    positions); with ``ragged`` a length_ref [] int32 (this batch row's length) follows;
    pooled_ref [S / block_size, r, D] float32.
    """
    if ragged:
        length_ref, pooled_ref = refs
    else:
        (pooled_ref,) = refs
    segment_size, d = k_ref.shape
    group = perm_ref.shape[0]
    segment_start = pl.program_id(0) * segment_size
    chunks_per_block = block_size // gather_rows
    length = length_ref[...] if ragged else None

    for head in range(group):  # static: every head gathers from the same cached segment

        def pool_block(t, carry, head=head):
            def add_chunk(c, total):
                slots = pl.ds(t * block_size + c * gather_rows, gather_rows)
                pos = perm_ref[head, slots]  # [gather_rows] absolute positions
                row = jnp.clip(pos - segment_start, 0, segment_size - 1)
                keys = k_ref[row, :].astype(jnp.float32)  # gather: [gather_rows, D]
                if ragged:
                    keys = jnp.where((pos < length)[:, None], keys, 0.0)
                return total + keys

            total = lax.fori_loop(
                0, chunks_per_block, add_chunk, jnp.zeros((gather_rows, d), jnp.float32)
            )
            pooled_ref[t, head, :] = jnp.sum(total, axis=0) / block_size
            return carry

        lax.fori_loop(0, segment_size // block_size, pool_block, 0)
