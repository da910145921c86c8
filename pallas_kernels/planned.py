"""The one kernel entry: attention over a plan's listed blocks, on the best kernel here.

A plan is what the planner (``pbs_jax``) hands down, in kernel terms only — no permutation or
selector logic lives here:

- ``key_pos [B, Hp, N]`` int32: the original position of the key at each slot (a bijection of
  each masked segment onto itself; the remainder in place);
- ``block_ids [B, Hq, T, Kmax]``, ``full_counts``, ``total_counts [B, Hq, T]`` int32: per query
  block the listed key-slot blocks, ascending; entries ``[0, full)`` lie in earlier segments
  (computed unmasked), ``[full, total)`` are the query's whole own segment (masked on original
  positions).

:func:`planned_attention` picks the backend and prepares each kernel's inputs:

- Hopper, 16-bit, D 64/128, block 128: the Mosaic GPU kernel. TMA copies contiguous tiles, so
  K/V are put in slot order once (:func:`slot_order`) for the earlier-segment blocks, and the
  own segment is read in original order with a causal mask (the same key set as the token
  mask: see ``block_sparse_attention_mgpu``). N is padded to whole blocks (padded keys are
  never visible: they lie after every real query).
- Elsewhere the Triton kernel (interpret mode on CPU). One permutation per KV head (Hp == Hkv)
  permutes K/V physically (contiguous rows, ~10% faster); one per query head gathers rows by
  index inside the kernel, so K/V are never repeated per query head in device memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_mgpu import block_sparse_attention_mgpu, mgpu_supported

__all__ = ["planned_attention", "slot_order"]


def slot_order(x: jax.Array, key_pos: jax.Array) -> jax.Array:
    """Rows of ``x [B, N, Hkv, D]`` in slot order for every permutation head: ``[B, N, Hp, D]``.

    Slot j of head p is ``x[b, key_pos[b, p, j], p // (Hp // Hkv)]``.
    """
    b, _, hkv, _ = x.shape
    hp = key_pos.shape[1]
    kv_head = jnp.arange(hp) // (hp // hkv)  # [Hp]
    return x[jnp.arange(b)[:, None, None], key_pos.transpose(0, 2, 1), kv_head[None, None, :]]


def planned_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_pos: jax.Array,
    block_ids: jax.Array,
    full_counts: jax.Array,
    total_counts: jax.Array,
    *,
    block_size: int,
    segment_blocks: int,
) -> jax.Array:
    """Block-sparse causal attention of a plan (module docstring), on Mosaic or Triton.

    Args:
      q: ``[B, M, Hq, D]`` queries in original order, the last M ≤ N positions (M = N: a whole
        prefill; M < N: a chunk continuing a cache, N - M a multiple of ``block_size``: the
        lists then cover the chunk's Tq = ceil(M / block_size) query blocks);
        k, v: ``[B, N, Hkv, D]`` original order.
      key_pos, block_ids, full_counts, total_counts: the plan (module docstring).
      block_size: tokens per block; segment_blocks: blocks per masked segment (every list's
        entries ``[full, total)`` are exactly the causal blocks of that segment, or all of them).
    Returns:
      ``[B, M, Hq, D]`` in q's dtype.
    """
    n = q.shape[1]
    if mgpu_supported(q, block_size):
        pad = (-n) % block_size  # = (-N) % block_size: N - M is a multiple of it

        def padded(x):
            return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x

        out = block_sparse_attention_mgpu(
            padded(q),
            padded(slot_order(k, key_pos)),
            padded(slot_order(v, key_pos)),
            padded(k),
            padded(v),
            block_ids,
            full_counts,
            block_size=block_size,
            segment_blocks=segment_blocks,
        )
        return out[:, :n] if pad else out
    gather_kv = key_pos.shape[1] != k.shape[2]
    if not gather_kv:
        k, v = slot_order(k, key_pos), slot_order(v, key_pos)
    return block_sparse_attention(
        q,
        k,
        v,
        key_pos,
        block_ids,
        full_counts,
        total_counts,
        block_size=block_size,
        gather_kv=gather_kv,
    )
