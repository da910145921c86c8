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

The passes' building blocks live in :mod:`pallas_kernels.importance_passes`, their tiling in
:mod:`pallas_kernels.importance_tiling`. The pure-jnp statement of this contract is
``pallas_kernels.reference.proxy_importance_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels.importance_passes import (
    count_specs,
    kernel_params,
    key_block_in_specs,
    key_tile,
    probability_column_sums,
    real_counts,
    row_log2_sum_exp,
    split_key_tiles,
)
from pallas_kernels.importance_tiling import ImportanceTiles, importance_tiles

__all__ = [
    "ImportanceTiles",
    "importance_tiles",
    "proxy_importance",
    "proxy_importance_supported",
]


def validate_operands(q_proxy, k, tiles, proxy_rows: int | None = None) -> ImportanceTiles:
    """Check the contract (static: shapes and dtypes); return the tiles to use."""
    for name, x in (("q_proxy", q_proxy), ("k", k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-d array [B, rows, heads, D], got {x!r:.80}")
        if jnp.dtype(x.dtype).name not in _checks.FLOAT_DTYPES:
            raise ValueError(f"{name} dtype must be one of {_checks.FLOAT_DTYPES}, got {x.dtype}")
    b, m, hq, d = q_proxy.shape
    kb, l, hkv, kd = k.shape
    p = m if proxy_rows is None else proxy_rows
    if not isinstance(p, int) or isinstance(p, bool) or not 0 < p <= m or (m - p) % p:
        raise ValueError(
            f"proxy_rows must be None or an int P in [1, M={m}] with M - P a multiple of P "
            f"(the proxy is read in place as the last block of P rows), got {proxy_rows!r}"
        )
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


def proxy_importance_supported(q_proxy, k, proxy_rows: int | None = None) -> bool:
    """Whether :func:`proxy_importance` accepts these operands with its default tiles."""
    return _checks.accepts(validate_operands, q_proxy, k, None, proxy_rows)


def proxy_importance(
    q_proxy: jax.Array,
    k: jax.Array,
    real_rows: jax.Array | None = None,
    real_keys: jax.Array | None = None,
    *,
    proxy_rows: int | None = None,
    tiles: ImportanceTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Mean softmax probability that each key receives from the proxy rows, per query head.

    ``out[b, h, j] = (1/P) Σ_i softmax_j(q_proxy[b, i, h] · k[b, j, h // (Hq/Hkv)] / √D)``:
    softmax over all L keys (no causal mask), averaged over the P rows, float32.

    Args:
      q_proxy: ``[B, P, Hq, D]`` proxy queries, P a multiple of 16; or ``[B, M, Hq, D]`` with
        ``proxy_rows``.
      k: ``[B, L, Hkv, D]`` keys, L a multiple of 16, Hq a multiple of Hkv, same dtype as
        q_proxy (float32, bfloat16 or float16); D a power of two in [16, 256].
      real_rows, real_keys: ``[B]`` integers or None (all P, all L; both None: the unragged
        kernels): per batch row of a ragged batch, only its first ``real_rows`` proxy rows count
        in the mean (divided by real_rows) and only its first ``real_keys`` keys in the softmax;
        keys past real_keys get 0, a row with no real key (or no real row) 0 throughout. The
        padded rows and keys may hold anything finite. Counts are clipped to [0, P] / [0, L].
      proxy_rows: P, the proxy as the last P rows of a longer q_proxy ``[B, M, Hq, D]``, read
        in place (M - P a multiple of P; no copy of the slice); None: all rows. Not with
        real_rows (a ragged batch's proxies end at each row's own length: slice them).
      tiles: :class:`ImportanceTiles`; default :func:`importance_tiles` (P, L, dtype).
      interpret: Pallas interpret mode; None means "when the default backend is not a GPU".

    Returns:
      ``[B, Hq, L]`` float32.

    Raises:
      ValueError: bad ranks, dtypes, shapes, head counts, head dim or tiles, or counts that are
        not ``[B]`` integers (the message names the argument and the rule).
    """
    tiles = validate_operands(q_proxy, k, tiles, proxy_rows)
    if proxy_rows is not None and real_rows is not None:
        raise ValueError("proxy_rows and real_rows do not go together: slice a ragged proxy")
    counts = real_counts(q_proxy, k, real_rows, real_keys)
    return _proxy_importance(
        q_proxy,
        k,
        counts,
        proxy_rows=proxy_rows,
        tiles=tiles,
        interpret=_checks.resolve_interpret(interpret),
    )


@functools.partial(jax.jit, static_argnames=("proxy_rows", "tiles", "interpret"))
def _proxy_importance(q_proxy, k, counts, *, proxy_rows, tiles: ImportanceTiles, interpret: bool):
    b, m, hq, d = q_proxy.shape
    p = proxy_rows or m
    l, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bm, bn = tiles.block_rows, tiles.block_keys
    key_block = bn * tiles.column_tiles  # keys of one pass-2 program
    ragged = counts is not None  # static: None is an empty pytree, its own trace
    lse = row_log2_sum_exp(
        q_proxy,
        k,
        num_keys=l,
        tiles=tiles,
        interpret=interpret,
        counts=counts,
        proxy_rows=proxy_rows,
    )

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
            *key_block_in_specs(p, key_block, d, group, first_block=(m - p) // p),
            *count_specs(counts, lambda j, bi, h: (bi,)),
        ],
        out_specs=pl.BlockSpec((None, None, key_block), lambda j, bi, h: (bi, h, j)),
        compiler_params=_checks.triton_compiler_params(tiles),
        interpret=interpret,
        name=f"pbs_importance_columns_m{bm}_n{bn}"
        + (f"_c{tiles.column_tiles}" if tiles.column_tiles > 1 else "")
        + ("_ragged" if ragged else ""),
    )(q_proxy, k, lse, *(counts or ()))


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
