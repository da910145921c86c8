"""The planner's kernels and sort-free rules against their oracles.

- ``proxy_importance`` (Pallas, interpret mode here) against ``proxy_importance_reference``, and
  the segment permutation it induces against the reference importances; with several key tiles
  per pass-2 program (``column_tiles``) as well;
- the same on a ragged batch (per-row real proxy rows and real keys, padding of garbage, counts
  inside and on the edges of a pass-2 program's keys), and each ragged row against the kernel on
  that row alone;
- ``key_importance``'s GPU path (the kernel) against its CPU path (the reference), both GQA modes,
  unragged and ragged;
- the sort-free ``top_p_blocks`` against the sort-based rule it replaced (kept here only as the
  oracle), mask for mask, on many random rows with ties, zeros and empty rows, with every
  ``cuts_per_step``; and on the edges of its static search window (rows short of the threshold,
  one block holding all the mass, nothing allowed, thresholds near 0 and 1, T not a power of
  two, denormal and zero probabilities) against the sorted rule and against the bisection over
  all of [0, +inf] it replaced (the oracle only), there bit for bit.
"""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    ImportanceTiles,
    importance_tiles,
    importance_tiling,
    proxy_importance,
    proxy_importance_reference,
    proxy_importance_supported,
)
from pallas_kernels import top_p as top_p_module
from pbs_jax import PBSConfig, permutation, selection
from tests.conftest import interpret_on_fake_gpu, make_qkv

HEAD_DIM = 16  # small: interpret mode runs every tile's dot on the CPU
SEGMENT = 256

# --------------------------------------------------------------------------------------------
# proxy_importance
# --------------------------------------------------------------------------------------------

# (dtype, P rows, L keys, GQA group, tiles): every P, L, GQA and dtype of the contract, the
# default tiles and pass 1 in several splits (the last one short: 768 keys in splits of 512).
IMPORTANCE_CASES = [
    ("float32", 128, 768, 3, None),
    ("float32", 256, 256, 1, ImportanceTiles(64, 64, split_keys=128, num_warps=4)),
    ("bfloat16", 256, 768, 3, ImportanceTiles(128, 128, split_keys=512)),
    ("bfloat16", 128, 256, 1, None),
]
BATCH, MAX_ROWS, Q_HEADS, KV_HEADS = 2, 3 * SEGMENT, 6, 2


def _qk(dtype):
    """One draw (a single compile of the conftest sampler) that every case slices:
    ``q [2, 768, 6, 16]``, ``k [2, 768, 2, 16]``, with heavy-hitter keys."""
    q, k, _ = make_qkv(7, BATCH, MAX_ROWS, Q_HEADS, KV_HEADS, HEAD_DIM)
    return q.astype(dtype), k.astype(dtype)


@functools.cache
def _importance_pair(dtype: str, p: int, l: int, group: int, tiles):
    """(kernel, reference) importances ``[B, Hq, L]`` of one case, computed once per session."""
    q, k = _qk(jnp.dtype(dtype))
    q_proxy, keys = q[:, -p:, : KV_HEADS * group], k[:, :l]
    # interpret=None: the compiled kernel on a GPU, interpret mode elsewhere.
    kernel = proxy_importance(q_proxy, keys, tiles=tiles, interpret=None)
    return np.asarray(kernel), np.asarray(proxy_importance_reference(q_proxy, keys))


@pytest.mark.parametrize("dtype,p,l,group,tiles", IMPORTANCE_CASES)
def test_proxy_importance_matches_reference(dtype, p, l, group, tiles):
    kernel, reference = _importance_pair(dtype, p, l, group, tiles)
    chex.assert_shape(kernel, (BATCH, KV_HEADS * group, l))
    assert kernel.dtype == np.float32
    chex.assert_trees_all_close(kernel, reference, rtol=1e-5, atol=1e-9)
    # Each row's softmax sums to 1, so does their mean.
    chex.assert_trees_all_close(kernel.sum(-1), np.ones(kernel.shape[:2]), rtol=1e-5)


