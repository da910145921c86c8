"""Tile configurations for the block-sparse attention kernel (Pallas, Triton lowering).

A tile config is static kernel configuration: it is hashable (frozen dataclass) so it can be a
`jax.jit` static argument. `DEFAULT_TILES` holds starting points (see the comment above it);
`experiments/tune_kernel.py` sweeps the grid on an H100 and the table is meant to be updated
from its output.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import _checks

__all__ = ["TileConfig", "DEFAULT_TILES", "get_tiles"]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static tiling of one kernel program.

    block_m:    query rows per program. Must divide `block_size`; when smaller, several programs
                share one logical query block (and its block list).
    block_n:    key slots per inner step. Must divide `block_size`; each listed logical kv block
                is walked in `block_size // block_n` sub-tiles.
    num_warps:  Triton warps per program.
    num_stages: Triton software-pipelining depth of the inner loops.

    block_m and block_n must be powers of two >= 16 (Triton's `tl.dot` needs M, N, K >= 16 and
    every tensor dimension a power of two).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            _checks.check_pow2_at_least(
                "TileConfig", name, getattr(self, name), _checks.MIN_DOT_DIM
            )
        _checks.check_num_warps("TileConfig", self.num_warps)
        _checks.check_num_stages("TileConfig", self.num_stages)

    def check_divides(self, block_size: int) -> None:
        """Raise ValueError unless block_m and block_n divide `block_size`."""
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if block_size % val:
                raise ValueError(
                    f"tiles.{name}={val} must divide block_size={block_size} "
                    "(each logical block is walked in whole tiles)"
                )


# Keyed by (head_dim, dtype name, gather_kv). Measured by `experiments/tune_kernel.py`
# (experiments/results/tune_kernel.md: H200, JAX 0.11.2, B=1 Hq=32 Hk=8 bf16, 100% density,
# N=8192 and 32768, 36 tiles each): D=128 with the in-kernel gather is fastest at 128/128/8/3
# (0.70x cuDNN at 32K); contiguous (already permuted) K/V at 128/64/4/2 (0.77x). D=64 from one
# probe (64/64/4/3 at 0.69-0.73x). fp32 (tests, IEEE dots) uses small tiles to stay in registers.
DEFAULT_TILES: dict[tuple[int, str, bool], TileConfig] = {
    (64, "bfloat16", True): TileConfig(64, 64, num_warps=4, num_stages=3),
    (64, "bfloat16", False): TileConfig(64, 64, num_warps=4, num_stages=3),
    (64, "float16", True): TileConfig(64, 64, num_warps=4, num_stages=3),
    (64, "float16", False): TileConfig(64, 64, num_warps=4, num_stages=3),
    (64, "float32", True): TileConfig(64, 32, num_warps=4, num_stages=2),
    (64, "float32", False): TileConfig(64, 32, num_warps=4, num_stages=2),
    (128, "bfloat16", True): TileConfig(128, 128, num_warps=8, num_stages=3),
    (128, "bfloat16", False): TileConfig(128, 64, num_warps=4, num_stages=2),
    (128, "float16", True): TileConfig(128, 128, num_warps=8, num_stages=3),
    (128, "float16", False): TileConfig(128, 64, num_warps=4, num_stages=2),
    (128, "float32", True): TileConfig(64, 32, num_warps=4, num_stages=2),
    (128, "float32", False): TileConfig(64, 32, num_warps=4, num_stages=2),
}


def get_tiles(
    head_dim: int, dtype, block_size: int | None = None, gather_kv: bool = True
) -> TileConfig:
    """Default tiles for (head_dim, dtype, gather_kv), shrunk to divide `block_size` if given.

    Head dims missing from the table fall back to a size-based guess.
    """
    name = jnp.dtype(dtype).name
    tiles = DEFAULT_TILES.get((int(head_dim), name, bool(gather_kv)))
    if tiles is None:
        small = head_dim <= 64 and name != "float32"
        tiles = TileConfig(
            128 if small else 64,
            64 if name != "float32" else 32,
            num_warps=4,
            num_stages=2 if head_dim > 128 else 3,
        )
    if block_size is not None:
        # Shrink (never grow) to a divisor of block_size; both are powers of two.
        tiles = dataclasses.replace(
            tiles, block_m=min(tiles.block_m, block_size), block_n=min(tiles.block_n, block_size)
        )
    return tiles
