"""Key importance of a query proxy without materialising its logits (Pallas/Triton).

The planner orders each segment's keys by the mean softmax attention that a proxy of P query
rows (the last few query blocks) pays them. Written with XLA, the logits ``[B, Hq, P, L]``
float32 go through HBM: at L = 128K keys, P = 512 rows and 32 heads that is 8 GiB written and
read back twice (softmax, then the row mean). Here they never leave the chip:

* pass 1 (:func:`_row_stats_kernel`), grid ``(key splits, row tiles, B, Hq)``: one program
  walks ``split_keys`` keys in ``block_keys`` tiles with an online softmax and writes each row's
  running max and sum of exponentials over its split, ``[B, Hq, splits, P]`` (a few MiB at
  128K). jnp combines the splits with a logsumexp: ``lse [B, Hq, P]``, one number per row;
* pass 2 (:func:`_column_sums_kernel`), grid ``(key blocks, B, Hq)``: one program owns
  ``column_tiles`` tiles of ``block_keys`` keys, loops over the P rows in ``block_rows`` tiles
  (``lax.fori_loop``; a row tile of q is loaded once for all its key tiles), recomputes the
  logits tiles and accumulates the column sums of ``exp(s - lse_row)``; dividing by P gives the
  mean probability of each key.

A ragged (right-padded) batch passes ``real_rows [B]`` and ``real_keys [B]``: a static flag
adds the counts as two scalar operands of each pass (Pallas Triton has no scalar prefetch; a
``(None,)`` block gives each program its batch row's count) and masks built from iota compares,
always with ``where`` (padded rows and keys may hold anything). Pass 1 walks only the key tiles
that hold a real key and skips row tiles of padding; pass 2 walks only the real rows' tiles, and
not at all for a program whose first key is padding. Without counts the kernels are exactly the
unragged ones.

The logits are computed twice (2·P·L·D multiply-adds per head, against the XLA path's one pass
plus ~3 HBM round trips of P·L floats), which is the usual trade of flash-style kernels. All
accumulation is float32 (``preferred_element_type``); inputs stay in their own dtype. Softmax
in base 2 (log2(e) folded into the scale), as in :mod:`block_sparse_attention`.

The fused permutation pass that reuses pass 1 and the column sums is
:mod:`pallas_kernels.proxy_permutation`. The pure-jnp statement of this contract is
``pallas_kernels.reference.proxy_importance_reference``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks

__all__ = [
    "ImportanceTiles",
    "importance_tiles",
    "proxy_importance",
    "proxy_importance_supported",
]

# Initial running max of pass 1 (log2 units): finite so that exp2(_M_INIT - m) is an exact 0,
# never inf - inf = NaN. Every split walks at least one key tile, so it is always replaced
# (ragged: a split may walk none, then its exp-sum 0 weighs it out of the combine).
_M_INIT = -1e30
# Pass 1's logit (log2 units) at a key past real_keys: far below _M_INIT, so exp2 of it minus any
# running max is an exact 0 and it never becomes the max; finite, so no inf arithmetic.
_PADDED_LOGIT = -1e38


@dataclasses.dataclass(frozen=True)
class ImportanceTiles:
    """Static tiling of the two importance passes (hashable: a jit static argument).

    block_rows: proxy rows per logits tile (pass 1: rows per program; pass 2: rows per loop
                step). Must divide P.
    block_keys: keys per logits tile (pass 1: keys per loop step; pass 2: keys per program;
                :func:`proxy_permutation`'s pass 2: a program's segment is walked, ranked and
                pooled in tiles of block_keys). Must divide L (and the segment).
    column_tiles: key tiles of one pass-2 program (a power of two >= 1; ``block_keys ·
                column_tiles`` must divide L): more than one amortises the program's launch
                and its loads of the proxy rows over more keys where pass 2 is latency-bound
                (short L: at 8K keys, 32 heads and 64-key tiles, 4096 programs of one small dot
                each). :func:`proxy_permutation`'s pass 2 owns whole segments and ignores it.
    split_keys: keys walked by one pass-1 program; L / split_keys splits (the last one may be
                short) give the grid enough programs at long L while the partial statistics
                stay small (``B·Hq·(L/split_keys)·P`` pairs of floats). A multiple of
                block_keys. 1024: at 8K keys, 32 heads and one proxy block pass 1 has 256
                programs of 8 tiles (4096 gave 64 programs walking 32 tiles each: 0.25 ms
                for the whole proxy on an H200, latency-bound).
    num_warps, num_stages: Triton launch parameters of both passes.

    Tiles are powers of two >= 16: Triton's ``tl.dot`` needs every dimension >= 16 and every
    tensor dimension a power of two. The logits tile ``block_rows × block_keys`` float32 lives
    in registers: 128 × 128 is 64 floats per thread at 8 warps.
    """

    block_rows: int = 128
    block_keys: int = 128
    split_keys: int = 1024
    num_warps: int = 8
    num_stages: int = 2
    column_tiles: int = 1

    def __post_init__(self):
        for name in ("block_rows", "block_keys", "split_keys"):
            _checks.check_pow2_at_least(
                "ImportanceTiles", name, getattr(self, name), _checks.MIN_DOT_DIM
            )
        if self.split_keys < self.block_keys:
            raise ValueError(
                f"ImportanceTiles.split_keys={self.split_keys} must be a multiple of "
                f"block_keys={self.block_keys} (a split walks whole key tiles)"
            )
        _checks.check_pow2_at_least("ImportanceTiles", "column_tiles", self.column_tiles, 1)
        _checks.check_num_warps("ImportanceTiles", self.num_warps)
        _checks.check_num_stages("ImportanceTiles", self.num_stages)


# 16-bit: measured on an H200 (JAX 0.11.2, 2026-11-30, 32/8 heads of 128, bf16; the sweep of
# experiments/profile_plan.py, results/profile_plan.md, wall times of the call): 128 proxy rows ×
# 64 keys at 4 warps, splits of 512 keys, beat 128 × 128 at 8 warps, splits of 1024 (128K keys:
# 1.30 vs 1.35 ms at one proxy block, 3.92 vs 4.83 ms at four); two key tiles per pass-2 program
# (column_tiles) beat one: 1.24 vs 1.30 ms and 3.73 vs 3.92 ms at 128K, 0.38 vs 0.40 ms at 8K and
# four blocks, and in the plan's GPU profile 38.8 µs for the columns pass at 8K (41.9 with one
# tile, the earlier profile); four tiles lose at four blocks (4.76 ms).
# float32: 64 × 64 at 4 warps, not measured (IEEE dots, twice the register bytes per element).
_DEFAULT_TILES = {
    "bfloat16": ImportanceTiles(128, 64, split_keys=512, num_warps=4, num_stages=2, column_tiles=2),
    "float16": ImportanceTiles(128, 64, split_keys=512, num_warps=4, num_stages=2, column_tiles=2),
    "float32": ImportanceTiles(64, 64, num_warps=4, num_stages=2),
}


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing ``n`` and at most ``cap`` (both positive)."""
    return min(n & -n, cap)