@pytest.mark.parametrize("dtype,p,l,group,tiles", IMPORTANCE_CASES)
def test_kernel_permutation_sorts_reference_importance(dtype, p, l, group, tiles):
    """The kernel's order equals the reference's up to ties: the reference importances read in
    the kernel's slot order never increase inside a segment (beyond float noise)."""
    kernel, reference = _importance_pair(dtype, p, l, group, tiles)
    cfg = PBSConfig(segment_size=SEGMENT)
    perm = np.asarray(permutation.segment_permutation(jnp.asarray(kernel), l, cfg))
    in_kernel_order = np.take_along_axis(reference, perm, axis=-1)
    steps = np.diff(in_kernel_order.reshape(*reference.shape[:2], l // SEGMENT, SEGMENT), axis=-1)
    assert steps.max() <= 1e-6


@pytest.mark.parametrize("lengths", [None, (600, 100)])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_key_importance_gpu_path_equals_cpu_path(monkeypatch, gqa, lengths):
    """``key_importance`` on GPU (the kernel, run here in interpret mode) equals its CPU path
    (the reference), in both GQA modes, unragged and ragged (a row of 512 complete-segment keys
    and a row of 100 proxy rows and no complete segment): one semantics, two evaluations. (The
    unragged kernel's shapes are the first importance case's: no new compile.)"""
    cfg = PBSConfig(block_size=32, segment_size=SEGMENT, proxy_blocks=4, gqa=gqa)  # P = 128
    q, k = _qk(jnp.float32)  # N = L = 768, GQA 3
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    on_cpu = permutation.key_importance(q, k, cfg, lengths)
    calls = interpret_on_fake_gpu(monkeypatch, permutation, "proxy_importance")
    on_gpu = permutation.key_importance(q, k, cfg, lengths)
    assert calls["proxy_importance"], "the GPU path did not run the kernel"
    chex.assert_shape(on_gpu, (BATCH, cfg.num_perm_heads(Q_HEADS, KV_HEADS), MAX_ROWS))
    chex.assert_trees_all_close(on_gpu, on_cpu, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "proxy_rows,tiles", [(64, ImportanceTiles(32, 32, split_keys=128)), (256, None)]
)
def test_proxy_read_in_place_equals_the_sliced_proxy(proxy_rows, tiles):
    """``proxy_rows``: the last P rows of the whole q, read in place, give the importance of the
    sliced proxy bit for bit (the same tiles walk the same rows)."""
    q, k = _qk(jnp.float32)  # M = 768
    keys = k[:, :256]
    sliced = proxy_importance(q[:, -proxy_rows:], keys, tiles=tiles, interpret=True)
    in_place = proxy_importance(q, keys, proxy_rows=proxy_rows, tiles=tiles, interpret=True)
    np.testing.assert_array_equal(np.asarray(in_place), np.asarray(sliced))
    with pytest.raises(ValueError, match="proxy_rows"):
        proxy_importance(q, keys, proxy_rows=160, interpret=True)  # 768 - 160: not a multiple
    with pytest.raises(ValueError, match="proxy_rows"):
        proxy_importance(q, keys, proxy_rows=1024, interpret=True)
    with pytest.raises(ValueError, match="real_rows"):
        real = jnp.full((BATCH,), 8, jnp.int32)
        proxy_importance(q, keys, real, proxy_rows=proxy_rows, interpret=True)


# P = 64 rows in 2 row tiles, L = 256 keys in tiles of 32: 4 programs of 2 tiles or 2 of 4.
@pytest.mark.parametrize("column_tiles", [2, 4])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_proxy_importance_column_tiles_match_reference(dtype, group, column_tiles):
    """Several key tiles per pass-2 program: the same importance as the reference."""
    tiles = ImportanceTiles(32, 32, split_keys=128, num_warps=4, column_tiles=column_tiles)
    kernel, reference = _importance_pair(dtype, 64, 256, group, tiles)
    chex.assert_shape(kernel, (BATCH, KV_HEADS * group, 256))
    chex.assert_trees_all_close(kernel, reference, rtol=1e-5, atol=1e-9)
    chex.assert_trees_all_close(kernel.sum(-1), np.ones(kernel.shape[:2]), rtol=1e-5)


def test_default_tiles_shrink_to_divide(monkeypatch):
    assert importance_tiles(128, 131072, jnp.bfloat16) == ImportanceTiles(
        128, 128, 512, 8, 2, column_tiles=2
    )
    # Several row tiles per pass-2 program: one key tile.
    assert importance_tiles(512, 131072, jnp.bfloat16).column_tiles == 1
    tiles = importance_tiles(48, 96, jnp.float32)
    assert (tiles.block_rows, tiles.block_keys, tiles.column_tiles) == (16, 32, 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        importance_tiles(40, 256, jnp.float32)
    # A default of 4 key tiles per program shrinks (never grows) so block_keys · column_tiles
    # divides L.
    base = ImportanceTiles(64, 64, split_keys=256, num_warps=4, column_tiles=4)
    monkeypatch.setitem(importance_tiling._DEFAULT_TILES, "float32", base)
    for num_keys, block_keys, column_tiles in [
        (4096, 64, 4),  # 64 tiles: 4 fit
        (384, 64, 2),  # 6 tiles
        (192, 64, 1),  # 3 tiles
        (128, 64, 2),  # 2 tiles
        (48, 16, 1),  # the key tile shrinks first: 3 tiles of 16
        (96, 32, 1),
    ]:
        tiles = importance_tiles(64, num_keys, jnp.float32)
        assert (tiles.block_keys, tiles.column_tiles) == (block_keys, column_tiles), num_keys
        assert num_keys % (tiles.block_keys * tiles.column_tiles) == 0


def _operands(b=1, p=32, hq=2, d=16, l=64, hkv=1, dtype=jnp.float32, k_dtype=None):
    q = jnp.zeros((b, p, hq, d), dtype)
    k = jnp.zeros((b, l, hkv, d), k_dtype or dtype)
    return q, k


@pytest.mark.parametrize(
    "operands,tiles,match",
    [
        (_operands(p=40), None, "P \\(proxy rows\\)"),
        (_operands(l=72), None, "L \\(keys\\)"),
        (_operands(hq=3, hkv=2), None, "multiple of Hkv"),
        (_operands(d=24), None, "head dim"),
        (_operands(k_dtype=jnp.bfloat16), None, "share a dtype"),
        (_operands(dtype=jnp.int32), None, "dtype must be"),
        ((jnp.zeros((32, 2, 16)), jnp.zeros((1, 64, 1, 16))), None, "4-d"),
        (_operands(p=32), ImportanceTiles(64, 16), "block_rows=64 must divide P=32"),
        (_operands(l=64), ImportanceTiles(16, 128), "block_keys=128 must divide L=64"),
        (
            _operands(l=96),
            ImportanceTiles(16, 32, column_tiles=2),
            "block_keys \\* tiles.column_tiles = 32 \\* 2 must divide L=96",
        ),
        (_operands(), "tiles", "ImportanceTiles or None"),
    ],
)
def test_proxy_importance_rejects_bad_operands(operands, tiles, match):
    with pytest.raises(ValueError, match=match):
        proxy_importance(*operands, tiles=tiles, interpret=True)
    if tiles is None:
        assert not proxy_importance_supported(*operands)


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        ImportanceTiles(block_rows=48)
    with pytest.raises(ValueError, match="split_keys"):
        ImportanceTiles(block_keys=128, split_keys=64)
    with pytest.raises(ValueError, match="num_warps"):
        ImportanceTiles(num_warps=3)
    for column_tiles in (0, 3, 6, 2.0, True):
        with pytest.raises(ValueError, match="column_tiles must be a power of two >= 1"):
            ImportanceTiles(column_tiles=column_tiles)


# --------------------------------------------------------------------------------------------
# proxy_importance on a ragged batch (real_rows, real_keys)
# --------------------------------------------------------------------------------------------

# B = 4 rows of P = 64 proxy rows over L = 320 keys; tiles of 32 rows × 64 keys, pass 1 in
# splits of 128 keys (the last one short): every count below lands inside a row tile, a key
# tile, a split, on their edges, or at P / L. The column-tile variants keep pass-2 programs of
# 64 keys (2 tiles of 32, 4 of 16), so the counts land inside a program's keys (in its first,
# a middle or its last tile) and on its edges as well.
RAGGED_P, RAGGED_L = 64, 320
RAGGED_TILES = ImportanceTiles(32, 64, split_keys=128, num_warps=4)
RAGGED_COLUMN_TILES = [
    ImportanceTiles(32, 32, split_keys=128, num_warps=4, column_tiles=2),
    ImportanceTiles(32, 16, split_keys=128, num_warps=4, column_tiles=4),
]
RAGGED_COUNTS = [
    # (real_rows, real_keys): all of P and L; fewer rows mid-tile with keys mid-split; one row
    # over 9 keys (less than a key tile); no real key at all.
    ((64, 40, 1, 33), (320, 200, 9, 0)),
    # Rows < P with all L keys; a whole row tile over exactly one key tile; a split's edge; one
    # key past it.
    ((17, 32, 64, 48), (320, 64, 128, 129)),
    # Keys ending in a program's last tile, a middle tile (100: the third 16-key tile of
    # [64, 128)), on a tile edge inside a program (48), and in the last program's last tile.
    ((64, 9, 50, 31), (250, 100, 48, 305)),
]
GARBAGE = 3e4  # padding the softmax would be ruled by, were it not masked


@functools.cache
def _ragged_qk(dtype: str, group: int):
    """``q_proxy [4, 64, 2·group, 16]``, ``k [4, 320, 2, 16]`` with heavy-hitter keys."""
    q, k, _ = make_qkv(11, 4, RAGGED_L, Q_HEADS, KV_HEADS, HEAD_DIM)
    return q[:, -RAGGED_P:, : KV_HEADS * group].astype(dtype), k.astype(dtype)


def _pad_with_garbage(x, counts):
    """``x [B, T, H, D]`` with the rows at or past ``counts[b]`` set to +GARBAGE: padding."""
    padded = jnp.arange(x.shape[1])[None, :] >= jnp.asarray(counts)[:, None]
    return jnp.where(padded[:, :, None, None], jnp.asarray(GARBAGE, x.dtype), x)


@pytest.mark.parametrize(
    "tiles", [RAGGED_TILES, *RAGGED_COLUMN_TILES], ids=["one_tile", "2_tiles", "4_tiles"]
)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ragged_proxy_importance_matches_reference(dtype, group, tiles):
    """With per-row counts the kernel equals the reference with the same counts: softmax over
    the first real_keys keys, mean over the first real_rows rows, 0 past real_keys and 0 for a
    row without a real key, never a NaN; padded rows and keys of large garbage leak nothing.
    (The counts are operands: one compile serves every count vector.)"""
    q_proxy, keys = _ragged_qk(dtype, group)
    for real_rows, real_keys in RAGGED_COUNTS:
        q_pad, k_pad = _pad_with_garbage(q_proxy, real_rows), _pad_with_garbage(keys, real_keys)
        rows, counts = jnp.asarray(real_rows, jnp.int32), jnp.asarray(real_keys, jnp.int32)
        kernel = np.asarray(
            proxy_importance(q_pad, k_pad, rows, counts, tiles=tiles, interpret=None)
        )
        reference = np.asarray(proxy_importance_reference(q_pad, k_pad, rows, counts))
        chex.assert_shape(kernel, (4, KV_HEADS * group, RAGGED_L))
        assert np.isfinite(kernel).all()
        chex.assert_trees_all_close(kernel, reference, rtol=1e-5, atol=1e-9)
        for b, n_keys in enumerate(real_keys):
            assert (kernel[b, :, n_keys:] == 0).all()
            want = np.full(kernel.shape[1], 1.0 if n_keys else 0.0)
            chex.assert_trees_all_close(kernel[b].sum(-1), want, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ragged_proxy_importance_row_equals_row_alone(dtype):
    """Row b of the ragged batch equals the kernel on that row alone, cut to its real rows and
    keys (other shapes, default tiles), and 0 past its keys."""
    q_proxy, keys = _ragged_qk(dtype, 3)
    real_rows, real_keys = (48, 16, 64, 32), (192, 64, 320, 0)
    q_pad, k_pad = _pad_with_garbage(q_proxy, real_rows), _pad_with_garbage(keys, real_keys)
    batch = np.asarray(
        proxy_importance(
            q_pad,
            k_pad,
            jnp.asarray(real_rows, jnp.int32),
            jnp.asarray(real_keys, jnp.int32),
            tiles=RAGGED_TILES,
            interpret=None,
        )
    )
    for b, (rows, n_keys) in enumerate(zip(real_rows[:2], real_keys[:2])):
        alone = proxy_importance(
            q_proxy[b : b + 1, :rows], keys[b : b + 1, :n_keys], interpret=None
        )
        chex.assert_trees_all_close(
            batch[b, :, :n_keys], np.asarray(alone[0]), rtol=1e-5, atol=1e-9
        )
        assert (batch[b, :, n_keys:] == 0).all()
    assert (batch[3] == 0).all()  # no real key


def test_ragged_proxy_importance_rejects_bad_counts():
    q, k = _operands(b=2)
    with pytest.raises(ValueError, match="real_rows must be a \\[B\\] = \\[2\\] integer"):
        proxy_importance(q, k, jnp.zeros((2,), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="real_keys must be"):
        proxy_importance(q, k, None, jnp.zeros((3,), jnp.int32), interpret=True)


# --------------------------------------------------------------------------------------------
# Sort-free top-p
# --------------------------------------------------------------------------------------------


def sorted_top_p_oracle(probs, allowed, threshold):
    """The sort-based rule ``top_p_blocks`` used before (the oracle only): sort each row, keep the
    sorted prefix whose mass before each position is < threshold, cut at its last value."""
    if threshold >= 1.0:
        return jnp.broadcast_to(allowed, probs.shape)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    mass = jnp.cumsum(sorted_probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(mass[..., :1]), mass[..., :-1]], axis=-1)
    keep_count = jnp.sum(mass_before < threshold, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_probs, keep_count - 1, axis=-1)
    return allowed & (probs >= cutoff)


def full_range_bisection_oracle(probs, allowed, threshold):
    """The search ``top_p_blocks`` ran before its static window (the oracle only): 31 halvings
    of the bit patterns [0, +inf] for the smallest v with G(v) = Σ_{p > v} p < threshold, the
    same float32 masked sums. The windowed search must give the very same mask, bit for bit,
    also where the sorted rule and the masked sums round differently."""
    if threshold >= 1.0:
        return jnp.broadcast_to(allowed, probs.shape)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + jnp.right_shift(hi - lo, 1)
        cut = jax.lax.bitcast_convert_type(mid, jnp.float32)
        below = jnp.sum(jnp.where(probs > cut, probs, 0.0), axis=-1, keepdims=True) < threshold
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    rows = probs.shape[:-1] + (1,)
    bounds = (jnp.zeros(rows, jnp.int32), jnp.full(rows, 0x7F800000, jnp.int32))
    _, cutoff_bits = jax.lax.fori_loop(0, 31, halve, bounds)
    return allowed & (probs >= jax.lax.bitcast_convert_type(cutoff_bits, jnp.float32))


THRESHOLDS = [0.5, 0.88, 0.9, 0.95, 1.0]
CUTS = [1, 3, 7]  # top_p_module.CUTS_PER_STEP
_sort_free = jax.jit(selection.top_p_blocks, static_argnums=2, static_argnames="cuts_per_step")
_bisection = jax.jit(full_range_bisection_oracle, static_argnums=2)
_sorted = jax.jit(sorted_top_p_oracle, static_argnums=2)


def _random_rows(rng, rows, t, kind):
    """``probs [rows, T]`` float32 (0 where not allowed) and ``allowed [rows, T]``.

    kinds: ``softmax`` (random logits of random spread, renormalised over the allowed blocks),
    ``ties`` (sixty-fourths summing to 1: many exact ties across the cut) and ``dyadic``
    (multiples of 1/16, not normalised): every partial sum exact in float32, so the masks must
    agree whatever the order of the additions, even where a mass equals the threshold;
    ``sparse`` (mostly exact zeros, renormalised).
    Each row allows a random prefix of random length (1 to T: the blocks after it are zeros
    that are not allowed, as the causal rows of a selection) at a random density, including
    rows with nothing allowed.
    """
    density = rng.choice([0.0, 0.2, 0.5, 0.9, 1.0], size=(rows, 1))
    length = rng.integers(1, t + 1, size=(rows, 1))  # rows of every length share one shape
    allowed = (rng.random((rows, t)) < density) & (np.arange(t) < length)
    if kind == "softmax":
        logits = rng.normal(size=(rows, t)) * rng.choice([0.1, 1.0, 4.0, 20.0], size=(rows, 1))
        weights = np.exp(logits - logits.max(-1, keepdims=True))
    elif kind == "ties":  # 64 sixty-fourths dealt to the allowed blocks: exact sums, ties
        shares = np.where(allowed, rng.random((rows, t)) ** 3, 0.0)
        shares = shares / np.maximum(shares.sum(-1, keepdims=True), 1e-300)
        weights = np.stack([rng.multinomial(64, row) if row.any() else row for row in shares])
        weights = weights / 64.0
    elif kind == "dyadic":
        weights = rng.integers(0, 17, size=(rows, t)) / 16.0
    else:  # sparse
        weights = rng.random((rows, t)) * (rng.random((rows, t)) < 0.15)
    weights = np.where(allowed, weights, 0.0)
    if kind in ("softmax", "sparse"):
        total = weights.sum(-1, keepdims=True)
        weights = weights / np.where(total > 0, total, 1.0)
    return jnp.asarray(weights, jnp.float32), jnp.asarray(allowed)


def _decided_by_rounding(probs, threshold):
    """``[rows]`` bool: rows where some mass before a sorted position lies within float32
    rounding of the threshold in exact arithmetic (float64 here). Both rules then decide by the
    rounding of their own order of additions (sorted cumulative sum vs masked row sum), so
    neither answer is the rule's; every other row must agree exactly."""
    if threshold >= 1.0:
        return np.zeros(probs.shape[0], bool)
    sorted_probs = -np.sort(-np.asarray(probs, np.float64), axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    return np.any(np.abs(mass_before - threshold) < 1e-6, axis=-1)


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_sort_free_top_p_equals_sorted_rule(threshold, cuts):
    rng = np.random.default_rng(int(threshold * 100))
    for kind in ("softmax", "ties", "dyadic", "sparse"):
        probs, allowed = _random_rows(rng, 4000, 48, kind)
        sort_free = np.asarray(_sort_free(probs, allowed, threshold, cuts_per_step=cuts))
        oracle = np.asarray(_sorted(probs, allowed, threshold))
        # Dyadic rows add exactly: no row may differ. Elsewhere only rows whose exact partial
        # masses come within rounding of the threshold (next to none) are left out.
        exact = kind in ("ties", "dyadic")
        ambiguous = _decided_by_rounding(probs, threshold) & (not exact)
        assert np.mean(ambiguous) < 0.002, kind
        np.testing.assert_array_equal(
            np.where(ambiguous[..., None], False, sort_free),
            np.where(ambiguous[..., None], False, oracle),
            err_msg=f"{kind} rows, threshold={threshold}",
        )


@hypothesis.given(
    st.lists(st.integers(0, 8), min_size=12, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.sampled_from(THRESHOLDS),
    st.sampled_from(CUTS),
)
@hypothesis.settings(max_examples=100, deadline=None)
def test_sort_free_top_p_on_tied_rows(levels, allowed, threshold, cuts):
    """Rows of eighths (exact sums; ties everywhere; not normalised: masses from 0 to 12),
    allowed anywhere, zeros elsewhere."""
    allowed = np.asarray(allowed)
    probs = jnp.asarray(np.where(allowed, np.asarray(levels) / 8.0, 0.0), jnp.float32)[None]
    allowed = jnp.asarray(allowed)[None]
    np.testing.assert_array_equal(
        np.asarray(_sort_free(probs, allowed, threshold, cuts_per_step=cuts)),
        np.asarray(_sorted(probs, allowed, threshold)),
    )


@pytest.mark.parametrize("cuts", CUTS)
def test_sort_free_top_p_broadcasts_allowed_over_heads(cuts):
    """``allowed [T, T]`` against ``probs [B, H, T, T]``, as ``select_from_probabilities``."""
    rng = np.random.default_rng(3)
    probs = jnp.asarray(rng.dirichlet(np.ones(9) * 0.3, size=(2, 3, 9)), jnp.float32)
    allowed = jnp.asarray(np.tril(np.ones((9, 9), bool)))
    probs = jnp.where(allowed, probs, 0.0)
    np.testing.assert_array_equal(
        np.asarray(_sort_free(probs, allowed, 0.9, cuts_per_step=cuts)),
        np.asarray(_sorted(probs, allowed, 0.9)),
    )


def _edge_rows(t, rng):
    """``probs [rows, T]`` float32 and ``allowed [rows, T]`` on the edges of the cut-off's
    search window: nothing allowed; one block holding all the mass (all allowed, or it alone);
    softmaxes whose logits spread over 100 (denormal and zero probabilities allowed),
    near-uniform and exactly uniform rows (ties at the cut), a row of explicit denormals beside
    one large value, one value 2 ulps above 1 (an approximate division's softmax), softmaxes
    over a few allowed blocks; last, a row short of any threshold above 0.4 (mass 0.375,
    allowed zeros: the whole row is kept)."""
    rows, allowed = [], []

    def add(p, a=None):
        rows.append(np.asarray(p, np.float32))
        allowed.append(np.ones(t, bool) if a is None else np.asarray(a, bool))

    def softmax(logits, a):
        logits = np.where(a, logits, -np.inf)
        return np.asarray(top_p_module.masked_softmax(jnp.asarray(logits, jnp.float32), a))

    one_hot = np.eye(t, dtype=np.float32)[rng.integers(t)]
    add(np.zeros(t), np.zeros(t))
    add(one_hot)
    add(one_hot, one_hot > 0)
    for spread in (100.0, 150.0, 300.0):
        add(softmax(-np.linspace(0.0, spread, t) * rng.random(t), np.ones(t, bool)))
    add(softmax(rng.normal(size=t) * 1e-7, np.ones(t, bool)))
    add(np.full(t, 1.0 / t))
    add(np.r_[1.0 - 2.0**-20, [1e-45, 1e-40, 1e-38, 2.0**-126, 0.0] * t][:t])
    add(np.r_[np.nextafter(np.nextafter(np.float32(1), 2), 2), np.zeros(t - 1)])
    for count in (1, 2, 5):
        a = np.zeros(t, bool)
        a[rng.choice(t, size=min(count, t), replace=False)] = True
        add(softmax(rng.normal(size=t) * 3.0, a), a)
    add(np.r_[0.25, 0.125, np.zeros(t)][:t])
    return jnp.asarray(np.stack(rows)), jnp.asarray(np.stack(allowed))


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize("t", [1, 5, 48, 1000, 1024])
def test_sort_free_top_p_on_the_search_window_edges(t, cuts):
    """The windowed search equals the bisection over all of [0, +inf], and the sorted rule, on
    rows at the window's edges, for thresholds from 1e-30 to 0.999999 (whose window is the whole
    range). Rows decided by rounding excepted: there the two searches' row sums are two compiled
    reductions, whose order of additions XLA picks per program on GPU (on CPU they agree bit for
    bit), so their masks may differ at the cut only: one holds the other."""
    edge_probs, edge_allowed = _edge_rows(t, np.random.default_rng(t))
    for threshold in (1e-30, 1e-6, 0.3, 0.88, 0.99, 0.999999):
        # Below 0.375 the last row (mass 0.375 < 1) reaches the threshold: outside the contract.
        rows = slice(None, -1 if threshold < 0.4 else None)
        probs, allowed = edge_probs[rows], edge_allowed[rows]
        sort_free = np.asarray(_sort_free(probs, allowed, threshold, cuts_per_step=cuts))
        bisection = np.asarray(_bisection(probs, allowed, threshold))
        ambiguous = _decided_by_rounding(probs, threshold)[:, None]  # uniform rows of T 1000
        np.testing.assert_array_equal(
            np.where(ambiguous, False, sort_free),
            np.where(ambiguous, False, bisection),
            err_msg=f"{threshold}",
        )
        nested = np.all(sort_free <= bisection, -1) | np.all(bisection <= sort_free, -1)
        assert nested.all(), f"{threshold}: rows {np.flatnonzero(~nested)} differ beyond the cut"
        np.testing.assert_array_equal(
            np.where(ambiguous, False, sort_free),
            np.where(ambiguous, False, np.asarray(_sorted(probs, allowed, threshold))),
            err_msg=f"{threshold}",
        )
        assert not sort_free[0].any()  # nothing allowed
        np.testing.assert_array_equal(sort_free[1:3], np.asarray(probs[1:3]) > 0)  # one block
        if threshold > 0.4:  # short of the threshold: every allowed block, zeros too
            assert sort_free[-1].all()


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize("t", [5, 64, 1024])
def test_sort_free_top_p_equals_full_range_bisection(t, cuts):
    """Random softmax rows (and the test's other kinds): the very mask of the bisection over
    all of [0, +inf], rows whose masses come within rounding of the threshold included."""
    rng = np.random.default_rng(t + cuts)
    for kind in ("softmax", "ties", "sparse"):
        probs, allowed = _random_rows(rng, 4000 if t < 1024 else 400, t, kind)
        for threshold in (0.5, 0.88, 0.95):
            np.testing.assert_array_equal(
                np.asarray(_sort_free(probs, allowed, threshold, cuts_per_step=cuts)),
                np.asarray(_bisection(probs, allowed, threshold)),
                err_msg=f"{kind} rows, threshold={threshold}",
            )


def test_cutoff_search_steps():
    """Fewer dependent steps than the 31 bisections over [0, +inf]; the whole range where the
    threshold is within rounding of 1."""
    steps = top_p_module.cutoff_search_steps
    assert [steps(1024, 0.88, cuts) for cuts in CUTS] == [27, 14, 9]
    assert [steps(64, 0.9, cuts) for cuts in CUTS] == [27, 14, 9]
    assert [steps(1024, 0.999999, cuts) for cuts in CUTS] == [30, 15, 10]
    assert steps(64, 1.0, 7) == 0
    for bad in (0, 2, 4, 15, 3.0, True):
        with pytest.raises(ValueError, match="cuts_per_step must be one of"):
            steps(64, 0.9, bad)
        with pytest.raises(ValueError, match="cuts_per_step must be one of"):
            selection.top_p_blocks(
                jnp.zeros((2, 4)), jnp.ones((2, 4), bool), 0.9, cuts_per_step=bad
            )
