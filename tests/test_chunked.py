"""Chunked prefill: queries that are the last M of N positions (a chunk continuing a KV cache).

The op's definition: a chunk's output is the last M rows of the op on the whole prompt's queries
ending in that chunk (exact while the chunk holds the proxy rows), with the same plan rows; each
kernel and reference with a chunk equals the float64 oracle's last rows; the model's chunked
prefill equals the unchunked one for dense attention (several chunks) and for PBS (one chunk);
bad chunk sizes and offsets raise clear errors.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pbs_jax
from models import JittedLlama, Llama, PBSAttention, chunk_bounds
from pallas_kernels import (
    block_sparse_attention,
    block_sparse_attention_mgpu,
    block_sparse_attention_mgpu_reference,
    block_sparse_attention_reference,
    mgpu_supported,
)
from pbs_jax import PBSConfig
from tests.conftest import (
    TINY,
    jit_exact_attention,
    jit_permutation,
    last_rows,
    make_case,
    make_qkv,
    numpy_oracle,
    permute_kv,
    random_tokens,
    rel_err,
)

# A small rule shaped like the default (dense tail, proxy of 2 blocks, τ 0.88).
SMALL = PBSConfig(block_size=16, segment_size=32, threshold=0.88, dense_tail=16, proxy_blocks=2)


def small(**overrides) -> PBSConfig:
    return dataclasses.replace(SMALL, **overrides)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _op(q, k, v, cfg, impl):
    return pbs_jax.pbs_attention(q, k, v, cfg, impl=impl, return_aux=True)


def _check_chunk_is_last_rows(q, k, v, cfg, m, impl="reference", atol=2e-5, exact_plan=True):
    """The chunk's output and plan against the whole prompt's op (``exact_plan``: the plan bit
    for bit; off on GPUs, where differently shaped reductions may break a top-p tie)."""
    whole, whole_aux = _op(q, k, v, cfg, "reference")
    out, aux = _op(q[:, -m:], k, v, cfg, impl)
    tq = -(-m // cfg.block_size)
    t = -(-k.shape[1] // cfg.block_size)
    chex.assert_shape(aux.block_mask, (q.shape[0], q.shape[2], tq, t))  # never T × T
    if exact_plan:
        np.testing.assert_array_equal(aux.perm, whole_aux.perm)
        np.testing.assert_array_equal(aux.block_mask, whole_aux.block_mask[:, :, -tq:])
    chex.assert_trees_all_close(out, whole[:, -m:], atol=atol, rtol=1e-5)


@pytest.mark.parametrize(
    "n,m,hq,hk,cfg",
    [
        # the default rule (proxy 512 rows), GQA 3, one permutation per query head; N = 700 is
        # not a multiple of the block
        (700, 572, 3, 1, PBSConfig()),
        # the paper's rule (proxy 128 rows), GQA 1, one permutation per KV head
        (700, 316, 2, 2, PBSConfig.paper(gqa="shared")),
        # the chunk is two blocks and the last, partial one
        (200, 40, 3, 1, SMALL),
        # the antidiagonal selector (strided rows are numbered from position 0 of the keys)
        (200, 72, 3, 1, small(gqa="shared", selector="antidiagonal", antidiagonal_stride=4)),
    ],
)
def test_chunk_is_the_last_rows_of_the_whole_op(n, m, hq, hk, cfg):
    q, k, v = make_qkv(n + m, 1, n, hq, hk, 16)
    _check_chunk_is_last_rows(q, k, v, cfg, m)


def test_chunk_through_the_triton_kernel():
    """The whole op with the kernel (interpret mode here): K/V gathered in-kernel, GQA 3."""
    q, k, v = make_qkv(7, 1, 200, 3, 1, 16)
    _check_chunk_is_last_rows(q, k, v, SMALL, 104, impl="pallas", atol=1e-4)


def test_short_chunk_takes_all_its_rows_as_proxy():
    """A chunk with fewer rows than the proxy orders the segments by all of them."""
    q, k, v = make_qkv(2, 1, 200, 3, 1, 16)
    chunk = q[:, -40:]  # 3 blocks; proxies of 4 and of 3 blocks both take all 40 rows
    perm = jit_permutation(chunk, k, small(proxy_blocks=4))
    np.testing.assert_array_equal(perm, jit_permutation(chunk, k, small(proxy_blocks=3)))


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_dense_chunk_is_the_last_rows(dtype, atol):
    """Two flash calls merged by their logsumexps (cuDNN on GPU for 16-bit, XLA here), and the
    exact oracle with an offset: the whole prompt's last rows."""
    q, k, v = make_qkv(3, 1, 200, 3, 1, 16, dtype=dtype)
    whole = jit_exact_attention(q, k, v).astype(jnp.float32)
    out = jax.jit(pbs_jax.dense_attention)(q[:, -72:], k, v)
    assert out.dtype == dtype
    chex.assert_trees_all_close(out.astype(jnp.float32), whole[:, -72:], atol=atol)
    if dtype == jnp.float32:
        oracle = jit_exact_attention(q[:, -72:], k, v)
        chex.assert_trees_all_close(oracle, whole[:, -72:], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Kernels and their references: a chunk of a random plan == the float64 oracle's last rows
# --------------------------------------------------------------------------------------------


_STATIC = ("block_size", "segment_blocks")


@pytest.mark.parametrize(
    "n,m,hq,hk,hp,seg_blocks",
    [
        (300, 140, 4, 2, 4, 2),  # ragged N, GQA 2, one permutation per query head
        (320, 64, 3, 1, 1, 4),  # GQA 3, one per KV head, 4 blocks per segment
    ],
)
def test_mgpu_contract_reference_with_an_offset_equals_the_token_mask(n, m, hq, hk, hp, seg_blocks):
    c = make_case(n, n=n, d=16, hq=hq, hk=hk, hp=hp, block_size=32, seg_blocks=seg_blocks)
    chunk = last_rows(c, m)
    kp, vp = permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos)
    out = jax.jit(block_sparse_attention_mgpu_reference, static_argnames=_STATIC)(
        chunk.q,
        kp,
        vp,
        c.k,
        c.v,
        jnp.asarray(chunk.ids),
        jnp.asarray(chunk.full),
        block_size=32,
        segment_blocks=seg_blocks,
    )
    assert out.shape == chunk.q.shape
    assert rel_err(out, numpy_oracle(c)[:, -m:]) < 1e-5


