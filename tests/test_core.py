"""The PBS functional core against hand-worked cases, an independent numpy oracle of the official
semantics, and the paper's lemmas (key/value permutation invariance, causality)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pbs_jax
from pbs_jax import PBSConfig, blocks, permutation, selection
from tests.conftest import (
    jit_block_probabilities,
    jit_block_sparse_reference,
    jit_exact_attention,
    jit_pbs_attention,
    jit_permutation,
    jit_plan,
    jit_select_from_probabilities,
    make_qkv,
    rel_err,
)
from tests.official_oracle import oracle_block_mask, oracle_pbs, oracle_permutation

SETTINGS = hypothesis.settings(max_examples=6, deadline=None, derandomize=True)


# --------------------------------------------------------------------------------------------
# A tiny case worked by hand: N=8, block 2, segment 4, D=1, every query = 1.
#   keys k = [0, 3, 1, 2 | 5, 0, 4, 1]; proxy = queries 6, 7 (both 1), so key importance is
#   softmax(k) and each segment sorts by descending k:
#   segment 0: k=[0,3,1,2] → positions [1, 3, 2, 0];  segment 1: k=[5,0,4,1] → [4, 6, 7, 5].
#   Slot blocks: 0 = {1, 3}, 1 = {2, 0}, 2 = {4, 6}, 3 = {7, 5}.
#   Query blocks 2 and 3 (segment 1) may choose among key blocks 0 and 1 (segment 0):
#   pooled q = 1, pooled k = [(3+2)/2, (1+0)/2] = [2.5, 0.5] → softmax [0.881, 0.119].
#   threshold 0.8: block 0 alone reaches it. The sink (token 0) lives in block 1.
# --------------------------------------------------------------------------------------------
HAND_K = np.array([0, 3, 1, 2, 5, 0, 4, 1], np.float32)
HAND_V = np.arange(8, dtype=np.float32) * 10.0 + 1.0
HAND_CFG = PBSConfig.paper(block_size=2, segment_size=4, threshold=0.8, force_sink=False)


def _hand_inputs():
    q = jnp.ones((1, 8, 1, 1), jnp.float32)
    k = jnp.asarray(HAND_K).reshape(1, 8, 1, 1)
    v = jnp.asarray(HAND_V).reshape(1, 8, 1, 1)
    return q, k, v


def test_hand_worked_permutation():
    q, k, _ = _hand_inputs()
    perm = jit_permutation(q, k, HAND_CFG)
    np.testing.assert_array_equal(np.asarray(perm)[0, 0], [1, 3, 2, 0, 4, 6, 7, 5])


@pytest.mark.parametrize("force_sink", [False, True])
def test_hand_worked_block_mask(force_sink):
    q, k, v = _hand_inputs()
    cfg = PBSConfig.paper(block_size=2, segment_size=4, threshold=0.8, force_sink=force_sink)
    _, aux = jit_pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    late = [1, 1, 1, 1] if force_sink else [1, 0, 1, 1]  # the sink adds block 1
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], late, late], bool)
    np.testing.assert_array_equal(np.asarray(aux.block_mask)[0, 0], expected)
    # Density counts causal work only (own-segment blocks above the diagonal are skipped).
    np.testing.assert_allclose(float(aux.density), np.tril(expected).sum() / 10.0)


# Beyond the paper, worked by hand on the same tiny case.
def test_hand_worked_dense_tail():
    """dense_tail=3 rows → 2 trailing blocks (rows 2, 3) take every causal block; rows before
    keep the paper's selection (block 0 alone above the threshold, no sink)."""
    q, k, v = _hand_inputs()
    for tail, expected_rows in (
        (1, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]]),
        (3, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
    ):
        cfg = PBSConfig.paper(
            block_size=2, segment_size=4, threshold=0.8, force_sink=False, dense_tail=tail
        )
        _, aux = jit_pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
        np.testing.assert_array_equal(np.asarray(aux.block_mask)[0, 0], np.array(expected_rows))


