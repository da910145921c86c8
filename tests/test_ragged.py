"""Batches of different lengths (right padding): one batch equals each row run alone, for the
op (reference and Triton kernel in interpret mode) and for the model (prefill and greedy
decode); padded outputs are exactly 0; ``lengths=None`` is today's op; bad lengths raise."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import JittedLlama, LayerAttention, Llama, PBSAttention
from pbs_jax import PBSConfig, pbs_attention
from pbs_jax.attention import _forward, _pbs_forward
from tests.conftest import TINY, make_qkv, random_tokens

N = 600
# 600: a full row; 389: a partial last block, an incomplete last segment and a proxy (512 rows
# by default) longer than the row; 256: exactly one segment, dense when alone; 130: shorter.
CASES = {  # (config, Hq, Hkv, lengths)
    "default-gqa3-replicate": (PBSConfig(), 3, 1, (600, 389)),
    "paper-gqa3-shared": (PBSConfig.paper(gqa="shared"), 3, 1, (600, 130)),
    "default-gqa1": (PBSConfig(), 2, 2, (389, 256)),
}


def padded_with_garbage(x, lengths, value):
    """x [B, N, H, D] with every position >= lengths[b] set to a large finite ``value``: the
    result must not depend on what padding holds."""
    pad = jnp.arange(x.shape[1])[None, :, None, None] >= jnp.asarray(lengths)[:, None, None, None]
    return jnp.where(pad, jnp.asarray(value, x.dtype), x)


def ragged_case(hq, hk, lengths, seed=0):
    """q, k, v ``[len(lengths), N, H, 16]`` whose padding holds large finite garbage."""
    q, k, v = make_qkv(seed, len(lengths), N, hq, hk, 16)
    return (
        padded_with_garbage(q, lengths, 300.0),
        padded_with_garbage(k, lengths, -300.0),
        padded_with_garbage(v, lengths, 1e4),
    )


def rows_alone(q, k, v, cfg, lengths):
    """(out, aux) of each row run alone on its real tokens (the oracle of a ragged batch)."""
    return [
        pbs_attention(
            q[b : b + 1, :n],
            k[b : b + 1, :n],
            v[b : b + 1, :n],
            cfg,
            impl="reference",
            return_aux=True,
        )
        for b, n in enumerate(lengths)
    ]


def assert_equals_rows_alone(out, aux, cfg, lengths, alone, atol=2e-5):
    """Each row of the ragged result against the same row run alone: output (0 past its
    length), permutation and block mask (nothing selected outside the row's own blocks), and
    the aux density as the mean of the rows' own."""
    n = out.shape[1]
    assert np.isfinite(np.asarray(out)).all()
    for b, length in enumerate(lengths):
        alone_out, alone_aux = alone[b]
        chex.assert_trees_all_close(out[b, :length], alone_out[0], atol=atol, rtol=atol)
        assert np.all(np.asarray(out[b, length:]) == 0.0), f"row {b}: padded outputs not 0"
        if aux is None:
            continue
        t = alone_aux.block_mask.shape[-1]
        mask = np.asarray(aux.block_mask[b])
        assert not mask[:, t:].any() and not mask[:, :, t:].any(), "padding selected"
        if length > cfg.segment_size:
            np.testing.assert_array_equal(aux.perm[b, :, :length], alone_aux.perm[0])
            np.testing.assert_array_equal(mask[:, :t, :t], alone_aux.block_mask[0])
            assert (np.asarray(aux.perm[b, :, length:]) == np.arange(length, n)).all()
        else:  # dense alone: the identity, and every causal block of the row computed
            assert (np.asarray(aux.perm[b]) == np.arange(n)).all()
            assert mask[:, :t, :t][:, np.tril(np.ones((t, t), bool))].all()
    if aux is not None:
        mean_alone = np.mean([float(a.density) for _, a in alone])
        np.testing.assert_allclose(float(aux.density), mean_alone, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_ragged_batch_equals_rows_alone(name):
    cfg, hq, hk, lengths = CASES[name]
    q, k, v = ragged_case(hq, hk, lengths)
    out, aux = pbs_attention(q, k, v, cfg, impl="reference", return_aux=True, lengths=lengths)
    alone = rows_alone(q, k, v, cfg, lengths)
    assert_equals_rows_alone(out, aux, cfg, lengths, alone)
    if name == "default-gqa3-replicate":
        # The Triton kernel (interpret mode) as it is: padded keys lie after every real query
        # (causality keeps them out) and padded query blocks list no block.
        out_kernel = pbs_attention(q, k, v, cfg, impl="pallas", lengths=lengths)
        assert_equals_rows_alone(out_kernel, None, cfg, lengths, alone, atol=1e-4)


def test_lengths_none_is_todays_op_and_one_compile_serves_every_lengths():
    cfg, hq, hk, lengths = CASES["default-gqa3-replicate"]  # compiled above: same shapes
    q, k, v = ragged_case(hq, hk, lengths)
    before = _forward._cache_size()
    full = pbs_attention(q, k, v, cfg, impl="reference", return_aux=True, lengths=[N, N])
    other, _ = pbs_attention(
        q, k, v, cfg, impl="reference", return_aux=True, lengths=np.array([17, 300])
    )
    assert _forward._cache_size() - before <= 1  # 0 after the case above compiled it
    today = pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    chex.assert_trees_all_close(full[0], today[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(full[1].perm, today[1].perm)
    np.testing.assert_array_equal(full[1].block_mask, today[1].block_mask)
    assert np.all(np.asarray(other[0, 17:]) == 0.0) and np.all(np.asarray(other[1, 300:]) == 0)

    # No lengths, no ragged work: the traced program has none of the lengths' masks (the
    # clamp of the lengths is the first of them).
    def traced(*args):
        return str(
            jax.make_jaxpr(lambda *a: _pbs_forward(*a[:3], cfg, "reference", False, *a[3:]))(*args)
        )

    assert "name=clip" in traced(q, k, v, jnp.asarray(lengths))
    assert "name=clip" not in traced(q, k, v)


@pytest.mark.parametrize(
    "lengths, words",
    [
        ([5, 5], "shape [B] = (3,)"),
        ([[5, 5, 5]], "shape [B] = (3,)"),
        ([5.0, 5.0, 5.0], "must be integers"),
        ([0, 5, 5], "lengths[0] = 0"),
        ([5, -1, 5], "lengths[1] = -1"),
        ([5, 5, 33], "[1, N] = [1, 32]"),
    ],
)
def test_bad_lengths_raise_clear_errors(lengths, words):
    q = jnp.zeros((3, 32, 2, 8))
    with pytest.raises(ValueError) as error:
        pbs_attention(q, q, q, PBSConfig(), lengths=lengths)
    assert words in str(error.value)


# ----------------------------------------------------------------------------------------
# The model: prefill of a right-padded batch and greedy decode from each row's own position
# ----------------------------------------------------------------------------------------

MODEL_T, NEW_TOKENS = 72, 3
MODEL_LENGTHS = (72, 29)


@pytest.fixture(scope="module")
def tiny_runner():
    """A tiny random Llama; its parameters drawn in numpy on the abstract model (building the
    module op by op costs seconds on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(TINY, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), state)
    return JittedLlama.from_split(graphdef, state)


def test_model_batch_equals_rows_alone(tiny_runner):
    """Prefill logits at each row's last real token and greedy tokens decoded from each row's
    own position; layer 0 dense, layer 1 PBS (the ragged plan), under one compile each."""
    runner = tiny_runner
    pbs = PBSConfig(block_size=8, segment_size=16, dense_tail=8, proxy_blocks=2, threshold=0.7)
    attention = LayerAttention(PBSAttention(pbs, impl="reference"), ((0, "full"),))
    tokens = random_tokens(TINY, (len(MODEL_LENGTHS), MODEL_T), seed=3)
    max_len = MODEL_T + NEW_TOKENS
    last, cache, aux = runner.prefill(
        tokens, attention, max_len=max_len, return_aux=True, lengths=MODEL_LENGTHS
    )
    assert float(aux.density[0]) == 1.0 and float(aux.density[1]) < 1.0
    new, _ = runner.greedy_decode(last, cache, jnp.asarray(MODEL_LENGTHS), NEW_TOKENS)
    for b, length in enumerate(MODEL_LENGTHS):
        # The same max_len for every row alone: one decode compile serves them all.
        row = tokens[b : b + 1, :length]
        last_alone, cache_alone = runner.prefill(row, attention, max_len=max_len)
        new_alone, _ = runner.greedy_decode(last_alone, cache_alone, length, NEW_TOKENS)
        chex.assert_trees_all_close(last[b], last_alone[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(new[b], new_alone[0])


def test_proxy_importance_with_real_counts_is_each_row_alone():
    """The importance reference with per-row real proxy rows and real keys: row b equals the
    reference on that row's first ``real_rows[b]`` rows and ``real_keys[b]`` keys alone, 0 at
    the keys past them, and all 0 for a row with no real key (never NaN)."""
    from pallas_kernels import proxy_importance_reference

    q, k, _ = make_qkv(3, 3, 96, 4, 2, 16)  # P = 96 proxy rows over L = 96 keys, GQA 2
    real_rows, real_keys = (96, 40, 7), (96, 64, 0)
    got = proxy_importance_reference(q, k, jnp.asarray(real_rows), jnp.asarray(real_keys))
    for b, (rows, keys) in enumerate(zip(real_rows, real_keys)):
        want = np.zeros((4, 96), np.float32)
        if keys:
            want[:, :keys] = proxy_importance_reference(q[b : b + 1, :rows], k[b : b + 1, :keys])[0]
        np.testing.assert_allclose(np.asarray(got[b]), want, rtol=1e-6, atol=1e-7)
