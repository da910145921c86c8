"""The public op: ``pbs_attention`` (permutation → selection → index lists → kernel)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pbs_jax import blocks, reference
from pbs_jax.config import PBSConfig
from pbs_jax.permutation import compute_permutation, gather_keys, identity_permutation
from pbs_jax.selection import num_blocks, select_blocks

IMPLS = ("auto", "reference", "pallas")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class PBSAux(NamedTuple):
  """What ``return_aux=True`` adds to the output.

  perm: ``[B, Hp, N]`` int32, original position of the key at each slot.
  block_mask: ``[B, Hq, T, T]`` bool, computed (query block, key-slot block) pairs.
  density: float32 scalar, computed blocks / causal blocks, averaged over batch and heads.
  """

  perm: jax.Array
  block_mask: jax.Array
  density: jax.Array


def validate_inputs(q, k, v) -> None:
  """Raise a clear ``ValueError`` for inputs the op cannot take (before any compute)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [B, N, H, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, n, hq, d = q.shape
  if k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
    raise ValueError(
        f"q [B, N, Hq, D] = {tuple(q.shape)} and k/v [B, N, Hkv, D] = {tuple(k.shape)} must agree "
        "on B, N and D (prefill: as many keys as queries)")
  if n == 0 or b == 0 or d == 0:
    raise ValueError(f"B, N and D must be positive, got q shape {tuple(q.shape)}")
  if hq % k.shape[2]:
    raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _dense(q, k, v, impl):
  """Dense causal attention for sequences too short for sparsity to pay."""
  if impl == "reference" or not _on_gpu():
    return reference.dense_causal_attention(q, k, v)
  implementation = "cudnn" if q.dtype != jnp.float32 else None
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def pbs_plan(q: jax.Array, k: jax.Array, cfg: PBSConfig) -> tuple[jax.Array, jax.Array]:
  """Permutation and block mask: ``perm [B, Hp, N]`` int32, ``block_mask [B, Hq, T, T]`` bool."""
  perm = compute_permutation(q, k, cfg)
  return perm, select_blocks(q, gather_keys(k, perm), perm, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "return_aux"))
def pbs_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: PBSConfig = PBSConfig(), *,
                  impl: str = "auto", return_aux: bool = False):
  """Permuted block-sparse causal attention for prefill.

  Args:
    q: ``[B, N, Hq, D]`` queries (the layout of ``jax.nn.dot_product_attention``).
    k, v: ``[B, N, Hkv, D]``, Hq a multiple of Hkv.
    cfg: static :class:`PBSConfig`.
    impl: ``"reference"`` (pure jnp, exact, O(N²) memory), ``"pallas"`` (the kernel; interpret
      mode when no GPU is present) or ``"auto"`` (the kernel on GPU, the reference elsewhere).
      Sequences of at most ``segment_size`` tokens take dense causal attention (cuDNN on GPU),
      as the official code does.
    return_aux: also return :class:`PBSAux`.

  Returns:
    ``[B, N, Hq, D]`` in q's dtype, and the aux when asked.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  validate_inputs(q, k, v)
  b, n, hq, _ = q.shape
  t = num_blocks(n, cfg.block_size)

  if n <= cfg.segment_size:
    out = _dense(q, k, v, impl)
    perm = identity_permutation(b, cfg.num_perm_heads(hq, k.shape[2]), n)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    block_mask = jnp.broadcast_to(causal, (b, hq, t, t))
  else:
    perm, block_mask = pbs_plan(q, k, cfg)
    use_kernel = impl == "pallas" or (impl == "auto" and _on_gpu())
    if use_kernel:
      from pallas_kernels import block_sparse_attention  # lazy: pbs_jax needs no Pallas to import

      lists = blocks.index_lists(block_mask, cfg)
      out = block_sparse_attention(q, k, v, perm, lists.ids, lists.full_counts, lists.total_counts,
                                   block_size=cfg.block_size, gather_kv=True)
    else:
      out = reference.permuted_block_sparse_attention(q, k, v, perm, block_mask, cfg.block_size)
  if not return_aux:
    return out
  return out, PBSAux(perm, block_mask, jnp.mean(blocks.density(block_mask)))