def test_hand_worked_proxy_blocks():
    """Queries [1, 1, 1, 1, 1, 1, -1, -1] over the keys above. One proxy block (queries 6, 7 =
    -1): importance softmax(-k), each segment sorted by ascending k → [0, 2, 3, 1 | 5, 7, 6, 4].
    Two blocks (queries 4..7): the mean of softmax(k) and softmax(-k) over all 8 keys, e.g.
    segment 0: k=0 → (1/237.9 + 1/2.946)/2 = .172, k=1 → .068, k=3 → .051, k=2 → .039, so
    [0, 2, 1, 3]; segment 1: k=5 → .313, 0 → .172, 4 → .118, 1 → .068, so [4, 5, 6, 7]."""
    _, k, _ = _hand_inputs()
    q = jnp.asarray([1, 1, 1, 1, 1, 1, -1, -1], jnp.float32).reshape(1, 8, 1, 1)
    for blocks_, expected in ((1, [0, 2, 3, 1, 5, 7, 6, 4]), (2, [0, 2, 1, 3, 4, 5, 6, 7])):
        cfg = PBSConfig.paper(block_size=2, segment_size=4, proxy_blocks=blocks_)
        perm = jit_permutation(q, k, cfg)
        np.testing.assert_array_equal(np.asarray(perm)[0, 0], expected)


def test_paper_rule_is_the_official_default():
    """PBSConfig.paper() is the paper's §4.1 setting with no extension switched on."""
    cfg = PBSConfig.paper()
    assert (cfg.block_size, cfg.segment_size, cfg.threshold) == (128, 256, 0.9)
    assert (cfg.dense_tail, cfg.proxy_blocks, cfg.selector, cfg.gqa) == (
        0,
        1,
        "meanpool",
        "replicate",
    )
    assert PBSConfig.paper(threshold=0.95).threshold == 0.95


def test_hand_worked_output():
    q, k, v = _hand_inputs()
    out = jit_pbs_attention(q, k, v, HAND_CFG, impl="reference")
    # Keys each query sees (original positions): own-segment keys up to itself, plus block 0
    # ({1, 3}) for the second segment.
    key_sets = [
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 1, 2, 3],
        [1, 3, 4],
        [1, 3, 4, 5],
        [1, 3, 4, 5, 6],
        [1, 3, 4, 5, 6, 7],
    ]
    for i, keys in enumerate(key_sets):
        w = np.exp(HAND_K[keys]) / np.exp(HAND_K[keys]).sum()
        np.testing.assert_allclose(float(out[0, i, 0, 0]), float(w @ HAND_V[keys]), rtol=1e-5)


def test_hand_worked_top_p():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05], [0.3, 0.3, 0.0, 0.0]])
    allowed = jnp.array([[True, True, True, True], [True, True, False, False]])
    keep = selection.top_p_blocks(probs, allowed, 0.8)
    # Row 0: mass before the 3rd block is 0.8 >= 0.8, so two blocks. Row 1 never reaches 0.8:
    # all its allowed blocks (the paper's rule), none of the forbidden ones.
    np.testing.assert_array_equal(np.asarray(keep), [[1, 1, 0, 0], [1, 1, 0, 0]])
    keep = selection.top_p_blocks(probs, allowed, 0.81)
    np.testing.assert_array_equal(np.asarray(keep)[0], [1, 1, 1, 0])


# --------------------------------------------------------------------------------------------
# The official semantics, against the independent float64 numpy oracle.
# --------------------------------------------------------------------------------------------
ORACLE_CASES = [
    # (n, block, segment, hq, hk, gqa)
    (257, 128, 256, 2, 2, "replicate"),  # just above one segment: remainder of 1 token
    (512, 128, 256, 1, 1, "replicate"),  # multiple of the segment
    (700, 128, 256, 2, 2, "replicate"),  # not a multiple of the block
    (100, 16, 32, 3, 3, "replicate"),
    (130, 16, 32, 6, 2, "replicate"),  # GQA 3
    (130, 16, 32, 8, 2, "shared"),  # GQA 4, one permutation per KV head
    (96, 16, 32, 4, 1, "replicate"),
]