def importance_tiles(num_rows: int, num_keys: int, dtype) -> ImportanceTiles:
    """Default tiles for P proxy rows and L keys of ``dtype``, shrunk (never grown) to divide
    P and L: block_rows divides P, block_keys · column_tiles divides L.

    Raises:
      ValueError: P or L not a multiple of 16 (no valid Triton tile divides it).
    """
    name = jnp.dtype(dtype).name
    base = _DEFAULT_TILES.get(name, _DEFAULT_TILES["float32"])
    for what, n in (("P (proxy rows)", num_rows), ("L (keys)", num_keys)):
        if n <= 0 or n % 16:
            raise ValueError(f"proxy_importance needs {what} a positive multiple of 16, got {n}")
    block_keys = largest_pow2_divisor(num_keys, base.block_keys)
    return dataclasses.replace(
        base,
        block_rows=largest_pow2_divisor(num_rows, base.block_rows),
        block_keys=block_keys,
        column_tiles=largest_pow2_divisor(num_keys // block_keys, base.column_tiles),
    )


def validate_operands(q_proxy, k, tiles) -> ImportanceTiles:
    """Check the contract (static: shapes and dtypes); return the tiles to use."""
    for name, x in (("q_proxy", q_proxy), ("k", k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-d array [B, rows, heads, D], got {x!r:.80}")
        if jnp.dtype(x.dtype).name not in _checks.FLOAT_DTYPES:
            raise ValueError(f"{name} dtype must be one of {_checks.FLOAT_DTYPES}, got {x.dtype}")
    b, p, hq, d = q_proxy.shape
    kb, l, hkv, kd = k.shape
    if q_proxy.dtype != k.dtype:
        raise ValueError(f"q_proxy and k must share a dtype, got {q_proxy.dtype} and {k.dtype}")
    if kb != b:
        raise ValueError(f"q_proxy and k must share the batch size, got {b} and {kb}")
    if kd != d:
        raise ValueError(f"q_proxy and k must share the head dim, got {d} and {kd}")
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"Hq={hq} (q_proxy) must be a positive multiple of Hkv={hkv} (k)")
    _checks.check_dot_head_dim(d)
    if tiles is None:
        return importance_tiles(p, l, q_proxy.dtype)
    if not isinstance(tiles, ImportanceTiles):
        raise ValueError(f"tiles must be an ImportanceTiles or None, got {type(tiles).__name__}")
    if p % tiles.block_rows:
        raise ValueError(f"tiles.block_rows={tiles.block_rows} must divide P={p} (proxy rows)")
    if l % tiles.block_keys:
        raise ValueError(f"tiles.block_keys={tiles.block_keys} must divide L={l} (keys)")
    if l % (tiles.block_keys * tiles.column_tiles):
        raise ValueError(
            f"tiles.block_keys * tiles.column_tiles = {tiles.block_keys} * {tiles.column_tiles} "
            f"must divide L={l} (keys): a pass-2 program owns that many keys"
        )
    return tiles


def proxy_importance_supported(q_proxy, k) -> bool:
    """Whether :func:`proxy_importance` accepts these operands with its default tiles."""
    return _checks.accepts(validate_operands, q_proxy, k, None)


def proxy_importance(
    q_proxy: jax.Array,
    k: jax.Array,
    real_rows: jax.Array | None = None,
    real_keys: jax.Array | None = None,
    *,
    tiles: ImportanceTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Mean softmax probability that each key receives from the proxy rows, per query head.

    ``out[b, h, j] = (1/P) Σ_i softmax_j(q_proxy[b, i, h] · k[b, j, h // (Hq/Hkv)] / √D)``:
    softmax over all L keys (no causal mask), averaged over the P rows, float32.

    Args:
      q_proxy: ``[B, P, Hq, D]`` proxy queries, P a multiple of 16.
      k: ``[B, L, Hkv, D]`` keys, L a multiple of 16, Hq a multiple of Hkv, same dtype as
        q_proxy (float32, bfloat16 or float16); D a power of two in [16, 256].
      real_rows, real_keys: ``[B]`` integers or None (all P, all L; both None: the unragged
        kernels): per batch row of a ragged batch, only its first ``real_rows`` proxy rows count
        in the mean (divided by real_rows) and only its first ``real_keys`` keys in the softmax;
        keys past real_keys get 0, a row with no real key (or no real row) 0 throughout. The
        padded rows and keys may hold anything finite. Counts are clipped to [0, P] / [0, L].
      tiles: :class:`ImportanceTiles`; default :func:`importance_tiles` (P, L, dtype).
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      ``[B, Hq, L]`` float32.

    Raises:
      ValueError: bad ranks, dtypes, shapes, head counts, head dim or tiles, or counts that are
        not ``[B]`` integers (the message names the argument and the rule).
    """
    tiles = validate_operands(q_proxy, k, tiles)
    counts = real_counts(q_proxy, k, real_rows, real_keys)
    return _proxy_importance(
        q_proxy, k, counts, tiles=tiles, interpret=_checks.resolve_interpret(interpret)
    )


def real_counts(q_proxy, k, real_rows, real_keys) -> tuple[jax.Array, jax.Array] | None:
    """``(real_rows, real_keys)`` as ``[B]`` int32 clipped to [0, P] and [0, L] (a None one:
    all of them), or None when both are None (the unragged kernels)."""
    if real_rows is None and real_keys is None:
        return None
    b, p = q_proxy.shape[:2]
    l = k.shape[1]
    counts = []
    for name, count, full in (("real_rows", real_rows, p), ("real_keys", real_keys, l)):
        if count is None:
            count = jnp.full((b,), full, jnp.int32)
        count = jnp.asarray(count)
        if count.shape != (b,) or not jnp.issubdtype(count.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be a [B] = [{b}] integer array or None, "
                f"got {count.dtype}{list(count.shape)}"
            )
        counts.append(jnp.clip(count, 0, full).astype(jnp.int32))
    return tuple(counts)


def kernel_params(q_proxy) -> dict:
    """Kernel keywords of both passes: the base-2 logit scale and the dot precision."""
    return dict(
        qk_scale=_checks.LOG2E / math.sqrt(q_proxy.shape[-1]),
        precision=_checks.dot_precision(q_proxy.dtype),
    )


def count_specs(counts, index_map):
    """The in_specs of the ragged counts (``[B]`` int32 each): one scalar per program, its batch
    row's (``index_map`` gives the batch index), or none when ``counts`` is None."""
    return [] if counts is None else [pl.BlockSpec((None,), index_map)] * len(counts)


def row_log2_sum_exp(
    q_proxy, k, *, num_keys: int, tiles: ImportanceTiles, interpret: bool, counts=None
):
    """Pass 1: ``lse [B, Hq, P]`` float32, each proxy row's log2-sum-exp2 of its base-2 logits
    over the first ``num_keys`` keys of ``k [B, N, Hkv, D]`` (a multiple of block_keys).

    counts: None or ``(real_rows, real_keys)`` ``[B]`` int32 (:func:`real_counts`): only the
    first real_keys keys enter a row's sum; the rows past real_rows, and every row of a batch
    row without a real key, get anything (-inf when their whole row tile is padding)."""
    b, p, hq, d = q_proxy.shape
    n, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bm, bn = tiles.block_rows, tiles.block_keys
    split_keys = min(tiles.split_keys, num_keys)  # never longer than L itself (whole tiles)
    num_splits = pl.cdiv(num_keys, split_keys)
    ragged = counts is not None

    # Per (split, row tile, batch, head) the running max and exp-sum of its split.
    stats_shape = jax.ShapeDtypeStruct((b, hq, num_splits, p), jnp.float32)
    stats_spec = pl.BlockSpec((None, None, None, bm), lambda s, r, bi, h: (bi, h, s, r))
    row_max, row_sum = pl.pallas_call(
        functools.partial(
            _row_stats_kernel,
            block_keys=bn,
            split_tiles=split_keys // bn,
            num_key_tiles=num_keys // bn,
            ragged=ragged,
            **kernel_params(q_proxy),
        ),
        out_shape=(stats_shape, stats_shape),
        grid=(num_splits, p // bm, b, hq),
        in_specs=[
            pl.BlockSpec((None, bm, None, d), lambda s, r, bi, h: (bi, r, h, 0)),
            # The whole key sequence of one kv head: only a base pointer for Triton; the loop
            # addresses its tiles.
            pl.BlockSpec(
                (None, n, None, d), lambda s, r, bi, h: (bi, 0, _checks.shared_head(h, group), 0)
            ),
            *count_specs(counts, lambda s, r, bi, h: (bi,)),
        ],
        out_specs=(stats_spec, stats_spec),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_importance_stats_m{bm}_n{bn}" + ("_ragged" if ragged else ""),
    )(q_proxy, k, *(counts or ()))

    # Splits → one log2-sum-exp2 per row, [B, Hq, P] (tiny: no kernel needed).
    top = row_max.max(axis=2)
    return top + jnp.log2(jnp.sum(row_sum * jnp.exp2(row_max - top[:, :, None]), axis=2))


def key_block_in_specs(num_rows: int, key_block: int, d: int, group: int) -> list:
    """The operands of a pass over key blocks, grid ``(key block j, batch, query head)``: all P
    proxy rows of the head ``[P, D]``, the block's ``key_block`` keys of its KV head ``[key_block,
    D]``, the rows' log-sum-exp ``[P]`` (pass 1's). Shared by pass 2 and the fused permutation
    pass (``pallas_kernels.proxy_permutation``)."""
    return [
        pl.BlockSpec((None, num_rows, None, d), lambda j, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec(
            (None, key_block, None, d), lambda j, bi, h: (bi, j, _checks.shared_head(h, group), 0)
        ),
        pl.BlockSpec((None, None, num_rows), lambda j, bi, h: (bi, h, 0)),
    ]


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def _proxy_importance(q_proxy, k, counts, *, tiles: ImportanceTiles, interpret: bool):
    b, p, hq, d = q_proxy.shape
    l, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bm, bn = tiles.block_rows, tiles.block_keys
    key_block = bn * tiles.column_tiles  # keys of one pass-2 program
    ragged = counts is not None  # static: None is an empty pytree, its own trace
    lse = row_log2_sum_exp(q_proxy, k, num_keys=l, tiles=tiles, interpret=interpret, counts=counts)

    # Pass 2: per (key block, batch, head) the column sums of the probabilities over all rows.
    return pl.pallas_call(
        functools.partial(
            _column_sums_kernel,
            block_rows=bm,
            block_keys=bn,
            num_row_tiles=p // bm,
            inv_rows=1.0 / p,
            ragged=ragged,
            **kernel_params(q_proxy),
        ),
        out_shape=jax.ShapeDtypeStruct((b, hq, l), jnp.float32),
        grid=(l // key_block, b, hq),
        in_specs=[
            *key_block_in_specs(p, key_block, d, group),
            *count_specs(counts, lambda j, bi, h: (bi,)),
        ],
        out_specs=pl.BlockSpec((None, None, key_block), lambda j, bi, h: (bi, h, j)),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_importance_columns_m{bm}_n{bn}"
        + (f"_c{tiles.column_tiles}" if tiles.column_tiles > 1 else "")
        + ("_ragged" if ragged else ""),
    )(q_proxy, k, lse, *(counts or ()))


def _row_stats_kernel(*refs, block_keys, split_tiles, num_key_tiles, ragged, qk_scale, precision):
    """One program: ``block_rows`` proxy rows against the key tiles of one split.

    q_ref [bm, D], k_ref [N, D]; max_ref, sum_ref [bm] (log2 units: the row max of
    s = q·k·log2(e)/√D over the split, and Σ exp2(s - max)).

    Ragged: real_rows_ref, real_keys_ref [] (this batch row's counts) follow k_ref. Only the
    split's tiles that hold a real key are walked, keys past real_keys masked; a row tile wholly
    past real_rows walks none. A split that walks none writes (_M_INIT, 0): weight 0 in the
    combine of the splits.
    """
    if ragged:
        q_ref, k_ref, real_rows_ref, real_keys_ref, max_ref, sum_ref = refs
    else:
        q_ref, k_ref, max_ref, sum_ref = refs
    first = pl.program_id(0) * split_tiles
    # The last split may be short; every split holds at least one tile.
    count = jnp.minimum(split_tiles, num_key_tiles - first)
    q = q_ref[...]
    bm = q.shape[0]
    if ragged:
        real_keys = real_keys_ref[...]
        real_tiles = lax.div(real_keys + block_keys - 1, block_keys)  # tiles with a real key
        count = jnp.clip(real_tiles - first, 0, count)
        count = jnp.where(pl.program_id(1) * bm < real_rows_ref[...], count, 0)

    def step(t, carry):
        m_prev, l_prev = carry
        start = (first + t) * block_keys
        keys = k_ref[pl.ds(start, block_keys), :]
        s = jnp.dot(q, keys.T, precision=precision, preferred_element_type=jnp.float32)
        s = s * qk_scale  # [bm, bn]
        if ragged:  # a where: padded keys may hold anything
            key = start + lax.broadcasted_iota(jnp.int32, (block_keys,), 0)
            s = jnp.where((key < real_keys)[None, :], s, _PADDED_LOGIT)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        l_new = l_prev * jnp.exp2(m_prev - m_new) + jnp.sum(jnp.exp2(s - m_new[:, None]), axis=1)
        return m_new, l_new

    carry = (jnp.full((bm,), _M_INIT, jnp.float32), jnp.zeros((bm,), jnp.float32))
    m, l = lax.fori_loop(0, count, step, carry)
    max_ref[...] = m
    sum_ref[...] = l


def key_tile(t: int, block_keys: int, num_tiles: int):
    """The index of key tile ``t`` of a program's ``num_tiles`` tiles of ``block_keys`` keys
    (static): the whole block when it is one tile."""
    return pl.ds(t * block_keys, block_keys) if num_tiles > 1 else slice(None)


def split_key_tiles(k_ref, block_keys: int) -> tuple:
    """A program's ``[num_tiles · block_keys, D]`` keys as ``[block_keys, D]`` tiles, one load
    each (the tuple :func:`probability_column_sums` takes)."""
    num_tiles = k_ref.shape[0] // block_keys
    return tuple(k_ref[key_tile(t, block_keys, num_tiles), :] for t in range(num_tiles))


def probability_column_sums(
    q_ref,
    lse_ref,
    key_tiles,
    *,
    block_rows,
    num_row_tiles,
    qk_scale,
    precision,
    real_rows=None,
    keys_in=None,
):
    """Σ over all rows of ``q_ref [R, D]`` of ``exp2(s - lse_row)`` for each key of each tile
    of ``key_tiles`` (``[bn, D]`` each): a tuple of ``[bn]`` float32, rows walked
    ``block_rows`` at a time; lse_ref ``[R]`` (log2 units).

    Ragged: ``real_rows`` (a scalar) leaves the rows at or past it out of the sums, ``keys_in``
    (a ``[bn]`` bool per key tile) gives the other keys 0; both by a where, so those rows' and
    keys' logits and lse may be anything (inf included)."""

    def step(r, sums):
        start = r * block_rows
        q = q_ref[pl.ds(start, block_rows), :]
        lse = lse_ref[pl.ds(start, block_rows)]
        if real_rows is not None:
            row_in = start + lax.broadcasted_iota(jnp.int32, (block_rows,), 0) < real_rows

        def probabilities(keys, key_in):
            p = jnp.exp2(
                jnp.dot(q, keys.T, precision=precision, preferred_element_type=jnp.float32)
                * qk_scale
                - lse[:, None]
            )
            if real_rows is not None:
                p = jnp.where(row_in[:, None], p, 0.0)
            if key_in is not None:
                p = jnp.where(key_in[None, :], p, 0.0)
            return p

        return tuple(
            acc + jnp.sum(probabilities(keys, key_in), axis=0)
            for acc, keys, key_in in zip(sums, key_tiles, keys_in or (None,) * len(key_tiles))
        )

    zeros = tuple(jnp.zeros((keys.shape[0],), jnp.float32) for keys in key_tiles)
    return lax.fori_loop(0, num_row_tiles, step, zeros)


def _column_sums_kernel(
    *refs, block_rows, block_keys, num_row_tiles, inv_rows, ragged, qk_scale, precision
):
    """One program: ``column_tiles`` tiles of ``block_keys`` keys against all P proxy rows,
    ``block_rows`` at a time (each row tile of q loaded once for all the key tiles).

    q_ref [P, D], k_ref [bn·column_tiles, D], lse_ref [P] (log2 units), out_ref
    [bn·column_tiles]: the mean over rows of exp2(s - lse_row), i.e. of the row softmax over all
    L keys.

    Ragged: real_rows_ref, real_keys_ref [] follow lse_ref; the mean is over the first real_rows
    rows (only their row tiles are walked), keys past real_keys get 0 (a program whose first key
    is past it walks no row at all).
    """
    if ragged:
        q_ref, k_ref, lse_ref, real_rows_ref, real_keys_ref, out_ref = refs
    else:
        q_ref, k_ref, lse_ref, out_ref = refs
    key_block = k_ref.shape[0]
    num_key_tiles = key_block // block_keys
    key_tiles = split_key_tiles(k_ref, block_keys)
    real_rows = keys_in = None
    if ragged:
        start = pl.program_id(0) * key_block
        real_rows, real_keys = real_rows_ref[...], real_keys_ref[...]
        iota = lax.broadcasted_iota(jnp.int32, (block_keys,), 0)
        keys_in = tuple(start + t * block_keys + iota < real_keys for t in range(num_key_tiles))
        num_row_tiles = jnp.where(
            start < real_keys, lax.div(real_rows + block_rows - 1, block_rows), 0
        )
    sums = probability_column_sums(
        q_ref,
        lse_ref,
        key_tiles,
        block_rows=block_rows,
        num_row_tiles=num_row_tiles,
        qk_scale=qk_scale,
        precision=precision,
        real_rows=real_rows,
        keys_in=keys_in,
    )
    if ragged:  # no real row: sums are 0, and so is the mean
        num_rows = jnp.maximum(real_rows, 1).astype(jnp.float32)
    for t, tile_sums in enumerate(sums):
        mean = tile_sums / num_rows if ragged else tile_sums * inv_rows
        out_ref[key_tile(t, block_keys, num_key_tiles)] = mean
