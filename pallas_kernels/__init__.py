"""Pallas GPU kernels for pbs-jax (Triton lowering; interpret mode on CPU).

Public API:
  block_sparse_attention(q, k, v, key_pos, block_ids, full_counts, total_counts, *, ...)
  block_sparse_attention_reference(...)   same signature, pure jnp (the kernel's oracle)
  TileConfig, DEFAULT_TILES, get_tiles    static tiling and its default table
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.reference import block_sparse_attention_reference
from pallas_kernels.tiles import DEFAULT_TILES, TileConfig, get_tiles

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "TileConfig",
    "DEFAULT_TILES",
    "get_tiles",
]
