"""Block-sparse flash attention over listed kv blocks, with keys addressed by slot (Pallas/Triton).

This is the kernel of Permuted Block-Sparse Attention (PBS-Attn, arXiv 2510.21270, Alg. 1), but
it knows nothing about permutations or block selection: it sees, per query block, a compact list
of kv blocks to visit and, per key slot, the original position of the key stored there.

Semantics (per batch b, query head h, query row i with q_pos = N - M + i, logical query block
i // bs; M = N for a whole prefill, M < N for a chunk of the last M positions continuing a
cache, N - M a multiple of bs so the chunk's blocks are the sequence's last blocks):
  * the key slots of query head h are j = 0..N-1; slot j holds original key `key_pos[b, p, j]`
    with p = h // (Hq // Hp) (the permutation head);
  * the listed blocks `block_ids[b, h, i // bs, :total]` select the slots j with j // bs in the
    list; entries [0, full) are used as they are, entries [full, total) only where
    key_pos[b, p, j] <= q_pos (the token-level causal mask of the query's own segment);
  * out[b, i, h] = softmax(q . k_j * sm_scale over the selected slots) @ v_j, with k_j, v_j the
    row key_pos[b, p, j] of k/v head h // (Hq // Hk) if `gather_kv`, else row j (k/v already
    permuted by the caller). A row with no selected slot outputs zeros.

Kernel structure: grid (cdiv(M, block_m), B, Hq); one program owns `block_m` query rows and
walks its logical q block's list in two `lax.fori_loop`s, [0, full) without any mask and
[full, total) with the causal mask, each listed block in `block_size // block_n` sub-tiles. No
skipped block is ever touched. Online softmax in fp32, base 2 (log2(e) folded into the scale),
finite mask value so that rows fully masked in one tile never produce NaN. The lists and counts
are ordinary int32 inputs (Triton has no scalar prefetch), read as scalars in the loop.

Memory: with `gather_kv=True` no K/V copy is made at all, in either GQA mode (one permutation
per query head, "replicate", or per kv head, "shared"): the kernel gathers rows of the caller's
k/v by index (the "index remapping" of the paper's App. E). The only extra is `key_pos`, 4 bytes
per slot per permutation head, padded to Tk*block_size slots. With `gather_kv=False` the caller's
permuted K/V cost Hp * N * D * 2 * itemsize bytes. q, k, v and the output are never padded:
the ragged tail (N % block_size != 0) is handled with masked loads/stores and an explicit slot
mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _checks
from pallas_kernels.tiles import TileConfig, get_tiles

__all__ = ["block_sparse_attention"]

# Masked logits (already in log2 units) get _MASK_VALUE; the running max starts at _M_INIT,
# which is far above it. A row that is masked everywhere so far keeps m = _M_INIT and gets
# p = exp2(_MASK_VALUE - _M_INIT) = 0 exactly: no garbage weight, l stays 0, output 0.
# Both are finite, so no inf - inf = NaN can arise.
_MASK_VALUE = -1e30
_M_INIT = -1e20


def block_sparse_attention(
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
    tiles: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of every query over the listed kv blocks only.

    Args:
      q: [B, M, Hq, D] queries in original order (never permuted): the last M <= N positions
        (N - M a multiple of block_size; query row i sits at position N - M + i).
      k, v: [B, N, Hk, D] keys/values: original order if `gather_kv`, else already permuted
        (slot j is row j).
      key_pos: [B, Hp, N] int32, original position of the key at slot j for permutation head p.
      block_ids: [B, Hq, Tq, Kmax] int32 kv-block ids per query block, ascending; Tq =
        ceil(M / block_size). Entries at or beyond `total_counts` are never read.
      full_counts: [B, Hq, Tq] int32; list entries [0, full) are computed with no token mask.
      total_counts: [B, Hq, Tq] int32; entries [full, total) are computed with the mask
        key_pos > q_pos (q_pos = N - M + query row index).
      block_size: logical block size in slots (power of two >= 16).
      gather_kv: gather k/v rows by key_pos in-kernel (True) or read slot j as row j (False).
      sm_scale: softmax scale, default 1/sqrt(D).
      tiles: TileConfig; default `get_tiles(D, q.dtype, block_size, gather_kv)`.
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      [B, M, Hq, D] in q.dtype.

    Query head h uses k/v head h // (Hq // Hk) and permutation head h // (Hq // Hp). The list
    must be ascending so that the last block (which holds the padding slots when N is not a
    multiple of block_size) is last; ids outside [0, Tq) and counts outside [0, Kmax] are
    clamped in-kernel for memory safety (such input is a caller bug).

    Raises:
      ValueError: bad shapes, dtypes, head counts, head dim or tiles (the message names the
        argument and the rule).
    """
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
    block_size = int(block_size)
    if tiles is None:
        tiles = get_tiles(dims.head_dim, q.dtype, block_size, bool(gather_kv))
    elif not isinstance(tiles, TileConfig):
        raise ValueError(f"tiles must be a TileConfig or None, got {type(tiles).__name__}")
    tiles.check_divides(block_size)
    sm_scale = _checks.softmax_scale(dims.head_dim, sm_scale)
    return _block_sparse_attention(
        q,
        k,
        v,
        key_pos.astype(jnp.int32),
        block_ids.astype(jnp.int32),
        full_counts.astype(jnp.int32),
        total_counts.astype(jnp.int32),
        block_size=block_size,
        gather_kv=bool(gather_kv),
        sm_scale=float(sm_scale),
        tiles=tiles,
        interpret=_checks.resolve_interpret(interpret),
    )


