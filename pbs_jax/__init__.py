"""pbs_jax: Permuted Block-Sparse Attention (arXiv 2510.21270) in JAX — the functional core."""

from pbs_jax.attention import (AUTO_BREAK_EVEN, IMPLS, PBSAux, auto_max_density, dense_attention,
                               kernel_attention, pbs_attention, pbs_plan, validate_inputs)
from pbs_jax.blocks import (BlockLists, causal_block_count, density, fixed_density_mask,
                            index_lists, sink_local_mask, sink_local_window)
from pbs_jax.config import SELECTORS, PBSConfig
from pbs_jax.permutation import (compute_permutation, gather_keys, identity_permutation,
                                 key_importance, segment_permutation)
from pbs_jax.reference import dense_causal_attention, permuted_block_sparse_attention
from pbs_jax.selection import block_probabilities, select_blocks, select_from_probabilities

__all__ = [
    "AUTO_BREAK_EVEN", "BlockLists", "IMPLS", "auto_max_density", "dense_attention", "PBSAux", "PBSConfig", "causal_block_count", "compute_permutation",
    "dense_causal_attention", "density", "fixed_density_mask", "gather_keys",
    "identity_permutation", "index_lists", "kernel_attention", "key_importance", "pbs_attention", "pbs_plan",
    "permuted_block_sparse_attention", "segment_permutation", "select_blocks",
    "validate_inputs", "SELECTORS", "block_probabilities", "select_from_probabilities",
    "sink_local_mask", "sink_local_window",
]
