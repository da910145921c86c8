"""Pallas GPU kernels for pbs-jax: Triton lowering (portable; interpret mode on CPU) and Mosaic
GPU (Hopper: wgmma + TMA).

Public API:
  block_sparse_attention(q, k, v, key_pos, block_ids, full_counts, total_counts, *, ...)
  block_sparse_attention_mgpu(q, k_perm, v_perm, k, v, block_ids, off_counts, *, ...)
  mgpu_supported(q, block_size)           whether the Mosaic GPU kernel can run q here
  block_sparse_attention_reference(...)   same signature, pure jnp (the kernel's oracle)
  TileConfig, DEFAULT_TILES, get_tiles    static tiling and its default table
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_mgpu import block_sparse_attention_mgpu, mgpu_supported
from pallas_kernels.reference import block_sparse_attention_reference
from pallas_kernels.tiles import DEFAULT_TILES, TileConfig, get_tiles

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_mgpu",
    "mgpu_supported",
    "block_sparse_attention_reference",
    "TileConfig",
    "DEFAULT_TILES",
    "get_tiles",
]