@pytest.mark.parametrize("n,bs,seg,hq,hk,gqa", ORACLE_CASES)
def test_matches_official_semantics(n, bs, seg, hq, hk, gqa):
    q, k, v = make_qkv(n * 7 + hq, 1, n, hq, hk, 16)
    cfg = PBSConfig.paper(block_size=bs, segment_size=seg, threshold=0.9, gqa=gqa)
    out, aux = jit_pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    ref_out, ref_perm, ref_mask = oracle_pbs(q, k, v, bs, seg, 0.9, gqa=gqa)
    np.testing.assert_array_equal(np.asarray(aux.perm), ref_perm)
    np.testing.assert_array_equal(np.asarray(aux.block_mask), ref_mask)
    assert rel_err(out, ref_out) < 1e-5


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.95])
def test_selection_matches_oracle_across_thresholds(threshold):
    q, k, _ = make_qkv(3, 2, 200, 2, 2, 8)
    cfg = PBSConfig.paper(block_size=16, segment_size=32, threshold=threshold)
    perm, mask = jit_plan(q, k, cfg)  # compute_permutation, then select_blocks
    ref_mask = oracle_block_mask(q, k, np.asarray(perm), 16, 32, threshold)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)


def test_importance_matches_oracle_scores():
    q, k, _ = make_qkv(5, 1, 300, 4, 2, 16)
    cfg = PBSConfig.paper(block_size=32, segment_size=64, gqa="shared")
    scores = jax.jit(permutation.key_importance, static_argnums=2)(q, k, cfg)
    _, ref_scores = oracle_permutation(q, k, 32, 64, gqa="shared")
    chex.assert_shape(scores, (1, 2, 256))
    chex.assert_trees_all_close(np.asarray(scores, np.float64), ref_scores, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("n", [1, 7, 100, 256])
def test_short_sequences_fall_back_to_dense(n):
    q, k, v = make_qkv(n, 1, n, 2, 1, 8)
    out, aux = jit_pbs_attention(q, k, v, PBSConfig.paper(), impl="reference", return_aux=True)
    ref_out, _, _ = oracle_pbs(q, k, v, 128, 256, 0.9)
    assert rel_err(out, ref_out) < 1e-5
    np.testing.assert_array_equal(np.asarray(aux.perm)[0, 0], np.arange(n))


def test_meanpooling_baseline_matches_oracle():
    q, k, v = make_qkv(11, 1, 150, 2, 2, 16)
    cfg = PBSConfig.paper(block_size=16, segment_size=32, threshold=0.8, permute=False)
    out, aux = jit_pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    ref_out, ref_perm, ref_mask = oracle_pbs(q, k, v, 16, 32, 0.8, permute=False)
    np.testing.assert_array_equal(np.asarray(aux.perm), ref_perm)
    np.testing.assert_array_equal(np.asarray(aux.block_mask), ref_mask)
    assert rel_err(out, ref_out) < 1e-5
    t = ref_mask.shape[-1]
    assert ref_mask[..., 0].all() and ref_mask[..., np.arange(t), np.arange(t)].all()


# --------------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hk", [(2, 2), (3, 1), (8, 2)])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_threshold_one_is_dense_causal(hq, hk, gqa):
    q, k, v = make_qkv(hq + hk, 1, 150, hq, hk, 16)
    cfg = PBSConfig.paper(block_size=16, segment_size=32, threshold=1.0, gqa=gqa)
    out = jit_pbs_attention(q, k, v, cfg, impl="reference")
    assert rel_err(out, jit_exact_attention(q, k, v)) < 1e-5
    ref_out, _, _ = oracle_pbs(q, k, v, 16, 32, 1.0, gqa=gqa)
    assert rel_err(out, ref_out) < 1e-5


@hypothesis.given(
    st.sampled_from([33, 100, 160]),
    st.sampled_from([(8, 16), (16, 32), (16, 64)]),
    st.integers(0, 10_000),
)
@SETTINGS
def test_kv_permutation_invariance(n, blocks_, seed):
    """Lemma 3.1: attention over any within-segment permutation of (K, V) pairs equals attention
    over the original order, when every block is computed and masks use original positions."""
    bs, seg = blocks_
    q, k, v = make_qkv(seed, 1, n, 2, 1, 8, structured=False)
    g = n // seg
    rng = np.random.default_rng(seed)
    perm = np.concatenate(
        [rng.permutation(seg) + i * seg for i in range(g)] + [np.arange(g * seg, n)]
    )
    perm = jnp.asarray(np.broadcast_to(perm, (1, 2, n)), jnp.int32)
    t = -(-n // bs)
    every_block = jnp.ones((1, 2, t, t), bool)
    out = jit_block_sparse_reference(q, k, v, perm, every_block, bs)
    assert rel_err(out, jit_exact_attention(q, k, v)) < 1e-5


# Jitted (static i): drawn op by op, each new length would compile every op again.
@functools.partial(jax.jit, static_argnums=1)
def _redrawn_after(x, i, seed):
    """``x [B, N, H, D]`` with the rows after position i drawn afresh (standard normal)."""
    return x.at[:, i + 1 :].set(jax.random.normal(jax.random.key(seed), x[:, i + 1 :].shape))


@functools.partial(jax.jit, static_argnums=2)
def _noised_after(k, v, i, seed):
    """``k, v [B, N, H, D]`` with the same standard-normal noise added after position i."""
    noise = jax.random.normal(jax.random.key(seed), k[:, i + 1 :].shape)
    return k.at[:, i + 1 :].add(noise), v.at[:, i + 1 :].add(noise)


@hypothesis.given(st.sampled_from([40, 121, 200]), st.integers(0, 10_000))
@SETTINGS
def test_values_after_position_never_reach_earlier_outputs(n, seed):
    """Causality: the op never lets a query read a later token. Values after position i change
    nothing at or before i (the plan depends on q and k only, so it stays fixed)."""
    q, k, v = make_qkv(seed, 1, n, 2, 2, 8)
    cfg = PBSConfig.paper(block_size=8, segment_size=16, threshold=0.7)
    i = n // 2
    v2 = _redrawn_after(v, i, seed + 1)
    out1 = jit_pbs_attention(q, k, v, cfg, impl="reference")
    out2 = jit_pbs_attention(q, k, v2, cfg, impl="reference")
    np.testing.assert_array_equal(np.asarray(out1[:, : i + 1]), np.asarray(out2[:, : i + 1]))
    assert not np.allclose(np.asarray(out1[:, i + 1 :]), np.asarray(out2[:, i + 1 :]))


@hypothesis.given(st.sampled_from([40, 121, 200]), st.integers(0, 10_000))
@SETTINGS
def test_fixed_plan_is_causal_in_keys_and_values(n, seed):
    """With the plan (permutation, block mask) fixed, keys and values after i never reach i.
    (The plan itself reads the last block of queries: the paper's proxy, as the official code.)"""
    q, k, v = make_qkv(seed, 1, n, 2, 2, 8)
    cfg = PBSConfig.paper(block_size=8, segment_size=16, threshold=0.7)
    perm, mask = jit_plan(q, k, cfg)
    i = n // 3
    k2, v2 = _noised_after(k, v, i, seed + 7)
    out1 = jit_block_sparse_reference(q, k, v, perm, mask, 8)
    out2 = jit_block_sparse_reference(q, k2, v2, perm, mask, 8)
    np.testing.assert_array_equal(np.asarray(out1[:, : i + 1]), np.asarray(out2[:, : i + 1]))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 17)])
