"""Block-sparse flash attention for Hopper through Pallas's Mosaic GPU backend (wgmma + TMA).

The same listed-block semantics as :mod:`pallas_kernels.block_sparse_attention` (the Triton
kernel), reorganised for what TMA can do: TMA copies contiguous tiles and cannot gather rows, so
keys are read from two places.

* Earlier-segment blocks (list entries ``[0, off_counts)``) come from ``k_perm``/``v_perm``, the
  keys already permuted into slot order, and need no mask at all.
* The query's own segment is read from the *original* ``k``/``v``: attention does not depend on
  the order of its keys, and the own segment is always computed whole, so the blocks
  ``[qb - qb % segment_blocks, qb]`` in original order with a plain causal mask on the last one
  give exactly the slots ``key_pos <= q_pos`` of the permuted segment (PBS-Attn's token mask).
  Own-segment blocks after ``qb`` hold only later tokens and are skipped.

Kernel structure, FlashAttention-3 style: one program per (batch, query block of
``block_size = 128`` rows, query head), three warpgroups. Two compute warpgroups own 64 query
rows each and alternate on the tensor cores (a schedule barrier, so one runs its softmax while
the other's matmuls run); the third streams K/V blocks through a ring of ``stages`` SMEM slots
with TMA, addressed from the block list. Online softmax in fp32, base 2. Launch order: query
blocks fastest, heavy (late, long-list) blocks first, so the programs resident at one time are
the query blocks of one head and share its K/V blocks in L2.

Queries may be a chunk continuing a cache: q holds the last M of the N key positions (N - M a
multiple of ``block_size``); the grid runs over the chunk's M / 128 query blocks, and the own
segment and the diagonal are found from the absolute query block (local + (N - M) / 128).

Needs sm_90 (wgmma), N a multiple of 128 (`pallas_kernels.planned_attention` pads), D 64 or 128
(SMEM: the Q tiles and a 2-slot K/V ring), 16-bit inputs (`_checks.validate_mgpu`). Its contract
has a pure-jnp reference, `pallas_kernels.reference.block_sparse_attention_mgpu_reference`,
tested against the Triton kernel's on any machine; the kernel itself needs Hopper
(tests/test_kernel_mgpu.py). The Triton kernel stays the portable path; both sit behind
`pallas_kernels.planned_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _checks

__all__ = ["block_sparse_attention_mgpu", "mgpu_supported"]

_ROWS_PER_WG = 64  # wgmma's M
_COMPUTE_WGS = 2
assert _COMPUTE_WGS * _ROWS_PER_WG == _checks.MGPU_BLOCK_SIZE


def mgpu_supported(q: jax.Array, block_size: int) -> bool:
    """Whether this kernel can run ``q`` here: a Hopper GPU, 16-bit, D 64 or 128, block 128."""
    if jax.default_backend() != "gpu" or jnp.dtype(q.dtype).name not in _checks.MGPU_DTYPES:
        return False
    if q.shape[-1] not in _checks.MGPU_HEAD_DIMS or block_size != _checks.MGPU_BLOCK_SIZE:
        return False
    cap = getattr(jax.devices()[0], "compute_capability", "0")
    return str(cap).startswith("9")


def _row_layout():
    wgmma = plgpu.Layout.WGMMA
    return wgmma.reduce(1) if hasattr(wgmma, "reduce") else plgpu.Layout.WGMMA_ROW


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "segment_blocks", "sm_scale", "stages", "blocks_fastest"),
)
def block_sparse_attention_mgpu(
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
    stages: int = 2,
    blocks_fastest: bool = True,
):
    """Attention of every query block over its listed earlier blocks plus its own segment.

    Args:
      q: ``[B, M, Hq, D]`` queries, M a multiple of ``block_size``: the last M of the N key
        positions (M = N: a whole prefill).
      k_perm, v_perm: ``[B, N, Hp, D]`` keys/values in slot (permuted) order; query head h reads
        head ``h // (Hq // Hp)``.
      k, v: ``[B, N, Hkv, D]`` keys/values in original order (the own segment).
      block_ids: ``[B, Hq, Tq, Kmax]`` int32 slot-block ids per query block of the chunk; entries
        ``[0, off_counts)`` are the earlier-segment blocks to visit (any order).
      off_counts: ``[B, Hq, Tq]`` int32.
      segment_blocks: blocks per segment of the token mask (``mask_segment_size // block_size``).
    Returns:
      ``[B, M, Hq, D]`` in q's dtype.
    """
    b, m, hq, d = q.shape
    hp, hkv = k_perm.shape[2], k.shape[2]
    t = m // block_size  # the chunk's query blocks: the grid
    q_block_offset = (k.shape[1] - m) // block_size  # static: absolute block of local block 0
    _checks.validate_mgpu(q, k_perm, v_perm, k, v, block_ids, off_counts, block_size=block_size)
    scale = _checks.softmax_scale(d, sm_scale) * _checks.LOG2E
    dtype = q.dtype
    rows = _ROWS_PER_WG
    row_layout = _row_layout()

    def kernel(ids_ref, off_ref, q_ref, kp_ref, vp_ref, k_ref, v_ref, out_ref, scoped):
        bi = lax.axis_index("batch")
        h = lax.axis_index("heads")
        qb = t - 1 - lax.axis_index("q_blk")  # heavy (late) query blocks first; local to q
        wg = lax.axis_index("wg")
        (q_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
        n_off = off_ref[bi, h, qb]
        qb_abs = qb + q_block_offset  # the block's place among the keys: own segment, diagonal
        own_start = qb_abs - lax.rem(qb_abs, segment_blocks)
        total = n_off + qb_abs - own_start + 1  # >= 1: the diagonal block

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem = q_smem2.at[wg]
            row0 = qb * block_size + wg * rows
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, rows), h], q_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            def step(s, carry, *, diagonal: bool):
                acc, m, l = carry
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk_scope(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return acc_ref[...]

                s_blk = pl.run_scoped(qk_scope, plgpu.ACC((rows, block_size), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if diagonal:  # original order: key c of the block is visible to row r iff c <= r
                    r = (
                        plgpu.broadcasted_iota(
                            jnp.int32, (rows, block_size), 0, layout=plgpu.Layout.WGMMA
                        )
                        + wg * rows
                    )
                    c = plgpu.broadcasted_iota(
                        jnp.int32, (rows, block_size), 1, layout=plgpu.Layout.WGMMA
                    )
                    s_blk = jnp.where(c <= r, s_blk, -jnp.inf)
                m_new = jnp.maximum(m, s_blk.max(axis=1) * scale)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s_blk * scale - lax.broadcast_in_dim(m_new, s_blk.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may go
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def pv_scope(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                acc = pl.run_state(pv_scope)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (
                plgpu.layout_cast(jnp.full((rows, d), 0, jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout),
                plgpu.layout_cast(jnp.full((rows,), 0, jnp.float32), row_layout),
            )
            pl.when(wg == 1)(take_turn)  # offset the two warpgroups by half a step
            carry = lax.fori_loop(0, total - 1, functools.partial(step, diagonal=False), carry)
            acc, _, l = step(total - 1, carry, diagonal=True)
            pl.when(wg == 0)(take_turn)
            acc /= lax.broadcast_in_dim(l, acc.shape, [0])  # l > 0: every row sees its own key
            q_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[bi, pl.ds(row0, rows), h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            p_head = lax.div(h, hq // hp)
            kv_head = lax.div(h, hq // hkv)

            def fetch(s, slot, src_perm, src_orig, ready):
                @pl.when(s < n_off)
                def _():
                    blk = ids_ref[bi, h, qb, s]
                    plgpu.copy_gmem_to_smem(
                        src_perm.at[bi, pl.ds(blk * block_size, block_size), p_head],
                        ready[0].at[slot],
                        ready[1].at[slot],
                    )

                @pl.when(s >= n_off)
                def _():
                    blk = own_start + s - n_off
                    plgpu.copy_gmem_to_smem(
                        src_orig.at[bi, pl.ds(blk * block_size, block_size), kv_head],
                        ready[0].at[slot],
                        ready[1].at[slot],
                    )

            for i in range(stages):

                @pl.when(i < total)
                def _():
                    fetch(i, i, kp_ref, k_ref, (k_smem, k_ready))
                    fetch(i, i, vp_ref, v_ref, (v_smem, v_ready))

            @pl.loop(stages, jnp.maximum(total, stages))
            def _(s):
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_free.at[slot])
                fetch(s, slot, kp_ref, k_ref, (k_smem, k_ready))
                plgpu.barrier_wait(v_free.at[slot])
                fetch(s, slot, vp_ref, v_ref, (v_smem, v_ready))

    def entry(ids_ref, off_ref, q_ref, kp_ref, vp_ref, k_ref, v_ref, out_ref):
        mma = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(
                ids_ref, off_ref, q_ref, kp_ref, vp_ref, k_ref, v_ref, out_ref, scoped
            ),
            (
                plgpu.SMEM((_COMPUTE_WGS, rows, d), dtype, transforms=mma),
                plgpu.SMEM((stages, block_size, d), dtype, transforms=mma),
                plgpu.SMEM((stages, block_size, d), dtype, transforms=mma),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=_COMPUTE_WGS),
            ),
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        # Programs launch in row-major grid order. Query blocks fastest: the programs resident at
        # one time are ~all query blocks of one or two heads, which read the same K/V blocks
        # (L2 hits); heads fastest spreads them over every head instead.
        grid=(b, hq, t) if blocks_fastest else (b, t, hq),
        grid_names=("batch", "heads", "q_blk") if blocks_fastest else ("batch", "q_blk", "heads"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(block_ids.astype(jnp.int32), off_counts.astype(jnp.int32), q, k_perm, v_perm, k, v)
