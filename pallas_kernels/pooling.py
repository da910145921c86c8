"""Mean pooling of consecutive blocks of rows: the one statement of the official code's rule
(:func:`block_means`, jnp), shared by the planner (``pbs_jax.selection.mean_pool_blocks``) and
the references; and its Pallas/Triton
evaluation (:func:`masked_block_means`): ``mean_pool_blocks`` on GPU (the planner's pooled
queries, and its pooled keys without a permutation), with ``block_means`` its oracle.

:func:`masked_block_means` is one launch, grid ``(T, B, H)``: one program reads one block of
``block_size`` rows of one head (rows ``H * D`` elements apart, each D contiguous), adds them in
float32 ``rows`` at a time and writes their sum divided by ``block_size``. Rows at or past N (a
partial last block) and, with ``lengths``, at or past ``lengths[b]`` are masked loads with 0 as
their value: never read, counted as the zero padding of :func:`block_means` (the jnp path
zeroes the rows past ``lengths`` with :func:`zero_past_lengths` before its pad, reshape and
mean).

:class:`PoolTiles` and its default :func:`pool_tiles` tile both pooling kernels (this one and
``pallas_kernels.permuted_block_means``): a ``[rows, D]`` float32 add per step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _checks

__all__ = [
    "PoolTiles",
    "block_means",
    "masked_block_means",
    "masked_block_means_supported",
    "pool_tiles",
    "resolve_pool_tiles",
    "zero_past_lengths",
]

# The smallest block the kernel pools, as every kernel of this package (a power of two: a
# Triton block dimension).
_MIN_BLOCK_SIZE = 16


def block_means(x: jax.Array, block_size: int) -> jax.Array:
    """``[B, N, H, D]`` → ``[B, ceil(N / block_size), H, D]`` float32 means of consecutive
    blocks of rows; the zero padding of a partial last block is counted in its mean (the
    official code's pooling)."""
    b, n, h, d = x.shape
    t = pl.cdiv(n, block_size)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, t * block_size - n), (0, 0), (0, 0)))
    return x.reshape(b, t, block_size, h, d).mean(axis=2)


