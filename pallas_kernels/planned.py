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
  never visible: they lie after every real query). The slot-order copy has one K/V per
  permutation head: with one permutation per query head that is Hq/Hkv times K/V's own size
  (2 GiB at 128K for 32/8 heads of 128), so above :data:`SLOT_COPY_LIMIT_BYTES` the kernel is
  launched per group of KV heads, one after the other (a ``fori_loop``), and only one group's
  copy is ever alive (:func:`kv_heads_per_launch`).
- Elsewhere the Triton kernel (interpret mode on CPU). One permutation per KV head (Hp == Hkv)
  permutes K/V physically (contiguous rows, ~10% faster); one per query head gathers rows by
  index inside the kernel, so K/V are never repeated per query head in device memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_mgpu import block_sparse_attention_mgpu, mgpu_supported

__all__ = ["SLOT_COPY_LIMIT_BYTES", "kv_heads_per_launch", "planned_attention", "slot_order"]

# The most device memory one Mosaic launch's slot-order K/V copy may take. 256 MiB keeps a whole
# prefill's copy in one launch up to 16K tokens at 32 heads of 128 (one launch has enough blocks
# to fill the GPU there, and at shorter lengths splitting would leave SMs idle) and bounds the
# copy to ~1% of an 8B model's prefill memory beyond.
SLOT_COPY_LIMIT_BYTES = 256 * 2**20


def slot_order(x: jax.Array, key_pos: jax.Array) -> jax.Array:
    """Rows of ``x [B, N, Hkv, D]`` in slot order for every permutation head: ``[B, N, Hp, D]``.

    Slot j of head p is ``x[b, key_pos[b, p, j], p // (Hp // Hkv)]``.
    """
    b, _, hkv, _ = x.shape
    hp = key_pos.shape[1]
    kv_head = jnp.arange(hp) // (hp // hkv)  # [Hp]
    return x[jnp.arange(b)[:, None, None], key_pos.transpose(0, 2, 1), kv_head[None, None, :]]


def kv_heads_per_launch(
    batch: int, n: int, hp: int, hkv: int, d: int, itemsize: int, limit: int
) -> int:
    """KV heads per Mosaic launch: all Hkv when the slot-order K and V copies of every
    permutation head fit in ``limit`` bytes, else the largest divisor of Hkv whose share does
    (at least 1: one KV head's group is the smallest unit a permutation head maps to)."""
    per_kv_head = 2 * batch * n * (hp // hkv) * d * itemsize  # K and V, one KV head's group
    fitting = [g for g in range(1, hkv + 1) if hkv % g == 0 and g * per_kv_head <= limit]
    return max(fitting, default=1)


def _mosaic(q, k, v, key_pos, block_ids, full_counts, *, block_size, segment_blocks, kernel, limit):
    """The Mosaic path of :func:`planned_attention` (``kernel``: the Mosaic kernel, or its
    contract reference in tests): pad N to whole blocks, put K/V in slot order, launch — per
    group of KV heads when the copy exceeds ``limit`` bytes."""
    b, m, hq, d = q.shape
    n, hkv, hp = k.shape[1], k.shape[2], key_pos.shape[1]
    pad = (-m) % block_size  # = (-N) % block_size: N - M is a multiple of it

    def padded(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x

    def launch(q, k, v, key_pos, block_ids, full_counts):
        return kernel(
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

    per = kv_heads_per_launch(b, n, hp, hkv, d, k.dtype.itemsize, limit)
    if per == hkv:
        out = launch(q, k, v, key_pos, block_ids, full_counts)
    else:
        # Group i: KV heads [i·per, (i+1)·per), their query and permutation heads (contiguous:
        # query head h reads KV head h // (Hq / Hkv), permutation head h // (Hq / Hp)).
        q_per, p_per = hq // hkv * per, hp // hkv * per

        def group(i, out):
            def heads(x, size, axis):
                return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)

            out_i = launch(
                heads(q, q_per, 2),
                heads(k, per, 2),
                heads(v, per, 2),
                heads(key_pos, p_per, 1),
                heads(block_ids, q_per, 1),
                heads(full_counts, q_per, 1),
            )
            return jax.lax.dynamic_update_slice_in_dim(out, out_i, i * q_per, 2)

        out = jax.lax.fori_loop(0, hkv // per, group, jnp.zeros((b, m + pad, hq, d), q.dtype))
    return out[:, :m] if pad else out


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
    if mgpu_supported(q, block_size):
        return _mosaic(
            q,
            k,
            v,
            key_pos,
            block_ids,
            full_counts,
            block_size=block_size,
            segment_blocks=segment_blocks,
            kernel=block_sparse_attention_mgpu,
            limit=SLOT_COPY_LIMIT_BYTES,
        )
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
