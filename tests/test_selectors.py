"""The baseline selectors: XAttention-style anti-diagonal scoring (alone, and permuted: PBS-Attn+)
and the static sink + local window, against hand-worked cases and their defining properties."""

from __future__ import annotations

import dataclasses

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
    jit_select_blocks,
    jit_select_from_probabilities,
    make_qkv,
    rel_err,
)

# --------------------------------------------------------------------------------------------
# A tiny anti-diagonal case worked by hand: N=12, block 4 (T=3), stride 2, D=1, no permutation,
# no sink. Queries alternate 1, 0 (even positions 1); keys are 0 except k[5] = 3.
#   Strided row r pairs q[2r+1]·k[2c] + q[2r]·k[2c+1] (the anti-diagonal of each 2×2 tile), so
#   only odd keys count: logit(r, c) = k[2c+1] / (√1 · 2) → 1.5 for column 2 (positions 4, 5),
#   0 elsewhere. (A main-diagonal pairing would read k[4] = 0 and see nothing.)
#   Query block 2 = strided rows 4, 5, causal over columns ≤ row:
#     row 4: softmax over columns 0..4 of [0, 0, 1.5, 0, 0] → col 2: e^1.5/(e^1.5+4) = 0.5284,
#            others 0.1179 → blocks (cols {0,1}, {2,3}, {4}) = 0.2358, 0.6463, 0.1179
#     row 5: columns 0..5 → col 2: e^1.5/(e^1.5+5) = 0.4727, others 0.1055
#            → blocks 0.2109, 0.5782, 0.2109
#   block distribution = mean of the two rows = [0.2234, 0.6122, 0.1644].
#   threshold 0.6: block 1 alone reaches it; the diagonal block 2 is forced → [0, 1, 1].
#   threshold 0.7: blocks 1 and 0 (0.836) → [1, 1, 1].
#   Query block 1 (rows 2, 3; columns ≤ row): [0.2879, 0.7121]; at 0.6 block 1 (the diagonal).
#   MeanPooling on the same input sees pooled keys [0, 0.75, 0] and pooled query 0.5: a flat
#   [0.289, 0.421, 0.289], so at 0.6 it keeps every block of row 2.
# --------------------------------------------------------------------------------------------
HAND_CFG = PBSConfig.paper(
    block_size=4,
    segment_size=4,
    threshold=0.6,
    force_sink=False,
    permute=False,
    selector="antidiagonal",
    antidiagonal_stride=2,
)


def _hand_inputs():
    q = jnp.asarray(np.tile([1.0, 0.0], 6), jnp.float32).reshape(1, 12, 1, 1)
    k = jnp.zeros((1, 12, 1, 1), jnp.float32).at[0, 5, 0, 0].set(3.0)
    return q, k


@pytest.fixture(params=["whole", "one_query_block_per_chunk"])
def antidiagonal_chunks(request, monkeypatch):
    """Score all query blocks at once, or one per chunk (the long-context path)."""
    if request.param == "one_query_block_per_chunk":
        monkeypatch.setattr(selection, "ANTIDIAGONAL_CHUNK_BYTES", 1)
    return request.param


def test_hand_worked_antidiagonal_probabilities(antidiagonal_chunks):
    q, k = _hand_inputs()
    perm = jit_permutation(q, k, HAND_CFG)
    # A fresh closure: traced under this test's ANTIDIAGONAL_CHUNK_BYTES (see conftest).
    probs = jax.jit(lambda q, k, p: selection.block_probabilities(q, k, p, HAND_CFG))(q, k, perm)
    probs = np.asarray(probs)[0, 0]
    np.testing.assert_allclose(probs[2], [0.2234, 0.6122, 0.1644], atol=1e-4)
    np.testing.assert_allclose(probs[1], [0.2879, 0.7121, 0.0], atol=1e-4)
    np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("threshold,last_row", [(0.6, [0, 1, 1]), (0.7, [1, 1, 1])])
def test_hand_worked_antidiagonal_mask(threshold, last_row, antidiagonal_chunks):
    q, k = _hand_inputs()
    cfg = dataclasses.replace(HAND_CFG, threshold=threshold)
    perm = jit_permutation(q, k, cfg)
    # A fresh closure: traced under this test's ANTIDIAGONAL_CHUNK_BYTES (see conftest).
    mask = jax.jit(lambda q, k, p: selection.select_blocks(q, k, p, cfg))(q, k, perm)
    np.testing.assert_array_equal(np.asarray(mask)[0, 0], [[1, 0, 0], [0, 1, 0], last_row])
    meanpool = dataclasses.replace(cfg, selector="meanpool")
    mask = np.asarray(jit_select_blocks(q, k, perm, meanpool))[0, 0]
    np.testing.assert_array_equal(mask[2], [1, 1, 1])


