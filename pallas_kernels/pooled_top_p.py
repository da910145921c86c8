"""The mean-pooling selector's top-p blocks in one kernel (Pallas/Triton).

Written with XLA, the selection is the pooled logits ``[B, Hq, T, T]`` through HBM, a softmax,
then ~27 masked row sums (the cut-off search of :func:`pallas_kernels.top_p.top_p_blocks`),
each its own kernel launch: at T = 64 blocks (8K tokens) that is launch-bound (0.78 ms on an
H200 for a few KiB of data, with 31 of them). Here one launch does it all, grid ``(row tiles,
B, Hq)``; one program owns ``block_rows`` query blocks of one head:

1. the logits of its pooled query blocks against all ``T_pad`` pooled key blocks of its
   permutation head, ``[block_rows, T_pad]`` float32 in registers, accumulated over the head
   dim in ``depth_chunk`` slices (each dot operand's chunk of keys fits shared memory);
2. the softmax over the allowed blocks (:func:`pallas_kernels.top_p.masked_softmax`; the domain
   comes in as an int8 ``[Tq, T]`` input, so its one definition stays with the caller; Tq < T
   for a chunk's last query blocks);
3. the top-p cut-off by the same search (:func:`pallas_kernels.top_p.top_p_blocks`: a
   ``lax.fori_loop`` of masked row sums over the register tile, ``cuts_per_step`` independent
   ones per step: 27 steps of 1 at T_pad = 1024, τ = 0.88; 14 of 3; 9 of 7);
4. the mask tile, int8.

T is padded to a power of two >= 16 (Triton tensor shapes are powers of two and ``tl.dot``
dimensions >= 16) and Tq to whole row tiles: padded key blocks are outside the domain, padded
query blocks are dropped.
The logits are float32 IEEE dots (HIGHEST precision), as the jnp path's einsum.

The pure-jnp statement of the same contract is
``pallas_kernels.reference.pooled_top_p_blocks_reference``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels._checks import MIN_DOT_DIM as _MIN_DOT_DIM
from pallas_kernels.top_p import cutoff_search_bits, masked_softmax, top_p_blocks

__all__ = [
    "MAX_POOLED_BLOCKS",
    "PooledTopPTiles",
    "pooled_top_p_blocks",
    "pooled_top_p_supported",
    "pooled_top_p_tiles",
]

# The largest T the kernel takes: one program keeps a [block_rows, T_pad] float32 tile in
# registers through the bisection; at 2048 blocks (256K tokens of 128) that is 32K floats,
# 128 per thread at 8 warps. Beyond, callers run the jnp path.
MAX_POOLED_BLOCKS = 2048
# Key elements of one dot step's operand: [T_pad, depth_chunk] float32 goes through shared
# memory (Triton's FMA dot for IEEE float32); 16K floats = 64 KiB leaves room on any GPU.
_DOT_CHUNK_ELEMENTS = 16 * 1024


def padded_blocks(num_blocks: int) -> int:
    """T_pad: the smallest power of two >= max(T, 16)."""
    return max(_MIN_DOT_DIM, 1 << (num_blocks - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class PooledTopPTiles:
    """Static tiling of :func:`pooled_top_p_blocks` (hashable: a jit static argument).

    block_rows:  query blocks per program, a power of two >= 16 (the dot's M); at most T_pad.
    depth_chunk: head-dim columns per dot step, a power of two >= 16 dividing D.
    num_warps, num_stages: Triton launch parameters.
    cuts_per_step: independent masked row sums per step of the top-p cut-off search, one of
      ``pallas_kernels.top_p.CUTS_PER_STEP`` (1: bisection; 3 or 7: 2 or 3 bits per step, so
      half or a third of the dependent steps, each 3 or 7 reductions wide). The mask does not
      depend on it.
    """

    block_rows: int = 16
    depth_chunk: int = 128
    num_warps: int = 4
    num_stages: int = 1
    cuts_per_step: int = 1

    def __post_init__(self):
        for name in ("block_rows", "depth_chunk"):
            _checks.check_pow2_at_least("PooledTopPTiles", name, getattr(self, name), _MIN_DOT_DIM)
        _checks.check_num_warps("PooledTopPTiles", self.num_warps)
        _checks.check_num_stages("PooledTopPTiles", self.num_stages)
        cutoff_search_bits(self.cuts_per_step, "PooledTopPTiles.cuts_per_step")


def pooled_top_p_tiles(num_blocks: int, head_dim: int) -> PooledTopPTiles:
    """Default tiles for T pooled blocks of head dim D (reasoning below; measured on an H200,
    JAX 0.11.2, 2026-11-30, 32 heads of D 128: experiments/profile_plan.py's sweep,
    results/profile_plan.md).

    * block_rows 16, except 32 at T_pad = 1024: the [16, T_pad] tile is the smallest the dot
      takes, so the register tile stays small at large T (16 × 2048 = 32K floats) and small T
      still gets B·Hq·T_pad/16 programs (128 at T = 64, 32 heads: the selection at 8K is
      latency-bound, so more, shorter programs finish sooner; 32 rows there: 0.093 vs 0.077 ms).
      The cost is re-reading a head's pooled keys once per 16 query blocks, from L2
      (T_pad²·D·4/16 bytes per head): at T_pad = 1024 (128K tokens) 32 rows halve it, 0.99 vs
      1.20 ms (8 warps, depth 16); at 2048, 32 rows would hold 64K floats in registers (not
      measured).
    * num_warps 4 while the tile is <= 4K floats (T_pad <= 256: 32 per thread), 8 above (up to
      128 per thread at T_pad = 2048).
    * depth_chunk: the largest power of two <= D with a [T_pad, depth_chunk] float32 operand of
      at most 16K elements (64 KiB of shared memory), never below 16: the whole D up to
      T_pad = 128 at D 128; 16 columns at T_pad 1024 and 2048 (128 KiB at 2048).
    * cuts_per_step 1 (bisection): wider steps lost at 128K on an H200 (results/profile_plan.md,
      2026-11-30: 32 rows at 8 warps 0.94 ms with 1 cut, 1.00 with 3, 1.25 with 7; the search is
      not latency-bound there), and at 8K the differences are within the calls' noise.
    """
    t_pad = padded_blocks(num_blocks)
    depth_chunk = min(head_dim, max(_MIN_DOT_DIM, _DOT_CHUNK_ELEMENTS // t_pad))
    return PooledTopPTiles(
        block_rows=32 if t_pad == 1024 else min(16, t_pad),
        depth_chunk=depth_chunk,
        num_warps=4 if t_pad <= 256 else 8,
        num_stages=1,
    )


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


def pooled_top_p_supported(pooled_q, pooled_k) -> bool:
    """Whether :func:`pooled_top_p_blocks` takes these pooled blocks with its default tiles."""
    return _checks.accepts(_validate, pooled_q, pooled_k, None, None, None)


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
    forced block (sink, own segment) is added: that is the caller's rule.

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
    return _pooled_top_p_blocks(
        pooled_q,
        pooled_k,
        domain,
        threshold=float(threshold),
        tiles=tiles,
        interpret=_checks.resolve_interpret(interpret),
    )


@functools.partial(jax.jit, static_argnames=("threshold", "tiles", "interpret"))
def _pooled_top_p_blocks(pooled_q, pooled_k, domain, *, threshold, tiles, interpret):
    b, tq, hq, d = pooled_q.shape
    t, hp = pooled_k.shape[1], pooled_k.shape[2]
    group = hq // hp
    t_pad = padded_blocks(t)
    bm = tiles.block_rows
    rows_pad = pl.cdiv(tq, bm) * bm  # query blocks, in whole row tiles
    pooled_q = jnp.pad(pooled_q, ((0, 0), (0, rows_pad - tq), (0, 0), (0, 0)))
    pooled_k = jnp.pad(pooled_k, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    # Padded key blocks (and padded query rows, dropped below) are outside the domain.
    allowed = jnp.pad((domain != 0).astype(jnp.int8), ((0, rows_pad - tq), (0, t_pad - t)))

    cuts_suffix = f"_c{tiles.cuts_per_step}" if tiles.cuts_per_step > 1 else ""
    mask = pl.pallas_call(
        functools.partial(
            _pooled_top_p_kernel,
            depth_chunk=tiles.depth_chunk,
            num_depth_chunks=d // tiles.depth_chunk,
            # The divisor of the jnp path (logits / √D, √D rounded to float32 first), so the
            # logits agree with it bit for bit wherever the dots do.
            logit_divisor=float(np.sqrt(np.float32(d))),
            threshold=threshold,
            cuts_per_step=tiles.cuts_per_step,
        ),
        out_shape=jax.ShapeDtypeStruct((b, hq, rows_pad, t_pad), jnp.int8),
        grid=(rows_pad // bm, b, hq),
        in_specs=[
            pl.BlockSpec((None, bm, None, d), lambda r, bi, h: (bi, r, h, 0)),
            # All T_pad key blocks of one permutation head.
            pl.BlockSpec(
                (None, t_pad, None, d), lambda r, bi, h: (bi, 0, _checks.shared_head(h, group), 0)
            ),
            pl.BlockSpec((bm, t_pad), lambda r, bi, h: (r, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bm, t_pad), lambda r, bi, h: (bi, h, r, 0)),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_pooled_top_p_t{t_pad}_m{bm}{cuts_suffix}",
    )(pooled_q, pooled_k, allowed)
    return mask[:, :, :tq, :t] != 0


def _pooled_top_p_kernel(
    q_ref,
    k_ref,
    allowed_ref,
    mask_ref,
    *,
    depth_chunk,
    num_depth_chunks,
    logit_divisor,
    threshold,
    cuts_per_step,
):
    """One program: ``block_rows`` query blocks of one head against all T_pad key blocks.

    q_ref [bm, D], k_ref [T_pad, D] float32; allowed_ref [bm, T_pad] int8; mask_ref [bm, T_pad]
    int8.
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
    allowed = allowed_ref[...] != 0
    probs = masked_softmax(logits / logit_divisor, allowed)
    keep = top_p_blocks(probs, allowed, threshold, cuts_per_step=cuts_per_step)
    mask_ref[...] = keep.astype(jnp.int8)
