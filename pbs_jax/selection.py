"""Block selection: which (query block, key block) pairs are computed (paper App. D.1, Alg. 2).

Every selector is two steps, and only the first differs between selectors:

1. block probabilities ``[B, Hq, Tq, T]``: a distribution over the *allowed* key blocks of each
   query block (:func:`softmax_domain`), from a cheap estimate of the attention;
   - ``"meanpool"`` (PBS-Attn, and the MeanPooling baseline without permutation): softmax of
     mean-pooled query blocks against mean-pooled (permuted) key blocks;
   - ``"antidiagonal"`` (XAttention's scoring; PBS-Attn+ with permutation): softmax of
     stride-sampled anti-diagonal q·k products, its mass summed per block;
2. :func:`select_from_probabilities`: the smallest top-p set reaching the threshold, then the
   forced blocks (the sink and every block of the query's own segment).

The row rules (masked softmax, sort-free top-p) live in ``pallas_kernels.top_p``, so that on
GPU :func:`select_blocks` runs ``"meanpool"``'s logits, softmax, top-p and forced blocks as one
Pallas kernel (``pallas_kernels.pooled_selection``) with the very same rules: the grid's rules
(:func:`with_forced_blocks`' forced and never-selected blocks, the sink) go in as data
(:func:`selection_codes`), and :func:`select_blocks_and_lists` has the same launch write the
mask's block lists too (elsewhere ``pbs_jax.blocks.index_lists`` of the mask).

Every function takes an optional ``lengths [B]`` (a right-padded batch, None: every row has N
tokens): each row's mask is then that row's own, as if run alone on its real tokens, inside
the batch's static grid (``pbs_jax.grid``'s per-row rules), and 0 outside the row's blocks.

Queries may be the last M < N positions (a chunk continuing a cache): the masks are then the
chunk's ``[Tq, T]`` rows of the grid (``pbs_jax.grid``'s ``q_offset = T - Tq``); ``lengths``
with such a chunk is not supported (``pbs_attention`` refuses it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import (
    CODE_DOMAIN,
    CODE_EARLIER,
    CODE_FORCED,
    CODE_NEVER,
    block_means,
    masked_block_means,
    masked_block_means_supported,
    pooled_block_probabilities_reference,
    pooled_selection,
    pooled_top_p_supported,
)
from pallas_kernels.permuted_pooling import permuted_block_means, permuted_block_means_supported
from pallas_kernels.top_p import masked_softmax, top_p_blocks
from pbs_jax.blocks import BlockLists, index_lists
from pbs_jax.config import PBSConfig
from pbs_jax.grid import (
    dense_tail_blocks,
    earlier_segment_blocks,
    num_blocks,
    own_segment_blocks,
    real_block_counts,
    real_blocks,
    softmax_domain,
    zero_padding,
)
from pbs_jax.permutation import gather_keys, inverse_permutation

_HI = jax.lax.Precision.HIGHEST


def mean_pool_blocks(x: jax.Array, block_size: int, lengths: jax.Array | None = None) -> jax.Array:
    """``[B, N, H, D]`` → ``[B, T, H, D]`` float32 block means; zero padding of a partial last
    block is counted in its mean (official semantics); with ``lengths`` rows past a row's length
    count as that zero padding.

    One rule (``pallas_kernels.block_means``), two evaluations: on GPU (shapes
    ``pallas_kernels.masked_block_means_supported`` takes: block_size a power of two >= 16, D a
    power of two) one Pallas kernel reads each block once and masks the rows past N and past
    the lengths in its loads (no zeroed copy, no padded copy); elsewhere the rows past the
    lengths zeroed (``pbs_jax.grid.zero_padding``), then :func:`block_means` in XLA, also the
    kernel's independent oracle.
    """
    if jax.default_backend() == "gpu" and masked_block_means_supported(x, block_size=block_size):
        return masked_block_means(x, block_size=block_size, lengths=lengths)
    if lengths is not None:
        x = zero_padding(x, lengths)
    return block_means(x, block_size)


def pooled_permuted_keys(
    k: jax.Array,
    perm: jax.Array,
    block_size: int,
    segment_size: int,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Block means of the permuted keys without materialising them.

    Args:
      k: ``[B, N, Hkv, D]`` keys in original order; perm: ``[B, Hp, N]``, Hp a multiple of Hkv,
        slots permuted only within segments of ``segment_size`` (a multiple of block_size).
    Returns:
      ``[B, T, Hp, D]`` float32, zero padding of a partial last block counted in its mean (with
      ``lengths``, keys past a row's length are that padding).

    One rule, two evaluations: on GPU (shapes ``pallas_kernels.permuted_block_means_supported``
    takes) one Pallas kernel reads each segment of K once per KV head and gathers the rows of
    every block of slots by the permutation itself (no inverse, no one-hot, no transposed copy
    of K); elsewhere :func:`one_hot_pooled_permuted_keys`, also the kernel's independent oracle.
    """
    if jax.default_backend() == "gpu" and permuted_block_means_supported(
        k, perm, block_size=block_size, segment_size=segment_size
    ):
        return permuted_block_means(
            k, perm, block_size=block_size, segment_size=segment_size, lengths=lengths
        )
    return one_hot_pooled_permuted_keys(k, perm, block_size, segment_size, lengths)


