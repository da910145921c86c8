"""The static tiling of the pooled selection kernel (``pallas_kernels.pooled_top_p``): a validated
frozen dataclass, its measured defaults per T and D, and the largest T it takes."""

from __future__ import annotations

import dataclasses

from pallas_kernels import _checks
from pallas_kernels._checks import MIN_DOT_DIM as _MIN_DOT_DIM
from pallas_kernels.top_p import cutoff_search_bits

__all__ = ["MAX_POOLED_BLOCKS", "PooledTopPTiles", "padded_blocks", "pooled_top_p_tiles"]

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
    lists_rows: where :func:`pooled_selection` applies the forced, never-selected and sink
      blocks and compacts the mask into block lists. 0: in the selection kernel itself (one
      launch); a power of two: in a second, lean kernel of that many query blocks per program,
      reading the top-p mask back (those int tiles of a large T_pad next to the selection's
      spill its registers). The results do not depend on it.
    """

    block_rows: int = 16
    depth_chunk: int = 128
    num_warps: int = 4
    num_stages: int = 1
    cuts_per_step: int = 1
    lists_rows: int = 0

    def __post_init__(self):
        for name in ("block_rows", "depth_chunk"):
            _checks.check_pow2_at_least("PooledTopPTiles", name, getattr(self, name), _MIN_DOT_DIM)
        _checks.check_num_warps("PooledTopPTiles", self.num_warps)
        _checks.check_num_stages("PooledTopPTiles", self.num_stages)
        cutoff_search_bits(self.cuts_per_step, "PooledTopPTiles.cuts_per_step")
        if self.lists_rows and not _checks.is_pow2(self.lists_rows):
            raise ValueError(
                f"PooledTopPTiles.lists_rows={self.lists_rows} must be 0 (lists in the "
                "selection kernel) or a power of two (query blocks per lists program)"
            )


def pooled_top_p_tiles(num_blocks: int, head_dim: int) -> PooledTopPTiles:
    """Default tiles for T pooled blocks of head dim D (reasoning below; measured on an H200,
    JAX 0.11.2, 2026-11-30, 32 heads of D 128: experiments/profile_plan.py's sweep,
    results/profile_plan.md).

    * block_rows 16, except 32 at T_pad = 1024: the [16, T_pad] tile is the smallest the dot
      takes, so the register tile stays small at large T (16 × 2048 = 32K floats) and small T
      still gets B·Hq·T_pad/16 programs (128 at T = 64, 32 heads: the selection at 8K is
      latency-bound, so more, shorter programs finish sooner; 32 rows there: 0.093 vs 0.077 ms,
      results/profile_plan.md as committed in cc7de94).
      The cost is re-reading a head's pooled keys once per 16 query blocks, from L2
      (T_pad²·D·4/16 bytes per head): at T_pad = 1024 (128K tokens) 32 rows halve it, 0.99 vs
      1.20 ms (8 warps, depth 16; cc7de94's profile_plan.md); at 2048, 32 rows would hold 64K
      floats in registers (not measured).
    * num_warps 4 while the tile is <= 4K floats (T_pad <= 256: 32 per thread), 8 above (up to
      128 per thread at T_pad = 2048).
    * depth_chunk: the largest power of two <= D with a [T_pad, depth_chunk] float32 operand of
      at most 16K elements (64 KiB of shared memory), never below 16: the whole D up to
      T_pad = 128 at D 128; 16 columns at T_pad 1024 and 2048 (128 KiB at 2048).
    * cuts_per_step 1 (bisection): wider steps lost at 128K on an H200 (results/profile_plan.md as
      committed in d5a10c4, 2026-11-30: 32 rows at 8 warps 0.94 ms with 1 cut, 1.00 with 3, 1.25
      with 7; the search is not latency-bound there), and at 8K the differences are within the
      calls' noise.
    * lists_rows: 0 (one launch) while the tile is <= 4K blocks (T_pad <= 256); 8 above: at
      T_pad = 1024 (H200, 32 heads) the selection kernel took 0.65 ms alone (then 32 µs for the
      second kernel's mask, results/profile_plan.md), 1.30 with the lists in it (its [32, 1024]
      int32 tiles spill; results/profile_plan_lists_in_selection.md) and 0.83 with the forced
      blocks alone (results/profile_plan_forced_in_selection.md).
    """
    t_pad = padded_blocks(num_blocks)
    depth_chunk = min(head_dim, max(_MIN_DOT_DIM, _DOT_CHUNK_ELEMENTS // t_pad))
    return PooledTopPTiles(
        block_rows=32 if t_pad == 1024 else min(16, t_pad),
        depth_chunk=depth_chunk,
        num_warps=4 if t_pad <= 256 else 8,
        num_stages=1,
        lists_rows=0 if t_pad <= 256 else 8,
    )
