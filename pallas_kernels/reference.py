"""Pure-jnp oracle for `block_sparse_attention` (same signature, same semantics).

It expands the block lists into a dense [B, Hq, N, N] boolean over (query row, key slot),
applies the token mask, and runs an fp32 softmax. O(B * Hq * N^2) memory: for tests and small
inputs only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _checks

__all__ = ["block_sparse_attention_reference"]


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

    Shapes: q [B, N, Hq, D]; k, v [B, N, Hk, D]; key_pos [B, Hp, N];
    block_ids [B, Hq, Tq, Kmax]; full_counts, total_counts [B, Hq, Tq]. Returns [B, N, Hq, D].
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
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(dims.head_dim)
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


@functools.partial(jax.jit, static_argnames=("block_size", "gather_kv", "sm_scale"))
def _reference(
    q, k, v, key_pos, block_ids, full_counts, total_counts, *, block_size, gather_kv, sm_scale
):
    b, n, hq, d = q.shape
    hk, hp = k.shape[2], key_pos.shape[1]
    t = block_ids.shape[2]

    # Which list part each (q block, kv block) pair is in: [B, Hq, Tq, Tk]. Entries at or beyond
    # total are ignored, so garbage there never matters; ids outside [0, Tk) match nothing.
    e = jnp.arange(block_ids.shape[3])
    in_full = e < full_counts[..., None]  # [B,Hq,Tq,K]
    in_masked = (e >= full_counts[..., None]) & (e < total_counts[..., None])
    onehot = block_ids[..., None] == jnp.arange(t)  # [B,Hq,Tq,K,Tk]
    full_blk = jnp.any(onehot & in_full[..., None], axis=3)
    masked_blk = jnp.any(onehot & in_masked[..., None], axis=3)

    # Expand blocks to (query row i, key slot j): [B, Hq, N, N].
    blk = jnp.arange(n) // block_size
    full_tok = full_blk[:, :, blk][:, :, :, blk]
    masked_tok = masked_blk[:, :, blk][:, :, :, blk]
    kp = key_pos[:, jnp.arange(hq) // (hq // hp)]  # [B, Hq, N]
    causal = kp[:, :, None, :] <= jnp.arange(n)[None, None, :, None]  # key_pos <= q_pos
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