def one_hot_pooled_permuted_keys(
    k: jax.Array,
    perm: jax.Array,
    block_size: int,
    segment_size: int,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """:func:`pooled_permuted_keys` in XLA (the CPU path): blocks never straddle a segment, so
    block t of head p holds the keys whose slot falls in t: invert the permutation (a scatter of
    N ints per head), one-hot each position's block inside its own segment, and contract with
    the unpermuted keys segment by segment. No ``[B, N, Hp, D]`` permuted copy, but on GPU XLA
    transposes K for the contraction (results/profile_plan.json as committed in d5a10c4, before
    the kernel, H200, 128K tokens, 32 permutation heads over 8 KV heads of D 128: 136 µs for that
    transpose and 75 µs for the dot, of a 2.6 ms plan)."""
    if lengths is not None:
        k = zero_padding(k, lengths)
    b, n, hkv, d = k.shape
    hp = perm.shape[1]
    t = num_blocks(n, block_size)
    per_segment = segment_size // block_size
    g = num_blocks(n, segment_size)
    n_pad = g * segment_size
    slot_of_pos = inverse_permutation(perm.astype(jnp.int32))
    # Padding positions sit in their own slots (zero keys: counted, as the official zero-pad).
    slot_of_pos = jnp.pad(slot_of_pos, ((0, 0), (0, 0), (0, n_pad - n)))
    slot_of_pos = slot_of_pos.at[..., n:].set(jnp.arange(n, n_pad, dtype=jnp.int32))
    local_block = (slot_of_pos // block_size) % per_segment  # block index inside the segment
    # 16-bit keys stay 16-bit operands: each product with a one-hot 0/1 is exact and the sums
    # accumulate in float32, the values of the float32 contraction (H200, 8K tokens, 32 heads:
    # 4.1 vs 15.3 µs for the contraction, results/profile_plan_candidates.log); float32 keys need
    # the IEEE dot.
    exact_16bit = k.dtype in (jnp.bfloat16, jnp.float16)
    operand = k.dtype if exact_16bit else jnp.float32
    one_hot = jax.nn.one_hot(local_block, per_segment, dtype=operand)  # [B, Hp, Np, spb]
    one_hot = one_hot.reshape(b, hkv, hp // hkv, g, segment_size, per_segment)
    kg = jnp.pad(k.astype(operand), ((0, 0), (0, n_pad - n), (0, 0), (0, 0)))
    kg = kg.reshape(b, g, segment_size, hkv, d)
    summed = jnp.einsum(
        "bkrgsj,bgskd->bgjkrd",
        one_hot,
        kg,
        precision=None if exact_16bit else jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # [B, G, spb, Hkv, r, D]
    return summed.reshape(b, g * per_segment, hp, d)[:, :t] / block_size


def pooled_blocks(
    q: jax.Array,
    k: jax.Array,
    perm: jax.Array,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    pooled_q: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The MeanPooling selector's inputs: ``pooled_q [B, Tq, Hq, D]`` (:func:`mean_pool_blocks`;
    Tq = T for a whole prefill, the chunk's last Tq blocks for q ``[B, M, Hq, D]``, M < N) and
    ``pooled_k [B, T, Hp, D]`` (:func:`pooled_permuted_keys`; without ``cfg.permute`` perm is
    the identity and they are the keys' own block means), float32; with ``lengths`` the rows
    past a row's length count as its zero padding. A caller that pooled q already (``impl="auto"``:
    its estimate and its plan pool the same queries) passes ``pooled_q``."""
    if pooled_q is None:
        pooled_q = mean_pool_blocks(q, cfg.block_size, lengths)
    if not cfg.permute:  # identity perm: plain block means per KV head
        hp = perm.shape[1]
        pooled_k = jnp.repeat(mean_pool_blocks(k, cfg.block_size, lengths), hp // k.shape[2], 2)
    else:
        pooled_k = pooled_permuted_keys(k, perm, cfg.block_size, cfg.segment_size, lengths)
    return pooled_q, pooled_k


def sink_blocks(perm: jax.Array, num_q_heads: int, cfg: PBSConfig) -> jax.Array:
    """``[B, Hq]`` int32: per query head, the key block whose slots hold original token 0.

    Slots permute only within segments (the identity too), so token 0 sits in the first
    segment: only its ``segment_size`` slots are searched, not the whole row."""
    hp = perm.shape[1]
    slot_of_token0 = jnp.argmax(perm[..., : cfg.segment_size] == 0, axis=-1)  # [B, Hp]
    sink = (slot_of_token0 // cfg.block_size).astype(jnp.int32)
    return jnp.repeat(sink, num_q_heads // hp, axis=1)


def meanpool_block_probabilities(
    q: jax.Array, k: jax.Array, perm: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """The MeanPooling selector's block distribution (paper Alg. 2, step 3).

    Args:
      q: ``[B, M, Hq, D]`` (the last M ≤ N positions); k: ``[B, N, Hkv, D]`` original order;
      perm: ``[B, Hp, N]``.
    Returns:
      ``[B, Hq, Tq, T]`` float32: per query block, the softmax of the pooled logits
      ``pooled_q · pooled_k / √D`` over the allowed key blocks (:func:`softmax_domain`); 0
      elsewhere and on rows with nothing allowed. The statement is
      ``pallas_kernels.pooled_block_probabilities_reference``, the contract of the selection
      kernel :func:`select_blocks` runs on GPU.
    """
    return pooled_block_probabilities(*pooled_blocks(q, k, perm, cfg, lengths), cfg)


def pooled_block_probabilities(
    pooled_q: jax.Array, pooled_k: jax.Array, cfg: PBSConfig
) -> jax.Array:
    """:func:`meanpool_block_probabilities` from its pooled blocks (:func:`pooled_blocks`):
    ``[B, Hq, Tq, T]`` float32, the chunk's last Tq query blocks where Tq < T."""
    tq, t = pooled_q.shape[1], pooled_k.shape[1]
    return pooled_block_probabilities_reference(pooled_q, pooled_k, softmax_domain(t, cfg, t - tq))


def antidiagonal_logits(q: jax.Array, k_slots: jax.Array, stride: int) -> jax.Array:
    """XAttention's strided anti-diagonal scores.

    Strided query row r holds positions ``[r·s, r·s + s)`` and strided key column c slots
    ``[c·s, c·s + s)``; their score sums the s products on the anti-diagonal of that s × s tile:
    ``Σ_m q[r·s + s−1−m] · k[c·s + m] / (√D · s)``.

    Args:
      q: ``[B, Nq, Hq, D]`` (rows from position 0 of this slice); k_slots: ``[B, N, Hp, D]`` keys
        in slot order (query head h reads head ``h // (Hq // Hp)``); Nq and N multiples of
        ``stride``.
    Returns:
      ``[B, Hq, Nq/s, N/s]`` float32.
    """
    b, nq, hq, d = q.shape
    n, hp = k_slots.shape[1], k_slots.shape[2]
    rows, cols = nq // stride, n // stride
    q_reversed = q.astype(jnp.float32).reshape(b, rows, stride, hp, hq // hp, d)[:, :, ::-1]
    k_strided = k_slots.astype(jnp.float32).reshape(b, cols, stride, hp, d)
    logits = jnp.einsum("brmpgd,bcmpd->bpgrc", q_reversed, k_strided, precision=_HI)
    return logits.reshape(b, hq, rows, cols) / (jnp.sqrt(jnp.float32(d)) * stride)


# The anti-diagonal scores of one chunk of query blocks stay under this many bytes: the whole
# [B, Hq, N/s, N/s] float32 matrix would be ~34 GB at 128K tokens, 32 heads, stride 8.
ANTIDIAGONAL_CHUNK_BYTES = 1 << 28


def antidiagonal_block_probabilities(
    q: jax.Array, k: jax.Array, perm: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """The anti-diagonal selector's block distribution (XAttention scoring, over permuted keys).

    Each strided query row takes a softmax of :func:`antidiagonal_logits` over the strided keys
    of the allowed blocks (:func:`softmax_domain`), causal at stride granularity (column ≤ row,
    as XAttention) and without padding; the mass falling in each key block is summed over the
    block's strided rows and renormalised per query block.

    Args:
      q: ``[B, M, Hq, D]`` (the last M ≤ N positions, N - M a multiple of block_size: strided
        rows are numbered from position 0 of the keys); k: ``[B, N, Hkv, D]`` original order;
      perm: ``[B, Hp, N]``.
    Returns:
      ``[B, Hq, Tq, T]`` float32, rows summing to 1 over the allowed blocks (0 if none).
    """
    b, m, hq, _ = q.shape
    n = k.shape[1]
    stride, block = cfg.antidiagonal_stride, cfg.block_size
    t, tq = num_blocks(n, block), num_blocks(m, block)
    first_row = (t - tq) * (block // stride)  # the chunk's first strided row, absolute
    per_block = block // stride
    if lengths is not None:  # a row's padding is its zero pad; its real strides are its own
        q, k = zero_padding(q, lengths), zero_padding(k, lengths)
    # Query blocks are scored a chunk at a time (rows are independent softmaxes), so only one
    # chunk's [B, Hq, C·block/s, N/s] scores exist at once; T is padded to whole chunks.
    row_bytes = b * hq * per_block * t * per_block * 4
    chunk = int(max(1, min(tq, ANTIDIAGONAL_CHUNK_BYTES // row_bytes)))
    num_chunks = num_blocks(tq, chunk)
    q = jnp.pad(
        q.astype(jnp.float32), ((0, 0), (0, num_chunks * chunk * block - m), (0, 0), (0, 0))
    )
    k_slots = jnp.pad(
        gather_keys(k, perm).astype(jnp.float32), ((0, 0), (0, t * block - n), (0, 0), (0, 0))
    )
    columns = jnp.arange(t * per_block)
    real_columns = (columns * stride < n)[None, :]  # strided columns holding a real token
    if lengths is not None:  # [B, 1, 1, N/s]: per row
        real_columns = (columns[None, :] * stride < lengths[:, None])[:, None, None, :]
    allowed = jnp.pad(softmax_domain(t, cfg, t - tq), ((0, num_chunks * chunk - tq), (0, 0)))

    def chunk_mass(c):  # → [B, Hq, chunk, T]
        q_chunk = jax.lax.dynamic_slice_in_dim(q, c * chunk * block, chunk * block, axis=1)
        logits = antidiagonal_logits(q_chunk, k_slots, stride)
        rows = first_row + c * chunk * per_block + jnp.arange(chunk * per_block)
        blocks_allowed = jnp.repeat(
            jnp.repeat(
                jax.lax.dynamic_slice_in_dim(allowed, c * chunk, chunk, axis=0), per_block, 0
            ),
            per_block,
            1,
        )
        domain = blocks_allowed & (columns[None, :] <= rows[:, None]) & real_columns
        real_rows = (rows * stride < n)[:, None]
        if lengths is not None:  # [B, 1, rows, 1]
            real_rows = (rows[None, :] * stride < lengths[:, None])[:, None, :, None]
        probs = jnp.where(real_rows, masked_softmax(logits, domain), 0.0)
        return probs.reshape(b, hq, chunk, per_block, t, per_block).sum(axis=(3, 5))

    mass = jax.lax.map(chunk_mass, jnp.arange(num_chunks))  # [chunks, B, Hq, chunk, T]
    mass = jnp.moveaxis(mass, 0, 2).reshape(b, hq, num_chunks * chunk, t)[:, :, :tq]
    total = mass.sum(axis=-1, keepdims=True)
    return mass / jnp.where(total > 0, total, 1.0)


BLOCK_SCORERS = {
    "meanpool": meanpool_block_probabilities,
    "antidiagonal": antidiagonal_block_probabilities,
}


def block_probabilities(
    q: jax.Array, k: jax.Array, perm: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """``[B, Hq, Tq, T]`` float32 block distribution of ``cfg.selector`` (0 outside the domain);
    q ``[B, M, Hq, D]`` holds the last M ≤ N positions (Tq = T when M = N)."""
    if lengths is None:
        return BLOCK_SCORERS[cfg.selector](q, k, perm, cfg)
    return BLOCK_SCORERS[cfg.selector](q, k, perm, cfg, lengths)


def _grid_forced_blocks(
    t: int, cfg: PBSConfig, lengths: jax.Array | None = None, q_offset: int = 0
) -> jax.Array:
    """``[1 | B, T - q_offset, T]`` bool: the forced blocks that depend on the grid alone (not
    on the permutation): every block of the query's own segment (:func:`own_segment_blocks`)
    and, with ``cfg.dense_tail``, every allowed block of the trailing query blocks
    (:func:`dense_tail_blocks`; with ``lengths`` each row's own last blocks)."""
    forced = own_segment_blocks(t, cfg, q_offset)[None]
    if cfg.dense_tail:
        row_blocks = None if lengths is None else real_block_counts(lengths, cfg.block_size)
        tail = dense_tail_blocks(t, cfg, row_blocks, q_offset)
        forced = forced | (tail[None] if lengths is None else tail)
    return forced


def forced_blocks(
    perm: jax.Array,
    num_q_heads: int,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    q_offset: int = 0,
) -> jax.Array:
    """``[B, Hq | 1, T - q_offset, T]`` bool: blocks every selector computes whatever their
    score (``q_offset``: the query blocks are the last ``T - q_offset``).

    The grid's forced blocks (:func:`_grid_forced_blocks`: the own segment, the dense tail)
    and, with ``cfg.force_sink``, the key block holding original token 0 (:func:`sink_blocks`).
    """
    t = num_blocks(perm.shape[-1], cfg.block_size)
    forced = _grid_forced_blocks(t, cfg, lengths, q_offset)[:, None]
    if cfg.force_sink:
        sink = sink_blocks(perm, num_q_heads, cfg)[:, :, None, None]
        forced = forced | (jnp.arange(t) == sink)
    return forced


def with_forced_blocks(
    top_p_mask: jax.Array, perm: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """``top_p_mask [B, Hq, Tq, T]`` bool | :func:`forced_blocks`: the block mask of a selection
    (Tq < T: a chunk's last Tq query blocks; with ``lengths``, restricted to each row's own
    blocks, :func:`pbs_jax.grid.real_blocks`). :func:`selection_codes` states the same rule as
    the kernel's codes."""
    tq, t = top_p_mask.shape[-2:]
    mask = top_p_mask | forced_blocks(perm, top_p_mask.shape[1], cfg, lengths, t - tq)
    if lengths is None:
        return mask
    return mask & real_blocks(lengths, t, cfg.block_size)[:, None, t - tq :]


def selection_codes(
    perm: jax.Array,
    num_q_heads: int,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    q_offset: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The grid rules of a selection as the selection kernel's data
    (``pallas_kernels.pooled_selection``): ``(codes [1 | B, Tq, T] int8, sink [B, Hq] int32)``.

    codes: ``CODE_DOMAIN`` on :func:`softmax_domain`, ``CODE_FORCED`` on
    :func:`_grid_forced_blocks`, ``CODE_NEVER`` outside a row's own blocks (``lengths``:
    :func:`pbs_jax.grid.real_blocks`), ``CODE_EARLIER`` on the earlier segments' blocks (the
    lists' ``full_counts``); one row per batch row only with ``lengths``. sink: with
    ``cfg.force_sink`` :func:`sink_blocks`, else -1. ``q_offset``: the query blocks are the
    last ``Tq = T - q_offset``. The kernel then applies :func:`with_forced_blocks`' rule.
    """
    t = num_blocks(perm.shape[-1], cfg.block_size)

    def flag(blocks, code):
        return jnp.where(blocks, jnp.int8(code), jnp.int8(0))

    with jax.ensure_compile_time_eval():  # the grid alone: a constant of the compiled plan
        static = flag(softmax_domain(t, cfg, q_offset), CODE_DOMAIN) | flag(
            earlier_segment_blocks(t, cfg, q_offset), CODE_EARLIER
        )
        if lengths is None:
            static = static | flag(_grid_forced_blocks(t, cfg, None, q_offset)[0], CODE_FORCED)
        codes = static[None]
    if lengths is not None:
        never = ~real_blocks(lengths, t, cfg.block_size)[:, q_offset:]
        forced = _grid_forced_blocks(t, cfg, lengths, q_offset)
        codes = codes | flag(forced, CODE_FORCED) | flag(never, CODE_NEVER)
    b = perm.shape[0]
    if cfg.force_sink:
        sink = sink_blocks(perm, num_q_heads, cfg)
    else:
        sink = jnp.full((b, num_q_heads), -1, jnp.int32)
    return codes, sink


def select_from_probabilities(
    probs: jax.Array, perm: jax.Array, cfg: PBSConfig, lengths: jax.Array | None = None
) -> jax.Array:
    """The top-p rule plus the forced blocks, shared by every selector.

    Args:
      probs: ``[B, Hq, Tq, T]`` float32 from :func:`block_probabilities` (Tq < T: the last Tq
        query blocks).
      perm: ``[B, Hp, N]`` original position of each slot.
      lengths: ``[B]`` (a right-padded batch) or None: blocks outside a row's own grid
        (:func:`pbs_jax.grid.real_blocks`) are never selected.
    Returns:
      ``block_mask [B, Hq, Tq, T]`` bool.
    """
    t = probs.shape[-1]
    mask = top_p_blocks(probs, softmax_domain(t, cfg, t - probs.shape[-2]), float(cfg.threshold))
    return with_forced_blocks(mask, perm, cfg, lengths)


def _select(q, k, perm, cfg: PBSConfig, lengths, pooled_q, with_lists: bool):
    """``(block_mask, lists)``: lists where the selection kernel wrote them (``with_lists`` on
    its path), else None. The one branching of :func:`select_blocks` and
    :func:`select_blocks_and_lists` (arguments as theirs)."""
    if cfg.selector == "meanpool" and jax.default_backend() == "gpu":
        pooled_q, pooled_k = pooled_blocks(q, k, perm, cfg, lengths, pooled_q)
        if pooled_top_p_supported(pooled_q, pooled_k):
            tq, t = pooled_q.shape[1], pooled_k.shape[1]
            codes, sink = selection_codes(perm, pooled_q.shape[2], cfg, lengths, t - tq)
            selected = pooled_selection(
                pooled_q, pooled_k, codes, sink, float(cfg.threshold), with_lists=with_lists
            )
            lists = None
            if with_lists:
                lists = BlockLists(selected.ids, selected.full_counts, selected.total_counts)
            return selected.mask, lists
        probs = pooled_block_probabilities(pooled_q, pooled_k, cfg)
    else:
        probs = block_probabilities(q, k, perm, cfg, lengths)
    return select_from_probabilities(probs, perm, cfg, lengths), None


def select_blocks(
    q: jax.Array,
    k: jax.Array,
    perm: jax.Array,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    pooled_q: jax.Array | None = None,
) -> jax.Array:
    """The PBS block mask of ``cfg.selector``.

    Args:
      q: ``[B, M, Hq, D]`` queries (original order), the last M ≤ N positions.
      k: ``[B, N, Hkv, D]`` keys (original order; read in slot order through ``perm``).
      perm: ``[B, Hp, N]`` original position of each slot.
      lengths: ``[B]`` int32 real tokens per row (right padding), or None: all N.
      pooled_q: ``[B, Tq, Hq, D]`` float32, :func:`mean_pool_blocks` of q (with ``lengths``)
        where the caller holds them, or None: pooled here. Only ``"meanpool"`` reads them.
    Returns:
      ``block_mask [B, Hq, Tq, T]`` bool, T = ceil(N / block_size), Tq = ceil(M / block_size):
      only the chunk's query blocks are scored (never a T × T grid for a chunk).

    One rule, two evaluations for ``"meanpool"``: on GPU the Pallas kernel
    ``pallas_kernels.pooled_selection`` (logits, softmax, top-p and the forced blocks of
    :func:`selection_codes` in one launch) for the pooled blocks it takes (T up to
    ``pallas_kernels.MAX_POOLED_BLOCKS``; a chunk's Tq < T rows too); elsewhere, and for every
    other selector, :func:`block_probabilities` then :func:`select_from_probabilities` in jnp.
    """
    return _select(q, k, perm, cfg, lengths, pooled_q, with_lists=False)[0]


def select_blocks_and_lists(
    q: jax.Array,
    k: jax.Array,
    perm: jax.Array,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    pooled_q: jax.Array | None = None,
) -> tuple[jax.Array, BlockLists]:
    """:func:`select_blocks`' mask and its block lists (the attention kernels' input):
    ``(block_mask [B, Hq, Tq, T] bool, BlockLists)``, arguments as :func:`select_blocks`.

    Where :func:`select_blocks` runs the selection kernel (GPU, ``"meanpool"``), the same
    launch writes the lists; elsewhere they are ``pbs_jax.blocks.index_lists`` of the mask.
    """
    mask, lists = _select(q, k, perm, cfg, lengths, pooled_q, with_lists=True)
    return mask, (index_lists(mask, cfg) if lists is None else lists)
