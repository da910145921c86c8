"""pbs_jax: Permuted Block-Sparse Attention (arXiv 2510.21270) in JAX — the functional core."""

from pbs_jax.attention import (
    AUTO_BREAK_EVEN,
    IMPLS,
    PBSAux,
    auto_max_density,
    dense_attention,
    kernel_attention,
    pbs_attention,
    pbs_plan,
    validate_inputs,
)
from pbs_jax.blocks import (
    BlockLists,
    causal_block_count,
    density,
    fixed_density_mask,
    index_lists,
    sink_local_mask,
    sink_local_window,
)
from pbs_jax.config import SELECTORS, PBSConfig
from pbs_jax.permutation import (
    compute_permutation,
    gather_keys,
    identity_permutation,
    inverse_permutation,
    key_importance,
    segment_permutation,
)
from pbs_jax.reference import dense_causal_attention, permuted_block_sparse_attention
from pbs_jax.selection import block_probabilities, select_blocks, select_from_probabilities

__all__ = [
    "AUTO_BREAK_EVEN",
    "BlockLists",
    "IMPLS",
    "PBSAux",
    "PBSConfig",
    "SELECTORS",
    "auto_max_density",
    "block_probabilities",
    "causal_block_count",
    "compute_permutation",
    "dense_attention",
    "dense_causal_attention",
    "density",
    "fixed_density_mask",
    "gather_keys",
    "identity_permutation",
    "index_lists",
    "inverse_permutation",
    "kernel_attention",
    "key_importance",
    "pbs_attention",
    "pbs_plan",
    "permuted_block_sparse_attention",
    "segment_permutation",
    "select_blocks",
    "select_from_probabilities",
    "sink_local_mask",
    "sink_local_window",
    "validate_inputs",
]
