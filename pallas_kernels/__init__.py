"""Pallas GPU kernels for pbs-jax: Triton lowering (portable; interpret mode on CPU) and Mosaic
GPU (Hopper: wgmma + TMA). They know block lists and key positions, not permutations.

Public API:
  planned_attention(q, k, v, key_pos, block_ids, full_counts, total_counts, *, block_size,
                    segment_blocks)     THE entry: picks the kernel, prepares its inputs
  slot_order(x, key_pos)                rows of x in slot order, per permutation head
  block_sparse_attention(...)           the Triton kernel
  block_sparse_attention_mgpu(...)      the Mosaic GPU kernel
  mgpu_supported(q, block_size)         whether the Mosaic GPU kernel can run q here
  proxy_importance(q_proxy, k)          the planner's key importance, logits never in HBM
  proxy_importance_supported(q_proxy, k)  whether proxy_importance takes these operands
  ImportanceTiles, importance_tiles     proxy_importance's static tiling and its default
  FLOAT_DTYPES                          the input dtypes every kernel and the op take (names)
  block_means(x, block_size)            block means, zero padding of a partial block counted
  masked_block_means(x, *, block_size, lengths)
                                        block_means with rows past lengths zeroed, one launch
                                        (the planner's pooled queries on GPU)
  masked_block_means_supported(x, *, block_size)  whether masked_block_means takes them
  PoolTiles, pool_tiles                 the static tiling of masked_block_means and
                                        permuted_block_means, and its default
  zero_past_lengths(x, lengths, start)  x with the rows at positions >= lengths[b] zeroed
  pooled_top_p_blocks(pooled_q, pooled_k, domain, threshold)
                                        the meanpool selector's top-p mask in one launch
  pooled_selection(pooled_q, pooled_k, codes, sink, threshold)
                                        a whole selection in one launch: top-p, forced and
                                        never blocks (CODE_* bit flags), mask and block lists
  PooledSelection, CODE_DOMAIN, CODE_FORCED, CODE_NEVER, CODE_EARLIER
                                        its result and its codes' bit flags
  pooled_top_p_supported(pooled_q, pooled_k)  whether those two take these operands
  PooledTopPTiles, pooled_top_p_tiles, MAX_POOLED_BLOCKS  its static tiling, default, largest T
  permuted_block_means(k, perm, *, block_size, segment_size, lengths)
                                        block means of the keys in slot order, K read once
  permuted_block_means_supported(k, perm, ...)  whether permuted_block_means takes them
  masked_softmax, top_p_blocks          the selection's row rules (kernel bodies and jnp alike)
  block_sparse_attention_reference(...), block_sparse_attention_mgpu_reference(...),
  proxy_importance_reference(...), pooled_top_p_blocks_reference(...),
  pooled_selection_reference(...), pooled_block_probabilities_reference(...)
                                        pure-jnp oracles of the kernels' contracts
  permuted_block_means_reference(...)  and of permuted_block_means'
  TileConfig, DEFAULT_TILES, get_tiles  the Triton kernel's static tiling and its table
"""

from pallas_kernels._checks import FLOAT_DTYPES
from pallas_kernels.block_lists import CODE_DOMAIN, CODE_EARLIER, CODE_FORCED, CODE_NEVER
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_mgpu import block_sparse_attention_mgpu, mgpu_supported
from pallas_kernels.importance import (
    ImportanceTiles,
    importance_tiles,
    proxy_importance,
    proxy_importance_supported,
)
from pallas_kernels.permuted_pooling import (
    permuted_block_means,
    permuted_block_means_supported,
)
from pallas_kernels.planned import planned_attention, slot_order
from pallas_kernels.pooled_top_p import (
    MAX_POOLED_BLOCKS,
    PooledSelection,
    PooledTopPTiles,
    pooled_selection,
    pooled_top_p_blocks,
    pooled_top_p_supported,
    pooled_top_p_tiles,
)
from pallas_kernels.pooling import (
    PoolTiles,
    block_means,
    masked_block_means,
    masked_block_means_supported,
    pool_tiles,
    zero_past_lengths,
)
from pallas_kernels.reference import (
    block_sparse_attention_mgpu_reference,
    block_sparse_attention_reference,
    permuted_block_means_reference,
    pooled_block_probabilities_reference,
    pooled_selection_reference,
    pooled_top_p_blocks_reference,
    proxy_importance_reference,
)
from pallas_kernels.tiles import DEFAULT_TILES, TileConfig, get_tiles
from pallas_kernels.top_p import masked_softmax, top_p_blocks

__all__ = [
    "planned_attention",
    "slot_order",
    "block_sparse_attention",
    "block_sparse_attention_mgpu",
    "mgpu_supported",
    "block_sparse_attention_reference",
    "block_sparse_attention_mgpu_reference",
    "proxy_importance",
    "proxy_importance_supported",
    "proxy_importance_reference",
    "ImportanceTiles",
    "importance_tiles",
    "FLOAT_DTYPES",
    "block_means",
    "masked_block_means",
    "masked_block_means_supported",
    "PoolTiles",
    "pool_tiles",
    "zero_past_lengths",
    "pooled_top_p_blocks",
    "pooled_top_p_supported",
    "pooled_top_p_blocks_reference",
    "pooled_selection",
    "pooled_selection_reference",
    "PooledSelection",
    "CODE_DOMAIN",
    "CODE_FORCED",
    "CODE_NEVER",
    "CODE_EARLIER",
    "pooled_block_probabilities_reference",
    "permuted_block_means",
    "permuted_block_means_supported",
    "permuted_block_means_reference",
    "PooledTopPTiles",
    "pooled_top_p_tiles",
    "MAX_POOLED_BLOCKS",
    "masked_softmax",
    "top_p_blocks",
    "TileConfig",
    "DEFAULT_TILES",
    "get_tiles",
]
