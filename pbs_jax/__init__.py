"""pbs_jax: Permuted Block-Sparse Attention (arXiv 2510.21270) in JAX — the functional core."""

from pbs_jax.attention import (
    AUTO_BREAK_EVEN,
    IMPLS,
    PBSAux,
    auto_max_density,
    dense_attention,
    dense_continuation_attention,
    kernel_attention,
    pbs_attention,
    pbs_plan,
    validate_chunk,
    validate_inputs,
)
from pbs_jax.blocks import (
    BlockLists,
    density,
    fixed_density_mask,
    index_lists,
    sink_local_mask,
    sink_local_window,
)
from pbs_jax.config import GQA_MODES, SELECTORS, PBSConfig
from pbs_jax.grid import (
    causal_block_count,
    computed_causal_blocks,
    earlier_segment_blocks,
    num_blocks,
    own_segment_blocks,
    segment_blocks,
    softmax_domain,
)
from pbs_jax.permutation import (
    compute_permutation,
    gather_keys,
    identity_permutation,
    inverse_permutation,
    key_importance,
    segment_permutation,
)
from pbs_jax.reference import exact_causal_attention, permuted_block_sparse_attention
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
    "dense_continuation_attention",
    "exact_causal_attention",
    "computed_causal_blocks",
    "earlier_segment_blocks",
    "num_blocks",
    "own_segment_blocks",
    "segment_blocks",
    "softmax_domain",
    "GQA_MODES",
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
    "validate_chunk",
    "validate_inputs",
]
