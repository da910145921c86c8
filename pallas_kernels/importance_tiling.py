"""The static tiling of the proxy importance passes (``pallas_kernels.importance``): a validated
frozen dataclass and its measured defaults per dtype."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels._checks import largest_pow2_divisor

__all__ = ["ImportanceTiles", "importance_tiles"]


@dataclasses.dataclass(frozen=True)
class ImportanceTiles:
    """Static tiling of the two importance passes (hashable: a jit static argument).

    block_rows: proxy rows per logits tile (pass 1: rows per program; pass 2: rows per loop
                step). Must divide P.
    block_keys: keys per logits tile (pass 1: keys per loop step; pass 2: keys per program).
                Must divide L.
    column_tiles: key tiles of one pass-2 program (a power of two >= 1; ``block_keys ·
                column_tiles`` must divide L): more than one amortises the program's launch
                and its loads of the proxy rows over more keys where pass 2 is latency-bound
                (short L: at 8K keys, 32 heads and 64-key tiles, 4096 programs of one small dot
                each).
    split_keys: keys walked by one pass-1 program; L / split_keys splits (the last one may be
                short) give the grid enough programs at long L while the partial statistics
                stay small (``B·Hq·(L/split_keys)·P`` pairs of floats). A multiple of
                block_keys. 1024: at 8K keys, 32 heads and one proxy block pass 1 has 256
                programs of 8 tiles (4096 gave 64 programs walking 32 tiles each: 0.25 ms
                for the whole proxy on an H200, latency-bound).
    num_warps, num_stages: Triton launch parameters of both passes.

    Tiles are powers of two >= 16: Triton's ``tl.dot`` needs every dimension >= 16 and every
    tensor dimension a power of two. The logits tile ``block_rows × block_keys`` float32 lives
    in registers: 128 × 128 is 64 floats per thread at 8 warps.
    """

    block_rows: int = 128
    block_keys: int = 128
    split_keys: int = 1024
    num_warps: int = 8
    num_stages: int = 2
    column_tiles: int = 1

    def __post_init__(self):
        for name in ("block_rows", "block_keys", "split_keys"):
            _checks.check_pow2_at_least(
                "ImportanceTiles", name, getattr(self, name), _checks.MIN_DOT_DIM
            )
        if self.split_keys < self.block_keys:
            raise ValueError(
                f"ImportanceTiles.split_keys={self.split_keys} must be a multiple of "
                f"block_keys={self.block_keys} (a split walks whole key tiles)"
            )
        _checks.check_pow2_at_least("ImportanceTiles", "column_tiles", self.column_tiles, 1)
        _checks.check_num_warps("ImportanceTiles", self.num_warps)
        _checks.check_num_stages("ImportanceTiles", self.num_stages)


# 16-bit: measured on an H200 (JAX 0.11.2, 2026-11-30, 32/8 heads of 128, bf16, one proxy block;
# GPU time of both passes and their combine, the columns pass computing keys × rows tiles;
# results/explore_columns_transposed.log): 128
# rows × 128 keys at 8 warps, two key tiles per pass-2 program, 53.0 µs at 8K keys (one tile:
# 55.8; 4 warps: 58.8; 64-key tiles at 4 warps, the previous default: 62.4), and one tile at 8
# warps 821 µs at 128K (64-key tiles at 4 warps: 824). Splits of 512 keys: chosen before the
# transposed columns pass (experiments/profile_plan.py's sweep, results/profile_plan.md as
# committed in d5a10c4: 128K, one proxy block, 1.30 ms wall vs 1.35 with 1024-key splits). The
# sweep after it (results/profile_plan_transposed.md, each config's wall time jitted alone) had
# 1024-key splits faster at 128K (0.945 vs 1.164 ms paper rule, 3.409 vs 3.549 default rule) and
# not at 8K (0.144 vs 0.140); those wall sweeps move by ~10% between runs of one configuration
# (1.304 vs 1.244 ms in d5a10c4), so the split stays until a GPU profile of the plan decides it.
# float32: 64 × 64 at 4 warps, not measured (IEEE dots, twice the register bytes per element).
_DEFAULT_TILES = {
    "bfloat16": ImportanceTiles(
        128, 128, split_keys=512, num_warps=8, num_stages=2, column_tiles=2
    ),
    "float16": ImportanceTiles(128, 128, split_keys=512, num_warps=8, num_stages=2, column_tiles=2),
    "float32": ImportanceTiles(64, 64, num_warps=4, num_stages=2),
}


def importance_tiles(num_rows: int, num_keys: int, dtype) -> ImportanceTiles:
    """Default tiles for P proxy rows and L keys of ``dtype``, shrunk (never grown) to divide
    P and L: block_rows divides P, block_keys · column_tiles divides L. A pass-2 program that
    walks several row tiles (P > block_rows) owns one key tile: it is long enough already
    (H200, 8K keys, P = 512, results/profile_plan_transposed.md: 0.325 ms for both passes with
    one key tile, 0.353 with two; 3.20 vs 3.55 ms at 128K), while at one row tile two key tiles
    win (0.140 vs 0.164 ms at 8K).

    Raises:
      ValueError: P or L not a multiple of 16 (no valid Triton tile divides it).
    """
    name = jnp.dtype(dtype).name
    base = _DEFAULT_TILES.get(name, _DEFAULT_TILES["float32"])
    for what, n in (("P (proxy rows)", num_rows), ("L (keys)", num_keys)):
        if n <= 0 or n % 16:
            raise ValueError(f"proxy_importance needs {what} a positive multiple of 16, got {n}")
    block_keys = largest_pow2_divisor(num_keys, base.block_keys)
    block_rows = largest_pow2_divisor(num_rows, base.block_rows)
    column_tiles = base.column_tiles if num_rows == block_rows else 1
    return dataclasses.replace(
        base,
        block_rows=block_rows,
        block_keys=block_keys,
        column_tiles=largest_pow2_divisor(num_keys // block_keys, column_tiles),
    )