@pytest.mark.parametrize("gather_kv", [False])  # True: test_chunk_through_the_triton_kernel
def test_triton_kernel_and_reference_with_an_offset(gather_kv):
    c = make_case(5, n=200, d=16, hq=2, hk=1, hp=2, block_size=32)
    chunk = last_rows(c, 104)  # 200 - 104 = 96: three blocks before the chunk
    k, v = (c.k, c.v) if gather_kv else (permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos))
    expected = numpy_oracle(c, gather_kv=gather_kv, k=k, v=v)[:, -104:]
    ref = block_sparse_attention_reference(*chunk.args(k, v), block_size=32, gather_kv=gather_kv)
    assert rel_err(ref, expected) < 1e-5
    out = block_sparse_attention(*chunk.args(k, v), block_size=32, gather_kv=gather_kv)
    assert rel_err(out, expected) < 1e-4


ON_HOPPER = mgpu_supported(jnp.zeros((1, 1, 1, 64), jnp.bfloat16), 128)
hopper = pytest.mark.skipif(not ON_HOPPER, reason="the Mosaic GPU kernel needs a Hopper GPU")


@pytest.mark.hopper
@hopper
@pytest.mark.parametrize("m", [512, 128])
def test_mosaic_kernel_with_an_offset(m):
    """The Mosaic kernel on a chunk (its own segment and diagonal found from the absolute query
    block) == the whole case's last rows, by the Triton contract's reference."""
    c = make_case(
        11, n=1024, d=64, hq=4, hk=2, hp=4, block_size=128, dtype=jnp.bfloat16, density=0.3
    )
    chunk = last_rows(c, m)
    kp, vp = permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos)
    ids, off = jnp.asarray(chunk.ids), jnp.asarray(chunk.full)
    out = block_sparse_attention_mgpu(
        chunk.q, kp, vp, c.k, c.v, ids, off, block_size=128, segment_blocks=2
    )
    whole = block_sparse_attention_reference(*c.args(), block_size=128)[:, -m:]
    assert out.shape == chunk.q.shape
    assert rel_err(out, whole) < 2e-2


@pytest.mark.hopper
@hopper
def test_chunk_through_the_mosaic_kernel():
    """pbs_attention with the kernel on Hopper (bf16, ragged N padded by planned_attention)."""
    q, k, v = make_qkv(8, 1, 1000, 4, 2, 64, dtype=jnp.bfloat16)
    _check_chunk_is_last_rows(q, k, v, PBSConfig(), 488, "pallas", atol=5e-2, exact_plan=False)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runner():
    return JittedLlama(Llama(TINY, rngs=nnx.Rngs(0)))


