"""The Mosaic GPU kernel against the same independent oracles as the Triton kernel.

GPU only (Hopper, wgmma): skipped elsewhere, so CI on CPU does not run it; run it on an H100/H200
with `python -m pytest tests/test_kernel_mgpu.py`. Semantics checked: listed earlier-segment
blocks of the permuted keys plus the query's whole own segment, token-masked on original
positions (the kernel reads that segment in original order: the lemma it rests on is that
attention over a key set does not depend on the keys' order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pbs_jax
from pallas_kernels import block_sparse_attention_mgpu, block_sparse_attention_reference
from pallas_kernels import mgpu_supported
from pbs_jax import PBSConfig
from tests.conftest import make_qkv, rel_err
from tests.test_kernel import make_case, permute_kv

pytestmark = pytest.mark.skipif(
    not mgpu_supported(jnp.zeros((1, 1, 1, 64), jnp.bfloat16), 128),
    reason="the Mosaic GPU kernel needs a Hopper GPU")

TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


@pytest.mark.parametrize("n,d,hq,hk,hp,dtype", [
    (256, 64, 1, 1, 1, jnp.bfloat16),
    (1024, 64, 4, 2, 4, jnp.bfloat16),     # GQA 2, one permutation per query head
    (1024, 128, 4, 2, 2, jnp.float16),     # one permutation per KV head
    (2048, 128, 8, 2, 8, jnp.bfloat16),
    (1536, 64, 3, 1, 3, jnp.bfloat16),     # GQA 3, odd segment count
])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_matches_reference(n, d, hq, hk, hp, dtype, density):
  c = make_case(n, n=n, d=d, hq=hq, hk=hk, hp=hp, block_size=128, dtype=dtype,
                density=density)
  ref = block_sparse_attention_reference(*c.args(), block_size=128)
  out = block_sparse_attention_mgpu(
      c.q, permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos), c.k, c.v,
      jnp.asarray(c.ids), jnp.asarray(c.full), block_size=128, segment_blocks=2)
  assert out.shape == c.q.shape and out.dtype == c.q.dtype
  assert rel_err(out, ref) < TOL[dtype]


def test_unlisted_blocks_are_never_read():
  """NaN in every permuted block that no list names, and in the original K/V outside the own
  segments actually used, must not reach the output."""
  c = make_case(3, n=1024, d=64, hq=2, hk=1, hp=2, block_size=128, dtype=jnp.bfloat16,
                density=0.3)
  kp, vp = permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos)
  listed = np.zeros((2, 8), bool)
  for h in range(2):
    for qb in range(8):
      listed[h, c.ids[0, h, qb, :c.full[0, h, qb]]] = True
  poison = np.repeat(~listed, 128, axis=1).T[None, :, :, None]  # [1, N, Hp, 1]
  kp = jnp.where(poison, jnp.nan, kp).astype(kp.dtype)
  vp = jnp.where(poison, jnp.nan, vp).astype(vp.dtype)
  out = block_sparse_attention_mgpu(c.q, kp, vp, c.k, c.v, jnp.asarray(c.ids),
                                    jnp.asarray(c.full), block_size=128, segment_blocks=2)
  assert bool(jnp.isfinite(out).all())
  assert rel_err(out, block_sparse_attention_reference(*c.args(), block_size=128)) < 2e-2


@pytest.mark.parametrize("n", [300, 700, 1000, 2048])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_op_on_hopper_equals_reference_op(n, gqa):
  """pbs_attention(impl="pallas") takes this kernel on Hopper (ragged N padded)."""
  cfg = PBSConfig(gqa=gqa)
  q, k, v = make_qkv(n, 1, n, 8, 2, 64, jnp.bfloat16)
  out = pbs_jax.pbs_attention(q, k, v, cfg, impl="pallas")
  ref = pbs_jax.pbs_attention(q, k, v, cfg, impl="reference")
  assert rel_err(out, ref) < 2e-2


def test_dense_lists_equal_cudnn():
  q, k, v = make_qkv(0, 1, 4096, 8, 2, 128, jnp.bfloat16)
  t = 32
  ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, 8, t, t))
  off = jnp.broadcast_to((jnp.arange(t, dtype=jnp.int32) // 2) * 2, (1, 8, t))
  out = block_sparse_attention_mgpu(q, k, v, k, v, ids, off, block_size=128, segment_blocks=2)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  assert rel_err(out, ref) < 1e-3