@pytest.mark.parametrize("n,chunk_bytes", [(200, 1), (449, 3 * 8 * 4 * 15 * 4), (512, 10**9)])
def test_antidiagonal_chunking_does_not_change_probabilities(n, chunk_bytes, monkeypatch):
    """Query blocks are independent softmax rows: any chunking (T not a multiple of the chunk,
    ragged N) gives the probabilities of scoring all of them at once."""
    cfg = PBSConfig.paper(block_size=32, segment_size=64, selector="antidiagonal", gqa="shared")
    q, k, _ = make_qkv(n, 1, n, 4, 2, 16)
    perm = jit_permutation(q, k, cfg)
    whole = np.asarray(jit_block_probabilities(q, k, perm, cfg))
    monkeypatch.setattr(selection, "ANTIDIAGONAL_CHUNK_BYTES", chunk_bytes)
    # A fresh closure, traced under the patched chunk size (the jit above keeps its trace).
    chunked = jax.jit(lambda q, k, p: selection.block_probabilities(q, k, p, cfg))(q, k, perm)
    chunked = np.asarray(chunked)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)  # fp32 reassociation
    np.testing.assert_allclose(
        whole.sum(-1)[..., cfg.segment_size // cfg.block_size :], 1.0, rtol=1e-5
    )


def test_antidiagonal_logits_match_a_loop():
    q, k, _ = make_qkv(2, 1, 32, 4, 2, 8)
    perm = permutation.identity_permutation(1, 2, 32)
    k_slots = jax.jit(permutation.gather_keys)(k, perm)
    logits = np.asarray(jax.jit(selection.antidiagonal_logits, static_argnums=2)(q, k_slots, 4))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for h in range(4):
        for r in range(8):
            for c in range(8):
                want = sum(qn[0, 4 * r + 3 - m, h] @ kn[0, 4 * c + m, h // 2] for m in range(4))
                np.testing.assert_allclose(
                    logits[0, h, r, c], want / (np.sqrt(8) * 4), rtol=1e-5, atol=1e-5
                )


# --------------------------------------------------------------------------------------------
# Properties shared by every selector.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
@pytest.mark.parametrize("n", [200, 256 + 3])
def test_antidiagonal_threshold_one_is_dense(permute, gqa, n):
    q, k, v = make_qkv(n + permute, 1, n, 4, 2, 16)
    cfg = PBSConfig.paper(
        block_size=16,
        segment_size=32,
        threshold=1.0,
        permute=permute,
        gqa=gqa,
        selector="antidiagonal",
    )
    out = jit_pbs_attention(q, k, v, cfg, impl="reference")
    assert rel_err(out, jit_exact_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("selector", pbs_jax.SELECTORS)
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_forced_blocks_present_for_every_selector(selector, permute, gqa):
    q, k, _ = make_qkv(7, 1, 150, 4, 2, 8)
    cfg = PBSConfig.paper(
        block_size=8, segment_size=16, threshold=0.3, gqa=gqa, permute=permute, selector=selector
    )
    perm, mask = (np.asarray(x) for x in jit_plan(q, k, cfg))
    t = mask.shape[-1]
    own = cfg.mask_segment_size // 8
    qb, kb = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    assert mask[..., qb // own == kb // own].all()
    for h in range(4):
        sink = int(np.argmax(perm[0, h // (4 // perm.shape[1])] == 0)) // 8
        assert mask[0, h, :, sink].all()
    assert not mask[..., ~((kb <= qb) | (qb // own == kb // own))].any()


@pytest.mark.parametrize("permute", [False, True])
def test_antidiagonal_lower_threshold_selects_a_subset(permute):
    q, k, _ = make_qkv(9, 1, 512, 4, 2, 16)
    cfg = PBSConfig.paper(block_size=16, segment_size=32, permute=permute, selector="antidiagonal")
    perm = jit_permutation(q, k, cfg)
    probs = jit_block_probabilities(q, k, perm, cfg)
    rows = np.asarray(probs).sum(-1)
    assert np.all((np.abs(rows - 1) < 1e-5) | (rows == 0))  # a distribution per query block
    masks = [
        np.asarray(
            jit_select_from_probabilities(probs, perm, dataclasses.replace(cfg, threshold=tau))
        )
        for tau in (0.3, 0.6, 0.9, 1.0)
    ]
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any()
    assert masks[0].sum() < masks[-1].sum()


def test_select_blocks_is_probabilities_then_top_p():
    q, k, _ = make_qkv(3, 2, 300, 2, 2, 8)
    for selector in pbs_jax.SELECTORS:
        cfg = PBSConfig.paper(block_size=16, segment_size=32, threshold=0.8, selector=selector)
        perm = jit_permutation(q, k, cfg)
        np.testing.assert_array_equal(
            np.asarray(jit_select_blocks(q, k, perm, cfg)),
            np.asarray(
                jit_select_from_probabilities(jit_block_probabilities(q, k, perm, cfg), perm, cfg)
            ),
        )


def test_antidiagonal_jits_and_gives_finite_outputs():
    q, k, v = make_qkv(5, 2, 333, 6, 2, 16, dtype=jnp.bfloat16)
    cfg = PBSConfig.paper(block_size=32, segment_size=64, selector="antidiagonal", gqa="shared")
    out, aux = jax.jit(
        lambda q, k, v: pbs_jax.pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    )(q, k, v)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert 0.0 < float(aux.density) < 1.0


def test_permutation_lowers_antidiagonal_density_on_structured_input():
    """PBS-Attn+ in miniature: sorted heavy hitters need fewer anti-diagonal-scored blocks."""
    q, k, v = make_qkv(4, 1, 1024, 2, 2, 16)
    dens = {}
    for permute in (True, False):
        cfg = PBSConfig.paper(
            block_size=32, segment_size=64, permute=permute, selector="antidiagonal"
        )
        _, aux = jit_pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
        dens[permute] = float(aux.density)
    assert dens[True] < dens[False]


# --------------------------------------------------------------------------------------------
# The static sink + local window baseline.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,target", [(16, 0.3), (32, 0.5), (64, 0.25), (64, 0.6)])
def test_sink_local_window_hits_its_target_density(t, target):
    window = blocks.sink_local_window(t, target)
    mask = np.asarray(blocks.sink_local_mask((1, 2, t), window))
    density = float(blocks.density(jnp.asarray(mask)).mean())
    # Densities move in steps of about 1/(T+1) (one more block per query row, roughly).
    assert abs(density - target) <= 1.0 / (t + 1)
    for w in (window - 1, window + 1):
        if 1 <= w <= t:
            other = float(blocks.density(blocks.sink_local_mask((1, 1, t), w)).mean())
            assert abs(density - target) <= abs(other - target)


def test_sink_local_mask_structure():
    mask = np.asarray(blocks.sink_local_mask((1, 1, 5), 2))[0, 0]
    np.testing.assert_array_equal(
        mask, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    )
    with pytest.raises(ValueError, match="window"):
        blocks.sink_local_mask((1, 1, 5), 0)


def test_sink_local_mask_runs_through_the_reference():
    q, k, v = make_qkv(6, 1, 96, 2, 2, 8)
    mask = blocks.sink_local_mask((1, 2, 6), 2)
    perm = permutation.identity_permutation(1, 2, 96)
    out = np.asarray(jit_block_sparse_reference(q, k, v, perm, mask, 16))
    # Query 95 (block 5) sees block 0 and blocks 4..5 (causal): positions 0..15 and 64..95.
    keys = np.r_[0:16, 64:96]
    qn, kn, vn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
    w = np.exp(qn[95] @ kn[keys].T / np.sqrt(8))
    np.testing.assert_allclose(out[0, 95, 0], (w / w.sum()) @ vn[keys], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------
def test_default_selector_is_meanpool():
    assert PBSConfig.paper() == PBSConfig.paper(selector="meanpool", antidiagonal_stride=8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(selector="xattention"), "selector"),
        (dict(selector=None), "selector"),
        (dict(antidiagonal_stride=0), "antidiagonal_stride"),
        (dict(antidiagonal_stride=2.0), "antidiagonal_stride"),
        (dict(selector="antidiagonal", block_size=12, segment_size=24), "multiple of antidiagonal"),
    ],
)
def test_bad_selector_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PBSConfig.paper(**kwargs)


@pytest.mark.parametrize("gqa", pbs_jax.GQA_MODES)
def test_extensions_through_the_kernel_equal_the_reference(gqa):
    """dense_tail and proxy_blocks are only other lists: the kernel path (Triton, interpret
    mode here) equals the exact reference, and the tail rows hold every causal block."""
    q, k, v = make_qkv(11, 1, 300, 4, 2, 16)
    cfg = PBSConfig(
        block_size=16, segment_size=32, threshold=0.6, dense_tail=20, proxy_blocks=2, gqa=gqa
    )
    out = jit_pbs_attention(q, k, v, cfg, impl="pallas")
    ref, aux = jit_pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    # Triton's float32 dots run in tf32 on a GPU (~1e-3); exact in interpret mode.
    assert rel_err(out, ref) < (3e-3 if jax.default_backend() == "gpu" else 1e-4)
    t = pbs_jax.num_blocks(300, 16)
    mask = np.asarray(aux.block_mask)
    causal = np.tril(np.ones((t, t), bool))
    np.testing.assert_array_equal(
        mask[..., t - 2 :, :] & causal[t - 2 :],
        np.broadcast_to(causal[t - 2 :], mask[..., t - 2 :, :].shape),
    )
    assert not mask[..., : t - 2, :][..., causal[: t - 2]].all()  # sparse before the tail