@functools.partial(
    jax.jit, static_argnames=("block_size", "gather_kv", "sm_scale", "tiles", "interpret")
)
def _block_sparse_attention(
    q,
    k,
    v,
    key_pos,
    block_ids,
    full_counts,
    total_counts,
    *,
    block_size: int,
    gather_kv: bool,
    sm_scale: float,
    tiles: TileConfig,
    interpret: bool,
):
    b, m, hq, d = q.shape
    n, hk = k.shape[1], k.shape[2]  # M < N: the queries are the last M positions
    hp = key_pos.shape[1]
    t = block_ids.shape[2]
    t_kv = pl.cdiv(n, block_size)
    n_pad = t_kv * block_size
    bm, bn = tiles.block_m, tiles.block_n
    m_per_block = block_size // bm  # programs per logical q block
    n_q_programs = pl.cdiv(m, bm)  # programs entirely past M are never launched

    if block_ids.shape[3] == 0:  # Kmax == 0: nothing listed; keep a 1-wide dummy row
        block_ids = jnp.zeros((b, hq, t, 1), jnp.int32)
    kmax = block_ids.shape[3]
    # Counts out of range would make the loops read past the lists: clamp (cheap, [B,Hq,Tq]).
    total_counts = jnp.clip(total_counts, 0, kmax)
    full_counts = jnp.clip(full_counts, 0, total_counts)
    if n_pad != n:
        # key_pos is tiny (4 bytes/slot/perm head). Padded slots point at a valid row (N-1) so a
        # gather never leaves k/v; they are removed by the explicit slot < N mask.
        key_pos = jnp.pad(key_pos, ((0, 0), (0, 0), (0, n_pad - n)), constant_values=n - 1)

    kernel = functools.partial(
        _kernel,
        block_size=block_size,
        block_m=bm,
        block_n=bn,
        seq_len=n,
        q_len=m,
        q_offset=n - m,
        num_blocks=t_kv,
        n_q_programs=n_q_programs,
        qk_scale=sm_scale * _checks.LOG2E,
        gather_kv=gather_kv,
        precision=_checks.dot_precision(q.dtype),
    )

    # Heavy (late) query blocks are launched first: program 0 takes the last q tile. Causal
    # work grows with the q index, so this shortens the tail of the launch.
    def q_tile(i):
        return n_q_programs - 1 - i

    def q_block(i):
        return lax.div(q_tile(i), m_per_block)  # lax.div, as jax ops do for program-id math

    g_kv, g_p = hq // hk, hq // hp
    in_specs = [
        pl.BlockSpec((None, None, None, kmax), lambda i, bi, h: (bi, h, q_block(i), 0)),
        pl.BlockSpec((None, None, None), lambda i, bi, h: (bi, h, q_block(i))),
        pl.BlockSpec((None, None, None), lambda i, bi, h: (bi, h, q_block(i))),
        pl.BlockSpec((None, None, n_pad), lambda i, bi, h: (bi, _checks.shared_head(h, g_p), 0)),
        pl.BlockSpec((None, bm, None, d), lambda i, bi, h: (bi, q_tile(i), h, 0)),
        # Whole sequence of one kv head: Triton does not stage blocks, so this is only a base
        # pointer; rows are addressed (gathered) inside the loop.
        pl.BlockSpec((None, n, None, d), lambda i, bi, h: (bi, 0, _checks.shared_head(h, g_kv), 0)),
        pl.BlockSpec((None, n, None, d), lambda i, bi, h: (bi, 0, _checks.shared_head(h, g_kv), 0)),
    ]
    out_spec = pl.BlockSpec((None, bm, None, d), lambda i, bi, h: (bi, q_tile(i), h, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(n_q_programs, b, hq),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_block_sparse_attn_bs{block_size}_m{bm}_n{bn}",
    )(block_ids, full_counts, total_counts, key_pos, q, k, v)


def _kernel(
    ids_ref,
    full_ref,
    total_ref,
    kp_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    *,
    block_size,
    block_m,
    block_n,
    seq_len,
    q_len,
    q_offset,
    num_blocks,
    n_q_programs,
    qk_scale,
    gather_kv,
    precision,
):
    """One program: `block_m` query rows of one (batch, head).

    ids_ref [Kmax], full_ref [], total_ref [], kp_ref [Tk*bs], q_ref [bm, D],
    k_ref/v_ref [N, D], o_ref [bm, D]. seq_len = N keys; q_len = M queries at positions
    q_offset + row (q_offset = N - M, static).
    """
    q_tile = n_q_programs - 1 - pl.program_id(0)
    sub_tiles = block_size // block_n  # static: sub-tiles per logical block
    ragged_q = q_len % block_m != 0  # static: last q tile is partial
    ragged_kv = seq_len % block_size != 0  # static: last kv block has padding slots
    d = q_ref.shape[-1]

    q_row = q_tile * block_m + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    q_pos = q_offset + q_row  # original positions, for the token mask
    if ragged_q:
        q = plt.load(q_ref, mask=(q_row < q_len)[:, None], other=0.0)
    else:
        q = q_ref[...]

    full = full_ref[...]
    total = total_ref[...]
    # The last kv block holds slots >= N when N is ragged. It can only be the last list entry
    # (lists are ascending). If it is listed in the unmasked part, shift it into the masked loop
    # (where slots >= N are masked) but keep it unmasked causally (`entry < full` below).
    if ragged_kv:
        last = ids_ref[jnp.maximum(full - 1, 0)]
        full_end = full - ((full > 0) & (last >= num_blocks - 1)).astype(jnp.int32)
    else:
        full_end = full

    def load_tile(t):
        """Scalar list read, then the block_n slots of sub-tile t (flattened over blocks)."""
        if sub_tiles == 1:
            entry, sub = t, 0
        else:
            entry, sub = lax.div(t, sub_tiles), lax.rem(t, sub_tiles)
        kv_block = jnp.clip(ids_ref[entry], 0, num_blocks - 1)  # memory safety only
        start = kv_block * block_size + sub * block_n
        return entry, start

    def step(t, carry, *, masked):
        m_prev, l_prev, acc_prev = carry
        entry, start = load_tile(t)
        if gather_kv or masked:
            kp = kp_ref[pl.ds(start, block_n)]  # [bn] original key positions
        if gather_kv:
            # Data-dependent row gather (as in jax's paged_attention): K/V never permuted.
            k = k_ref[kp, :]
            v = v_ref[kp, :]
        else:
            if ragged_kv and (masked or seq_len < block_n):
                # Slots of the last block may pass N; clamp to a valid row, masked below. (The
                # unmasked loop never sees that block, but when N < block_n a static slice of
                # block_n rows would not even fit k_ref, so it takes this path too.)
                rows = jnp.minimum(
                    start + lax.broadcasted_iota(jnp.int32, (block_n,), 0), seq_len - 1
                )
                k = k_ref[rows, :]
                v = v_ref[rows, :]
            else:
                k = k_ref[pl.ds(start, block_n), :]
                v = v_ref[pl.ds(start, block_n), :]

        s = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32)
        s = s * qk_scale  # [bm, bn], log2 units
        if masked:
            valid = kp[None, :] <= q_pos[:, None]
            if ragged_kv:
                # A list entry below `full` was shifted here only for its padding: no causal mask.
                valid = valid | (entry < full)
                slots = start + lax.broadcasted_iota(jnp.int32, (block_n,), 0)
                valid = valid & (slots < seq_len)[None, :]
            s = jnp.where(valid, s, _MASK_VALUE)

        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc_prev * alpha[:, None] + jnp.dot(
            p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
        )
        return m_new, l_new, acc

    carry = (
        jnp.full((block_m,), _M_INIT, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
        jnp.zeros((block_m, d), jnp.float32),
    )
    carry = lax.fori_loop(0, full_end * sub_tiles, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(
        full_end * sub_tiles, total * sub_tiles, functools.partial(step, masked=True), carry
    )
    _, l, acc = carry
    # l == 0 <=> no selected key for this row (total == 0 or all masked): output exact zeros.
    out = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
    if ragged_q:
        plt.store(o_ref, out, mask=(q_row < q_len)[:, None])
    else:
        o_ref[...] = out