def test_model_chunked_full_attention_equals_unchunked(tiny_runner):
    tokens = random_tokens(TINY, (2, 48))
    last, cache, aux = tiny_runner.prefill(tokens, "full", max_len=50, return_aux=True)
    chunked = tiny_runner.prefill(tokens, "full", max_len=50, return_aux=True, chunk_size=32)
    c_last, c_cache, c_aux = chunked  # chunks of 32 and 16 tokens
    chex.assert_trees_all_close((c_last, c_aux.hidden), (last, aux.hidden), atol=2e-5)
    chex.assert_trees_all_close(c_cache.keys[:, :, :48], cache.keys[:, :, :48], atol=2e-5)
    chex.assert_trees_all_close(c_cache.values[:, :, :48], cache.values[:, :, :48], atol=2e-5)
    np.testing.assert_array_equal(c_aux.density, np.ones(TINY.num_layers))


def test_model_chunked_pbs_with_one_chunk_equals_unchunked(tiny_runner):
    spec = PBSAttention(small(threshold=0.5), impl="reference")
    tokens = random_tokens(TINY, (1, 112), seed=1)
    last, _, aux = tiny_runner.prefill(tokens, spec, return_aux=True)
    c_last, _, c_aux = tiny_runner.prefill(tokens, spec, return_aux=True, chunk_size=128)
    chex.assert_trees_all_close((c_last, c_aux.hidden), (last, aux.hidden), atol=2e-5)
    chex.assert_trees_all_close(c_aux.density, aux.density, atol=1e-6)
    assert float(np.min(aux.density)) < 1.0  # the sparse path ran


@pytest.mark.parametrize("chunk_size", [0, -32, 48, 1.5, True])
def test_bad_chunk_sizes_raise(tiny_runner, chunk_size):
    tokens = random_tokens(TINY, (1, 64))
    with pytest.raises(ValueError, match="chunk_size"):
        tiny_runner.prefill(tokens, SMALL, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        tiny_runner.generate(tokens, 2, SMALL, chunk_size=chunk_size)


def test_chunks_off_the_block_grid_raise():
    q, k, v = make_qkv(4, 1, 200, 3, 1, 16)
    with pytest.raises(ValueError, match="block boundary"):
        pbs_jax.pbs_attention(q[:, -44:], k, v, SMALL)  # 200 - 44 = 156: not a block multiple
    with pytest.raises(ValueError, match="M <= N"):
        pbs_jax.pbs_attention(jnp.concatenate([q, q], axis=1), k, v, SMALL)
    c = make_case(6, n=128, d=16, block_size=32)
    with pytest.raises(ValueError, match="block boundary"):
        block_sparse_attention(*last_rows(c, 40).args(), block_size=32)


def test_chunks_of_a_ragged_batch_raise(tiny_runner):
    """lengths (a ragged batch) with a chunk of queries is not supported: a clear error."""
    q, k, v = make_qkv(7, 2, 128, 2, 1, 16)
    with pytest.raises(NotImplementedError, match="lengths"):
        pbs_jax.pbs_attention(q[:, -64:], k, v, SMALL, lengths=[128, 100])
    tokens = random_tokens(TINY, (2, 64))
    with pytest.raises(NotImplementedError, match="lengths"):
        tiny_runner.prefill(tokens, SMALL, chunk_size=32, lengths=[64, 40])


def test_chunk_bounds_and_density_weights_worked_by_hand():
    """Chunks of 256 of a 600-token prompt, and each chunk's share of the causal blocks: PBS
    blocks of 128 (block grids of 2, 4 and 5 blocks: 3, 10 and 15 causal blocks before each
    end), and tokens for dense attention (causal token pairs)."""
    from models.attention_spec import chunk_density_weights

    bounds = chunk_bounds(600, 256)
    assert bounds == [(0, 256), (256, 512), (512, 600)] and chunk_bounds(600, None) == [(0, 600)]
    np.testing.assert_allclose(
        chunk_density_weights(bounds, PBSConfig.paper()), [3 / 15, 7 / 15, 5 / 15]
    )
    pairs = [256 * 257 / 2, 512 * 513 / 2 - 256 * 257 / 2, 600 * 601 / 2 - 512 * 513 / 2]
    np.testing.assert_allclose(
        chunk_density_weights(bounds, "full"), np.array(pairs) / (600 * 601 / 2)
    )
