"""Pure-jnp oracles of the kernels' contracts: `block_sparse_attention` (Triton),
`block_sparse_attention_mgpu` (Mosaic GPU), `proxy_importance`, `pooled_top_p_blocks`,
`pooled_selection` and `permuted_block_means`, each with its kernel's signature and semantics.

It expands the block lists into a dense [B, Hq, N, N] boolean over (query row, key slot),
applies the token mask, and runs an fp32 softmax. O(B * Hq * N^2) memory: for tests and small
inputs only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _checks
from pallas_kernels.block_lists import CODE_DOMAIN, CODE_EARLIER, CODE_FORCED, CODE_NEVER
from pallas_kernels.planned import slot_order
from pallas_kernels.pooling import block_means, zero_past_lengths
from pallas_kernels.top_p import masked_softmax, top_p_blocks

__all__ = [
    "block_sparse_attention_reference",
    "block_sparse_attention_mgpu_reference",
    "proxy_importance_reference",
    "pooled_block_probabilities_reference",
    "pooled_top_p_blocks_reference",
    "pooled_selection_reference",
    "permuted_block_means_reference",
]


def block_sparse_attention_reference(
    q,
    k,
    v,
    key_pos,
    block_ids,
    full_counts,
    total_counts,
    *,
    block_size: int = 128,
    gather_kv: bool = True,
    sm_scale: float | None = None,
    tiles=None,
    interpret: bool | None = None,
) -> jax.Array:
    """Dense reference of the block-sparse attention kernel.

    Args and semantics as `pallas_kernels.block_sparse_attention`; `tiles` and `interpret` are
    accepted for signature compatibility and ignored. Query rows with no allowed key give zeros.

    Shapes: q [B, M, Hq, D] (the last M <= N positions); k, v [B, N, Hk, D]; key_pos [B, Hp, N];
    block_ids [B, Hq, Tq, Kmax]; full_counts, total_counts [B, Hq, Tq]. Returns [B, M, Hq, D].
    """
    del tiles, interpret
    dims = _checks.validate(
        q,
        k,
        v,
        key_pos,
        block_ids,
        full_counts,
        total_counts,
        block_size=block_size,
        sm_scale=sm_scale,
    )
    sm_scale = _checks.softmax_scale(dims.head_dim, sm_scale)
    return _reference(
        q,
        k,
        v,
        key_pos.astype(jnp.int32),
        block_ids.astype(jnp.int32),
        full_counts.astype(jnp.int32),
        total_counts.astype(jnp.int32),
        block_size=int(block_size),
        gather_kv=bool(gather_kv),
        sm_scale=float(sm_scale),
    )


def _listed_slots(block_ids, first, stop, *, num_rows: int, num_slots: int, block_size: int):
    """Which key slots each query row sees through the list entries ``[first, stop)`` of its
    query block, ``[B, Hq, M, N]`` bool (M = ``num_rows``, N = ``num_slots``).

    block_ids ``[B, Hq, Tq, Kmax]``; first, stop: ints or ``[B, Hq, Tq]``. Entries outside
    ``[first, stop)`` are ignored, so garbage there never matters; ids outside ``[0, Tk)`` match
    nothing.
    """
    t_kv = -(-num_slots // block_size)
    e = jnp.arange(block_ids.shape[3])
    in_part = (e >= jnp.asarray(first)[..., None]) & (e < jnp.asarray(stop)[..., None])
    onehot = block_ids[..., None] == jnp.arange(t_kv)  # [B,Hq,Tq,K,Tk]
    listed = jnp.any(onehot & in_part[..., None], axis=3)  # [B,Hq,Tq,Tk]
    q_blk = jnp.arange(num_rows) // block_size
    k_blk = jnp.arange(num_slots) // block_size
    return listed[:, :, q_blk][:, :, :, k_blk]


@functools.partial(jax.jit, static_argnames=("block_size", "gather_kv", "sm_scale"))
def _reference(
    q, k, v, key_pos, block_ids, full_counts, total_counts, *, block_size, gather_kv, sm_scale
):
    b, m, hq, d = q.shape
    n, hk, hp = k.shape[1], k.shape[2], key_pos.shape[1]

    # The slots of each list part, per (query row i, key slot j): [B, Hq, M, N].
    listed = functools.partial(_listed_slots, num_rows=m, num_slots=n, block_size=block_size)
    full_tok = listed(block_ids, 0, full_counts)
    masked_tok = listed(block_ids, full_counts, total_counts)
    kp = key_pos[:, jnp.arange(hq) // (hq // hp)]  # [B, Hq, N]
    q_pos = jnp.arange(n - m, n)  # the queries are the last M positions
    causal = kp[:, :, None, :] <= q_pos[None, None, :, None]  # key_pos <= q_pos
    allowed = full_tok | (masked_tok & causal)

    # Keys and values per (query head, slot): gathered by key_pos, or already permuted.
    kv_head = jnp.arange(hq) // (hq // hk)
    kh = k[:, :, kv_head].astype(jnp.float32)  # [B, N, Hq, D]
    vh = v[:, :, kv_head].astype(jnp.float32)
    if gather_kv:
        idx = jnp.swapaxes(kp, 1, 2)[..., None]  # [B, N, Hq, 1]
        kh = jnp.take_along_axis(kh, idx, axis=1)
        vh = jnp.take_along_axis(vh, idx, axis=1)

    logits = (
        jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), kh, precision=lax.Precision.HIGHEST)
        * sm_scale
    )
    logits = jnp.where(allowed, logits, -jnp.inf)
    row_any = jnp.any(allowed, axis=-1, keepdims=True)
    m = jnp.max(jnp.where(row_any, logits, 0.0), axis=-1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(row_any, denom, 1.0)  # empty row -> zeros
    out = jnp.einsum("bhij,bjhd->bihd", p, vh, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)


def block_sparse_attention_mgpu_reference(
    q,
    k_perm,
    v_perm,
    k,
    v,
    block_ids,
    off_counts,
    *,
    block_size: int = 128,
    segment_blocks: int = 2,
    sm_scale: float | None = None,
) -> jax.Array:
    """Dense reference of the Mosaic GPU kernel's contract (same signature, any dtype, any N).

    Query row i, at position p = N - M + i (the queries are the last M of the N positions, N - M
    a multiple of block_size), of local block qb = i // block_size attends (1) every slot of the
    listed blocks ``block_ids[b, h, qb, :off_counts]`` of ``k_perm``/``v_perm`` (slot order, no
    mask) and (2) the keys ``[own_start, p]`` of ``k``/``v`` in *original* order, own_start the
    first token of p's segment of ``segment_blocks`` blocks (a plain causal mask). Query head h
    reads permuted head ``h // (Hq // Hp)`` and original head ``h // (Hq // Hkv)``.

    Shapes: q [B, M, Hq, D]; k_perm, v_perm [B, N, Hp, D]; k, v [B, N, Hkv, D];
    block_ids [B, Hq, Tq, Kmax]; off_counts [B, Hq, Tq]. Returns [B, M, Hq, D] in q's dtype.
    """
    b, m, hq, d = q.shape
    n, hp, hkv = k.shape[1], k_perm.shape[2], k.shape[2]
    scale = _checks.softmax_scale(d, sm_scale)
    # Listed earlier blocks over rows and slots: [B, Hq, M, N].
    listed = _listed_slots(block_ids, 0, off_counts, num_rows=m, num_slots=n, block_size=block_size)
    pos = jnp.arange(n - m, n)[:, None]  # [M, 1] original positions of the queries
    own_start = pos // (segment_blocks * block_size) * (segment_blocks * block_size)
    own = (jnp.arange(n)[None, :] >= own_start) & (jnp.arange(n)[None, :] <= pos)  # [M, N]

    def heads(x, h_src):  # [B, N, H_src, D] → [B, N, Hq, D] f32
        return x[:, :, jnp.arange(hq) // (hq // h_src)].astype(jnp.float32)

    qf = q.astype(jnp.float32)
    kk = jnp.concatenate([heads(k_perm, hp), heads(k, hkv)], axis=1)  # [B, 2N, Hq, D]
    vv = jnp.concatenate([heads(v_perm, hp), heads(v, hkv)], axis=1)
    allowed = jnp.concatenate([listed, jnp.broadcast_to(own, listed.shape)], axis=-1)
    logits = jnp.einsum("bihd,bjhd->bhij", qf, kk, precision=lax.Precision.HIGHEST) * scale
    p = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)  # every row sees itself
    out = jnp.einsum("bhij,bjhd->bihd", p, vv, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)


def proxy_importance_reference(
    q_proxy: jax.Array,
    k: jax.Array,
    real_rows: jax.Array | None = None,
    real_keys: jax.Array | None = None,
) -> jax.Array:
    """Mean softmax probability that each key receives from the proxy rows, per query head.

    The contract of ``pallas_kernels.proxy_importance`` (any shapes and dtypes here), and the
    planner's importance proxy off GPU: the logits ``[B, Hkv, G, P, L]`` are materialised.

    Args:
      q_proxy: ``[B, P, Hq, D]``; k: ``[B, L, Hkv, D]``, Hq a multiple of Hkv (query head h
        reads key head ``h // (Hq // Hkv)``).
      real_rows, real_keys: ``[B]`` int32 or None (all P, all L): per batch row (a ragged
        batch), only its first ``real_rows`` proxy rows count in the mean and only its first
        ``real_keys`` keys in the softmax; a row with no real key gets importance 0 throughout.
    Returns:
      ``[B, Hq, L]`` float32: softmax over the keys of ``q·k / √D`` (no causal mask, fp32
      accumulation), averaged over the rows; 0 at keys past ``real_keys``.
    """
    b, p, hq, d = q_proxy.shape
    l, hkv = k.shape[1], k.shape[2]
    proxy = q_proxy.reshape(b, p, hkv, hq // hkv, d)
    # HIGHEST: float32 inputs exactly, also on GPUs whose XLA default is TF32.
    logits = jnp.einsum(
        "bpkgd,blkd->bkgpl",
        proxy,
        k,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    ) / jnp.sqrt(jnp.float32(d))
    if real_rows is None and real_keys is None:
        return jax.nn.softmax(logits, axis=-1).mean(axis=-2).reshape(b, hq, l)
    key_in = jnp.arange(l)[None, :] < (l if real_keys is None else real_keys[:, None])  # [B, L]
    key_in = key_in[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(key_in, logits, -jnp.inf), axis=-1)
    probs = jnp.where(key_in.any(axis=-1, keepdims=True), probs, 0.0)  # no real key: 0, not NaN
    row_in = jnp.arange(p)[None, :] < (p if real_rows is None else real_rows[:, None])  # [B, P]
    row_in = row_in[:, None, None, :, None]
    # A where, not a product: rows past real_rows may hold anything.
    mean = jnp.where(row_in, probs, 0.0).sum(axis=-2) / row_in.sum(axis=-2)
    return mean.reshape(b, hq, l)


def pooled_block_probabilities_reference(
    pooled_q: jax.Array, pooled_k: jax.Array, domain: jax.Array
) -> jax.Array:
    """The block distribution of the mean-pooling selector, from pooled blocks.

    The planner's ``meanpool`` block scores off GPU, and the first half of
    ``pallas_kernels.pooled_top_p_blocks``'s contract.

    Args:
      pooled_q: ``[B, Tq, Hq, D]`` float32 block means of the queries (Tq = T, or Tq < T: a
        chunk's last Tq query blocks); pooled_k: ``[B, T, Hp, D]`` float32 block means of the
        (permuted) keys, Hq a multiple of Hp (query head h reads head ``h // (Hq // Hp)``);
        domain: ``[Tq, T]`` bool (or int, nonzero = allowed), the key blocks that compete in
        each query block's softmax.
    Returns:
      ``[B, Hq, Tq, T]`` float32: the softmax over the allowed key blocks of
      ``pooled_q · pooled_k / √D`` (fp32, HIGHEST precision), 0 elsewhere and on rows with
      nothing allowed.
    """
    b, tq, hq, d = pooled_q.shape
    t, hp = pooled_k.shape[1], pooled_k.shape[2]
    grouped = pooled_q.reshape(b, tq, hp, hq // hp, d)
    logits = jnp.einsum("bqpgd,bkpd->bpgqk", grouped, pooled_k, precision=lax.Precision.HIGHEST)
    logits = logits.reshape(b, hq, tq, t) / jnp.sqrt(jnp.float32(d))
    return masked_softmax(logits, domain.astype(jnp.bool_))


def pooled_top_p_blocks_reference(
    pooled_q: jax.Array, pooled_k: jax.Array, domain: jax.Array, threshold: float
) -> jax.Array:
    """The contract of ``pallas_kernels.pooled_top_p_blocks`` (any T, D and dtype here).

    Args: as :func:`pooled_block_probabilities_reference`; threshold: a Python float in (0, 1].
    Returns:
      ``[B, Hq, Tq, T]`` bool: the top-p blocks (``pallas_kernels.top_p.top_p_blocks``) of each
      query block's distribution, without any forced block.
    """
    probs = pooled_block_probabilities_reference(pooled_q, pooled_k, domain)
    return top_p_blocks(probs, domain.astype(jnp.bool_), threshold)


def pooled_selection_reference(
    pooled_q: jax.Array,
    pooled_k: jax.Array,
    codes: jax.Array,
    sink: jax.Array,
    threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The contract of ``pallas_kernels.pooled_selection`` (with lists; any T, D and dtype).

    Args: pooled_q, pooled_k, threshold as :func:`pooled_top_p_blocks_reference`; codes
      ``[1 or B, Tq, T]`` int bit flags (``pallas_kernels.block_lists.CODE_*``); sink ``[B, Hq]``
      int, a forced key block per query head or -1.
    Returns:
      ``(mask [B, Hq, Tq, T] bool, ids [B, Hq, Tq, T] int32, full_counts [B, Hq, Tq] int32,
      total_counts [B, Hq, Tq] int32)``: the mask is the top-p blocks of the domain
      ``codes & CODE_DOMAIN``, or ``CODE_FORCED``, or the sink column, and never
      ``CODE_NEVER``; the ids each row's kept columns ascending then zeros (a stable sort of the
      row's dropped flags: kept columns first, each group in column order).
    """
    flags = codes.astype(jnp.int32)[:, None]  # [1 | B, 1, Tq, T]
    top_p = pooled_top_p_blocks_reference(pooled_q, pooled_k, flags & CODE_DOMAIN, threshold)
    col = jnp.arange(codes.shape[-1])
    forced = ((flags & CODE_FORCED) != 0) | (col == sink[:, :, None, None])
    mask = (top_p | forced) & ((flags & CODE_NEVER) == 0)
    total = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    full = jnp.sum(mask & ((flags & CODE_EARLIER) != 0), axis=-1, dtype=jnp.int32)
    kept_first = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
    ids = jnp.where(col < total[..., None], kept_first, 0)
    return mask, ids, full, total


def permuted_block_means_reference(
    k: jax.Array,
    perm: jax.Array,
    *,
    block_size: int,
    segment_size: int,
    lengths: jax.Array | None = None,
    tiles=None,
    interpret=None,
) -> jax.Array:
    """The contract of ``pallas_kernels.permuted_block_means``: the keys gathered in slot order,
    then block means (zero padding of a partial last block counted).

    Args:
      k: ``[B, N, Hkv, D]`` keys in original order; perm: ``[B, Hp, N]`` int, Hp a multiple of
        Hkv, the original position of the key at each slot (permuted within segments of
        ``segment_size``, which the gather does not need); lengths: None or ``[B]`` int, keys
        at positions ``>= lengths[b]`` count as zeros. ``tiles``, ``interpret``: ignored.
    Returns:
      ``[B, ceil(N / block_size), Hp, D]`` float32.
    """
    del segment_size, tiles, interpret
    if lengths is not None:
        k = zero_past_lengths(k, lengths)
    return block_means(slot_order(k, perm), block_size)