def test_inverse_permutation_matches_argsort(shape):
    rng = np.random.default_rng(0)
    perm = np.stack([rng.permutation(shape[-1]) for _ in range(int(np.prod(shape[:-1])))])
    perm = perm.reshape(shape).astype(np.int32)
    np.testing.assert_array_equal(
        permutation.inverse_permutation(jnp.asarray(perm)), np.argsort(perm, axis=-1)
    )


@hypothesis.given(
    st.sampled_from([1, 47, 300]),
    st.sampled_from([(8, 16), (16, 32), (16, 48)]),
    st.sampled_from(["replicate", "shared"]),
    st.integers(0, 10_000),
)
@SETTINGS
def test_permutation_is_a_bijection_per_segment(n, blocks_, gqa, seed):
    bs, seg = blocks_
    q, k, _ = make_qkv(seed, 2, n, 4, 2, 8)
    cfg = PBSConfig.paper(block_size=bs, segment_size=seg, gqa=gqa)
    perm = np.asarray(jit_permutation(q, k, cfg))
    chex.assert_shape(perm, (2, 4 if gqa == "replicate" else 2, n))
    assert perm.dtype == np.int32
    g = n // seg
    for s in range(g):
        np.testing.assert_array_equal(
            np.sort(perm[..., s * seg : (s + 1) * seg], axis=-1),
            np.broadcast_to(np.arange(s * seg, (s + 1) * seg), perm[..., :seg].shape),
        )
    np.testing.assert_array_equal(
        perm[..., g * seg :], np.broadcast_to(np.arange(g * seg, n), perm[..., g * seg :].shape)
    )


