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
  (2 GiB at 128K for 32/8 heads of 128), so above :data:`SINGLE_LAUNCH_COPY_BYTES` the kernel
  is launched per group of permutation heads, one after the other (a ``fori_loop``), and only
  one group's copy is ever alive (:func:`perm_heads_per_launch`).
- Elsewhere the Triton kernel (interpret mode on CPU). One permutation per KV head (Hp == Hkv)
  permutes K/V physically (contiguous rows, ~10% faster); one per query head gathers rows by
  index inside the kernel, so K/V are never repeated per query head in device memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention_mgpu import block_sparse_attention_mgpu, mgpu_supported

__all__ = [
    "SINGLE_LAUNCH_COPY_BYTES",
    "SLOT_COPY_LIMIT_BYTES",
    "perm_heads_per_launch",
    "planned_attention",
    "slot_order",
]

# One Mosaic launch takes the whole slot-order K/V copy while it is at most
# SINGLE_LAUNCH_COPY_BYTES: up to 16K tokens at 32 permutation heads of 128 (one launch has enough
# blocks to fill the GPU there, and at shorter lengths splitting would leave SMs idle). Beyond, the
# kernel is launched per group of permutation heads whose copy fits SLOT_COPY_LIMIT_BYTES: at 128K
# two heads at a time (128 MiB of copy; their query heads' slice and output 64 MiB each). Measured
# on the 8B prefill's compiled memory (experiments/probe_prefill_memory.py, H200, 2026-11-30):
# groups of one KV head (256 MiB of copy, 128 MiB slices) left PBS 0.75 GiB (+2.08%) above full at
# 128K. Smaller groups mean more launches, each with its tail of idle SMs.
SINGLE_LAUNCH_COPY_BYTES = 256 * 2**20
SLOT_COPY_LIMIT_BYTES = 128 * 2**20


def slot_order(x: jax.Array, key_pos: jax.Array) -> jax.Array:
    """Rows of ``x [B, N, Hkv, D]`` in slot order for every permutation head: ``[B, N, Hp, D]``.

    Slot j of head p is ``x[b, key_pos[b, p, j], p // (Hp // Hkv)]``.
    """
    b, _, hkv, _ = x.shape
    hp = key_pos.shape[1]
    kv_head = jnp.arange(hp) // (hp // hkv)  # [Hp]
    return x[jnp.arange(b)[:, None, None], key_pos.transpose(0, 2, 1), kv_head[None, None, :]]


def perm_heads_per_launch(
    batch: int,
    n: int,
    hp: int,
    hkv: int,
    d: int,
    itemsize: int,
    limit: int,
    single_launch: int = SINGLE_LAUNCH_COPY_BYTES,
) -> int:
    """Permutation heads per Mosaic launch: all Hp when the slot-order K and V copies of every
    permutation head fit in ``single_launch`` bytes, else the largest group whose copy fits
    ``limit`` (at least 1). A group is a divisor of Hp that lies within one KV head's
    permutation heads or covers whole KV heads, so each launch reads a contiguous run of KV
    heads."""
    per_head = 2 * batch * n * d * itemsize  # K and V of one permutation head
    if hp * per_head <= single_launch:
        return hp
    per_kv = hp // hkv  # permutation heads of one KV head
    groups = [g for g in range(1, hp + 1) if hp % g == 0 and (per_kv % g == 0 or g % per_kv == 0)]
    return max((g for g in groups if g * per_head <= limit), default=1)


def _mosaic(
    q,
    k,
    v,
    key_pos,
    block_ids,
    full_counts,
    *,
    block_size,
    segment_blocks,
    kernel,
    limit,
    single_launch,
):
    """The Mosaic path of :func:`planned_attention` (``kernel``: the Mosaic kernel, or its
    contract reference in tests): pad N to whole blocks, put K/V in slot order, launch — per
    group of permutation heads (:func:`perm_heads_per_launch`) when the copy is large."""
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

    per = perm_heads_per_launch(b, n, hp, hkv, d, k.dtype.itemsize, limit, single_launch)
    if per == hp:
        out = launch(q, k, v, key_pos, block_ids, full_counts)
    else:
        # Group i: permutation heads [i·per, (i+1)·per), their query heads (contiguous: query
        # head h has permutation head h // (Hq / Hp)) and the KV heads those read (permutation
        # head p reads KV head p // (Hp / Hkv)): a part of one, or whole ones.
        per_kv = hp // hkv
        q_per, kv_per = hq // hp * per, max(1, per // per_kv)

        def group(i, out):
            def heads(x, start, size, axis):
                return jax.lax.dynamic_slice_in_dim(x, start, size, axis)

            out_i = launch(
                heads(q, i * q_per, q_per, 2),
                heads(k, i * per // per_kv, kv_per, 2),
                heads(v, i * per // per_kv, kv_per, 2),
                heads(key_pos, i * per, per, 1),
                heads(block_ids, i * q_per, q_per, 1),
                heads(full_counts, i * q_per, q_per, 1),
            )
            return jax.lax.dynamic_update_slice_in_dim(out, out_i, i * q_per, 2)

        out = jax.lax.fori_loop(0, hp // per, group, jnp.zeros((b, m + pad, hq, d), q.dtype))
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
            single_launch=SINGLE_LAUNCH_COPY_BYTES,
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