def zero_past_lengths(x: jax.Array, lengths: jax.Array, start: int = 0) -> jax.Array:
    """``x [B, L, ...]`` with every row at a position ``>= lengths[b]`` set to zero, row i of
    x being position ``start + i`` (``start``: x is a slice of the sequence starting there).

    The one statement of "rows at or past ``lengths[b]`` count as zeros": the zero pad a row
    run alone sees past its last real token (pooled means count it); ``pbs_jax.grid
    .zero_padding`` is this rule, the kernels mask their loads by it."""
    b, rows = x.shape[:2]
    real = jnp.arange(start, start + rows)[None, :] < lengths[:, None]  # [B, L]
    return jnp.where(real.reshape((b, rows) + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class PoolTiles:
    """Static tiling of the pooling kernels, :func:`masked_block_means` and
    ``pallas_kernels.permuted_block_means`` (hashable: a jit static argument).

    rows: rows loaded and added per step, a power of two dividing block_size: a ``[rows, D]``
      tile (contiguous rows for :func:`masked_block_means`, rows gathered by the permutation
      for ``permuted_block_means``) added in float32.
    num_warps, num_stages: Triton launch parameters.
    """

    rows: int = 128
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        _checks.check_pow2_at_least("PoolTiles", "rows", self.rows, 1)
        _checks.check_num_warps("PoolTiles", self.num_warps)
        _checks.check_num_stages("PoolTiles", self.num_stages)


def pool_tiles(block_size: int, head_dim: int) -> PoolTiles:
    """Default tiles of both pooling kernels: the largest power-of-two divisor of block_size
    with a ``[rows, D]`` tile of at most 16K elements (a whole block of 128 at D 128: one
    step), 8 warps, 2 stages.

    Measured on an H200 (JAX 0.11.2, 2026-11-30, bf16, blocks of 128):

    * :func:`masked_block_means` (a prototype of the kernel, q ``[1, N, 32, 128]``;
      results/explore_fused_permutation.log): 18.8 µs at N = 8K and 270 µs at 128K for rows
      128 at 8 warps and 2 stages, 20 / 279 µs for rows 32 or 64 at 4 warps; XLA's jnp path
      21.8 / 303 µs. This kernel in the plan's profile: 19.9 µs at 8K, 268.9 at 128K
      (results/profile_plan_transposed.md).
    * ``permuted_block_means`` (32 permutation heads over 8 KV heads of D 128;
      experiments/profile_plan.py's sweep, results/profile_plan.md): at 128K tokens 194 µs of
      GPU time for gathers of 128 rows at 8 warps, 241 for 32 rows, 319 for 32 rows at 4 warps
      (the einsum path: 277 µs); at 8K 14 µs (einsum 21).

    The 16K-element cap (rows 64 at D 256) is not measured."""
    return PoolTiles(rows=_checks.row_tile(block_size, head_dim))


def resolve_pool_tiles(tiles, block_size: int, head_dim: int) -> PoolTiles:
    """A pooling kernel's ``tiles`` argument checked against its block size (ValueError unless
    None or a :class:`PoolTiles` whose rows divide block_size); None gives :func:`pool_tiles`."""
    if tiles is None:
        return pool_tiles(block_size, head_dim)
    if not isinstance(tiles, PoolTiles):
        raise ValueError(f"tiles must be a PoolTiles or None, got {type(tiles).__name__}")
    if block_size % tiles.rows:
        raise ValueError(f"tiles.rows={tiles.rows} must divide block_size={block_size}")
    return tiles


def _validate(x, lengths, block_size, tiles) -> PoolTiles:
    """Check the contract (static: shapes, dtypes, Python ints); return the tiles to use."""
    if not _checks.is_int(block_size):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    if not _checks.is_pow2(block_size) or block_size < _MIN_BLOCK_SIZE:
        raise ValueError(
            f"block_size must be a power of two >= {_MIN_BLOCK_SIZE} (a Triton block "
            f"dimension), got {block_size}"
        )
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must be a 4-d array [B, N, H, D], got {x!r:.80}")
    b, n, h, d = x.shape
    if b == 0 or n == 0 or h == 0:
        raise ValueError(f"x must have B, N and H >= 1, got shape {x.shape}")
    if jnp.dtype(x.dtype).name not in _checks.FLOAT_DTYPES:
        raise ValueError(f"x.dtype must be one of {_checks.FLOAT_DTYPES}, got {x.dtype}")
    _checks.check_row_head_dim(d)
    _checks.check_lengths(lengths, b)
    return resolve_pool_tiles(tiles, block_size, d)


def masked_block_means_supported(x, *, block_size: int) -> bool:
    """Whether :func:`masked_block_means` takes ``x`` and ``block_size`` with its default
    tiles (with or without ``lengths``)."""
    return _checks.accepts(_validate, x, None, block_size, None)


def masked_block_means(
    x: jax.Array,
    *,
    block_size: int,
    lengths: jax.Array | None = None,
    tiles: PoolTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """:func:`block_means` of ``x`` with the rows past ``lengths`` zeroed, in one Pallas launch.

    ``out[b, t, h] = Σ_{i in [t * block_size, (t + 1) * block_size)} x'[b, i, h] / block_size``
    with ``x'`` the rows of x, zero at positions ``>= N`` (the zero padding of a partial last
    block, counted) and ``>= lengths[b]``.

    Args:
      x: ``[B, N, H, D]`` (float32, bfloat16 or float16), any N >= 1; D a power of two <= 256.
      block_size: rows per pooled block, a power of two >= 16.
      lengths: None, or ``[B]`` int: rows at positions ``>= lengths[b]`` count as zeros.
      tiles: :class:`PoolTiles`; default :func:`pool_tiles` (block_size, D).
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      ``[B, ceil(N / block_size), H, D]`` float32.

    Raises:
      ValueError: bad rank, dtype, shape, head dim, block size, lengths or tiles.
    """
    tiles = _validate(x, lengths, block_size, tiles)
    return _masked_block_means(
        x,
        None if lengths is None else lengths.astype(jnp.int32),
        block_size=block_size,
        tiles=tiles,
        interpret=_checks.resolve_interpret(interpret),
    )


@functools.partial(jax.jit, static_argnames=("block_size", "tiles", "interpret"))
def _masked_block_means(x, lengths, *, block_size, tiles, interpret):
    b, n, h, d = x.shape
    t = pl.cdiv(n, block_size)
    ragged = lengths is not None
    in_specs = [pl.BlockSpec((None, block_size, None, d), lambda ti, bi, hi: (bi, ti, hi, 0))]
    operands = [x]
    if ragged:
        in_specs.append(pl.BlockSpec((None,), lambda ti, bi, hi: (bi,)))
        operands.append(lengths)
    return pl.pallas_call(
        functools.partial(
            _block_means_kernel, seq_len=n, block_size=block_size, rows=tiles.rows, ragged=ragged
        ),
        out_shape=jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
        grid=(t, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, d), lambda ti, bi, hi: (bi, ti, hi, 0)),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_block_means_b{block_size}_r{tiles.rows}{'_ragged' if ragged else ''}",
    )(*operands)


def _block_means_kernel(x_ref, *refs, seq_len, block_size, rows, ragged):
    """One program: block ``program_id(0)`` of one batch row and head.

    x_ref [block_size, D] (rows past N are outside x: never read); with ``ragged`` a length_ref
    [] int32 (this batch row's length) follows; mean_ref [D] float32.
    """
    if ragged:
        length_ref, mean_ref = refs
    else:
        (mean_ref,) = refs
    d = x_ref.shape[-1]
    block_start = pl.program_id(0) * block_size
    # Static: whether any row of any block can be padding (a partial last block, or lengths).
    masked = ragged or seq_len % block_size != 0
    limit = jnp.minimum(length_ref[...], seq_len) if ragged else seq_len  # first padding row

    def add_rows(i, total):
        tile = x_ref.at[pl.ds(i * rows, rows), :]
        if masked:
            pos = block_start + i * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
            values = plt.load(tile, mask=(pos < limit)[:, None], other=0.0)
        else:
            values = tile[...]
        return total + jnp.sum(values.astype(jnp.float32), axis=0)

    total = lax.fori_loop(0, block_size // rows, add_rows, jnp.zeros((d,), jnp.float32))
    mean_ref[...] = total / block_size