def test_permutation_sorts_importance_descending():
    q, k, _ = make_qkv(2, 1, 320, 2, 2, 16)
    cfg = PBSConfig.paper(block_size=32, segment_size=64)
    scores = np.asarray(permutation.key_importance(q, k, cfg))
    perm = np.asarray(permutation.segment_permutation(jnp.asarray(scores), 320, cfg))
    for s in range(5):
        sorted_scores = scores[0, 0, perm[0, 0, s * 64 : (s + 1) * 64]]
        assert np.all(np.diff(sorted_scores) <= 0)


@hypothesis.given(
    st.sampled_from([17, 150, 300]),
    st.sampled_from([0.3, 0.6, 0.9]),
    st.sampled_from(["replicate", "shared"]),
    st.booleans(),
    st.integers(0, 10_000),
)
@SETTINGS
def test_forced_blocks_always_present(n, threshold, gqa, permute, seed):
    q, k, v = make_qkv(seed, 1, n, 4, 2, 8)
    cfg = PBSConfig.paper(
        block_size=8, segment_size=16, threshold=threshold, gqa=gqa, permute=permute
    )
    perm, mask = jit_plan(q, k, cfg)
    perm, mask = np.asarray(perm), np.asarray(mask)
    t = mask.shape[-1]
    own = cfg.mask_segment_size // 8
    qb, kb = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    assert mask[..., qb // own == kb // own].all()  # every own-segment block
    for h in range(4):
        sink = int(np.argmax(perm[0, h // (4 // perm.shape[1])] == 0)) // 8
        assert mask[0, h, :, sink].all()  # the block holding original token 0
    causal_or_own = (kb <= qb) | (qb // own == kb // own)
    assert not mask[..., ~causal_or_own].any()  # never a future segment


@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_lower_threshold_selects_a_subset(gqa):
    """The plan's block mask at each threshold, from one permutation and one set of block
    probabilities (the threshold changes neither; select_blocks is probabilities then top-p:
    test_selectors.test_select_blocks_is_probabilities_then_top_p), so no compile per
    threshold."""
    q, k, _ = make_qkv(9, 1, 512, 4, 2, 16)
    cfg = PBSConfig.paper(block_size=16, segment_size=32, gqa=gqa)
    perm = jit_permutation(q, k, cfg)
    probs = jit_block_probabilities(q, k, perm, cfg)
    masks, dens = [], []
    for tau in (0.2, 0.5, 0.8, 0.9, 0.99, 1.0):
        mask = jit_select_from_probabilities(probs, perm, dataclasses.replace(cfg, threshold=tau))
        masks.append(np.asarray(mask))
        dens.append(float(jnp.mean(blocks.density(mask))))  # the op's aux.density
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any()  # nested top-p sets
    assert dens == sorted(dens) and dens[0] < dens[-1]


def test_permutation_lowers_density_on_structured_input():
    """The paper's claim in miniature: heavy hitters sorted to the front of their segments need
    fewer blocks for the same threshold than the unpermuted MeanPooling baseline."""
    q, k, v = make_qkv(4, 1, 1024, 2, 2, 16)
    dens = {}
    for permute in (True, False):
        _, aux = jit_pbs_attention(
            q,
            k,
            v,
            PBSConfig.paper(block_size=32, segment_size=64, permute=permute),
            impl="reference",
            return_aux=True,
        )
        dens[permute] = float(aux.density)
    assert dens[True] < dens[False]


def test_index_lists_compact_the_mask():
    cfg = PBSConfig.paper(block_size=8, segment_size=16)
    mask = blocks.fixed_density_mask(jax.random.key(0), (2, 3, 9), 0.4, cfg)
    lists = blocks.index_lists(mask, cfg)
    ids, full, total = (np.asarray(x) for x in lists)
    m = np.asarray(mask)
    for b in range(2):
        for h in range(3):
            for i in range(9):
                selected = np.flatnonzero(m[b, h, i])
                np.testing.assert_array_equal(ids[b, h, i, : total[b, h, i]], selected)
                assert full[b, h, i] == np.sum(selected < (i // 2) * 2)
    assert ids.dtype == np.int32 and full.dtype == np.int32


@pytest.mark.parametrize(
    ("tq", "tk", "density"),
    [(70, 70, 0.3), (20, 70, 0.3), (5, 64, 0.9), (3, 33, 0.05), (64, 97, 0.5)],
)
def test_index_lists_match_a_numpy_compaction(tq, tk, density):
    """Chunks (Tq < Tk), rows of many 32-block words and a partial last word, empty and full
    rows: every slot, the zeros after each list included, and both counts."""
    cfg = PBSConfig.paper(block_size=8, segment_size=24)
    rng = np.random.default_rng(tk + tq)
    m = rng.random((2, 3, tq, tk)) < density
    m[0, 0, 0] = False
    m[1, 2, -1] = True
    lists = blocks.index_lists(jnp.asarray(m), cfg)
    ids, full, total = (np.asarray(x) for x in lists)
    earlier = np.asarray(pbs_jax.earlier_segment_blocks(tk, cfg, tk - tq))
    want_ids = np.zeros(m.shape, np.int32)
    for row in np.ndindex(m.shape[:-1]):
        kept = np.flatnonzero(m[row])
        want_ids[row][: kept.size] = kept
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(total, m.sum(-1))
    np.testing.assert_array_equal(full, (m & earlier).sum(-1))
    assert ids.dtype == full.dtype == total.dtype == np.int32


def test_density_counts_blocks():
    mask = jnp.zeros((1, 1, 4, 4), bool).at[0, 0, [0, 1, 2, 3], [0, 1, 2, 3]].set(True)
    np.testing.assert_allclose(np.asarray(blocks.density(mask)), [[4 / 10]])


def test_density_of_dense_is_exactly_one():
    """Every block kept (own-segment blocks above the diagonal included) is density 1, not more:
    a causal kernel computes the own segment's causal blocks only."""
    cfg = PBSConfig.paper(block_size=2, segment_size=4)
    mask = jnp.ones((1, 1, 5, 5), bool)
    assert float(blocks.density(mask)[0, 0]) == 1.0
    # Own causal blocks: q0 {0}, q1 {0, 1}, q2 {2}, q3 {2, 3}, q4 {4}.
    own = mask & pbs_jax.own_segment_blocks(5, cfg)
    np.testing.assert_allclose(float(blocks.density(own)[0, 0]), 7 / 15)


@pytest.mark.parametrize("q_offset", [0, 192])  # a whole prefill; a chunk of its last 64 blocks
def test_fixed_density_mask_hits_its_target(q_offset):
    cfg = PBSConfig.paper(block_size=128, segment_size=256)
    mask = blocks.fixed_density_mask(jax.random.key(1), (1, 8, 256), 0.2, cfg, q_offset)
    assert mask.shape == (1, 8, 256 - q_offset, 256)
    assert abs(float(blocks.density(mask).mean()) - 0.2) < 0.01
    # Row i is query block q_offset + i: its whole own segment in, nothing after that segment.
    m = np.asarray(mask)[0]
    for i, qb in enumerate(range(q_offset, 256)):
        seg = qb // 2 * 2
        assert m[:, i, seg : seg + 2].all() and not m[:, i, seg + 2 :].any()


# --------------------------------------------------------------------------------------------
# Transformations, dtypes and lengths.
# --------------------------------------------------------------------------------------------
def test_jit_of_jit_and_vmap():
    q, k, v = make_qkv(1, 3, 100, 2, 1, 8)
    cfg = PBSConfig.paper(block_size=16, segment_size=32)
    f = jax.jit(lambda q, k, v: pbs_jax.pbs_attention(q, k, v, cfg, impl="reference"))
    batched = f(q, k, v)
    per_item = jax.vmap(
        lambda q, k, v: pbs_jax.pbs_attention(q[None], k[None], v[None], cfg, impl="reference")[0]
    )(q, k, v)
    chex.assert_trees_all_close(batched, per_item, atol=1e-6)
    for i in range(3):
        one = pbs_jax.pbs_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], cfg, impl="reference")
        chex.assert_trees_all_close(batched[i : i + 1], one, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
    q, k, v = make_qkv(6, 1, 200, 4, 2, 16, dtype=dtype)
    cfg = PBSConfig.paper(block_size=16, segment_size=32, threshold=1.0)
    out = jit_pbs_attention(q, k, v, cfg, impl="reference")
    chex.assert_type(out, dtype)
    chex.assert_shape(out, (1, 200, 4, 16))
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = jit_exact_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert rel_err(out, ref) < (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("n", [1, 5, 16, 33, 63, 64, 65, 129])
def test_lengths_against_oracle(n):
    q, k, v = make_qkv(n + 100, 1, n, 2, 2, 8)
    out = jit_pbs_attention(
        q, k, v, PBSConfig.paper(block_size=16, segment_size=32, threshold=0.8), impl="reference"
    )
    ref_out, _, _ = oracle_pbs(q, k, v, 16, 32, 0.8)
    chex.assert_shape(out, (1, n, 2, 8))
    assert rel_err(out, ref_out) < 1e-5


def test_no_nan_on_extreme_inputs():
    q, k, v = make_qkv(8, 1, 300, 2, 2, 16)
    for scale in (1e-4, 30.0):
        out = jit_pbs_attention(
            q * scale,
            k * scale,
            v,
            PBSConfig.paper(block_size=16, segment_size=32),
            impl="reference",
        )
        assert np.isfinite(np.asarray(out)).all()


# --------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------
_Q = jnp.ones((1, 8, 4, 8)) * 0.5
_K = jnp.ones((1, 8, 2, 8)) * 0.5


@pytest.mark.parametrize(
    "q,k,v,match",
    [
        (_Q[0], _K, _K, "rank 4"),
        (_Q, _K[..., :4], _K[..., :4], "agree"),
        (_Q, _K[:, :4], _K[:, :4], "agree"),
        (_Q, jnp.ones((1, 8, 3, 8)), jnp.ones((1, 8, 3, 8)), "multiple"),
        (_Q, _K, _K.astype(jnp.bfloat16), "one dtype"),
        (_Q, _K, _K[:, :, :1], "same shape"),
        (_Q.astype(jnp.int32), _K.astype(jnp.int32), _K.astype(jnp.int32), "float32"),
        (_Q[:, :0], _K[:, :0], _K[:, :0], "positive"),
    ],
)
def test_bad_inputs_raise(q, k, v, match):
    with pytest.raises(ValueError, match=match):
        pbs_jax.pbs_attention(q, k, v)


def test_float64_is_refused_not_downcast():
    q64 = np.asarray(_Q, np.float64)
    with pytest.raises(ValueError, match="float64"):
        pbs_jax.pbs_attention(q64, _K, _K)


def test_array_likes_are_converted():
    """Nested lists and numpy float32 arrays give what the same jax arrays give."""
    q, k, v = make_qkv(3, 1, 40, 2, 1, 8)
    cfg = PBSConfig.paper(block_size=8, segment_size=16)
    expected = pbs_jax.pbs_attention(q, k, v, cfg, impl="reference")
    out = pbs_jax.pbs_attention(np.asarray(q).tolist(), np.asarray(k), v, cfg, impl="reference")
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)


def test_gradient_fails_with_a_clear_message():
    """The op is forward-only: jax.grad through it names the reason, not a lowering error."""
    q, k, v = make_qkv(4, 1, 40, 2, 1, 8)
    cfg = PBSConfig.paper(block_size=8, segment_size=16)
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda q: pbs_jax.pbs_attention(q, k, v, cfg, impl="reference").sum())(q)


def test_bad_impl_raises():
    with pytest.raises(ValueError, match="impl"):
        pbs_jax.pbs_attention(_Q, _K, _K, impl="triton")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=100, segment_size=256), "multiple of block_size"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(gqa="grouped"), "gqa"),
        (dict(permute=1), "permute"),
        (dict(segment_size=2.5), "segment_size"),
        (dict(dense_tail=-1), "dense_tail"),
        (dict(dense_tail=1.5), "dense_tail"),
        (dict(proxy_blocks=0), "proxy_blocks"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PBSConfig(**kwargs)
