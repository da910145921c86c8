"""The public op: ``pbs_attention`` (permutation → selection → index lists → kernel)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mgpu_supported, planned_attention
from pbs_jax import blocks, reference
from pbs_jax.config import PBSConfig
from pbs_jax.grid import num_blocks, segment_blocks
from pbs_jax.permutation import compute_permutation, identity_permutation
from pbs_jax.selection import select_blocks

IMPLS = ("auto", "reference", "pallas")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# impl="auto" on GPU: where the sparse path cannot pay, dense cuDNN attention runs instead.
# (length, density) pairs: from this length on, the kernel path is taken when the plan's
# density is at most this: where plan + kernel time equals cuDNN's, less a 10% margin, from
# experiments/bench_kernel.py (`break_even_densities`; 32/8 heads, D=128). Below the first
# length the plan's fixed cost alone is most of cuDNN's time.
# Both from results/bench_kernel.md (H100, JAX 0.11.2, 2026-11-26): the Mosaic GPU kernel,
# which the op runs on Hopper, and the Triton kernel, which it runs on other GPUs (measured on
# the same H100; other cards may differ).
AUTO_BREAK_EVEN = ((8192, 0.29), (16384, 0.62), (32768, 0.80), (65536, 0.85), (131072, 0.90))
AUTO_BREAK_EVEN_TRITON = ((8192, 0.13), (16384, 0.39), (32768, 0.54), (65536, 0.57), (131072, 0.66))


def auto_max_density(seq_len: int, mosaic: bool = True) -> float | None:
    """Largest density at which ``impl="auto"`` takes the kernel; None: always dense."""
    table = AUTO_BREAK_EVEN if mosaic else AUTO_BREAK_EVEN_TRITON
    usable = [d for n, d in table if seq_len >= n]
    return usable[-1] if usable else None


class PBSAux(NamedTuple):
    """What ``return_aux=True`` adds to the output.

    perm: ``[B, Hp, N]`` int32, original position of the key at each slot.
    block_mask: ``[B, Hq, Tq, T]`` bool, computed (query block, key-slot block) pairs (Tq = T
      unless the queries are a chunk of the last M < N positions).
    density: float32 scalar, computed blocks / causal blocks, averaged over batch and heads.
    sparse: bool scalar, whether the block-sparse path produced the output (``impl="auto"`` may
      take dense attention instead: short sequences, or a plan too dense to pay).
    """

    perm: jax.Array
    block_mask: jax.Array
    density: jax.Array
    sparse: jax.Array


def validate_inputs(q, k, v) -> None:
    """Raise a clear ``ValueError`` for inputs the op cannot take (before any compute)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, N, H, D], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, n, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] < n or k.shape[3] != d:
        raise ValueError(
            f"q [B, M, Hq, D] = {tuple(q.shape)} and k/v [B, N, Hkv, D] = {tuple(k.shape)} "
            "must agree on B and D, with M <= N (prefill: as many keys as queries; a chunk "
            "continuing a cache: the queries are the last M of the N positions)"
        )
    if n == 0 or b == 0 or d == 0:
        raise ValueError(f"B, N and D must be positive, got q shape {tuple(q.shape)}")
    if hq % k.shape[2]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")


def validate_chunk(q, k, cfg: PBSConfig) -> None:
    """Raise a clear ``ValueError`` unless a chunk of queries starts on a block boundary.

    q ``[B, M, Hq, D]`` holds the last M of the N positions of k ``[B, N, Hkv, D]``; N - M must
    be a multiple of ``cfg.block_size``, so the chunk's query blocks are exactly the blocks the
    whole prompt's queries would have (a plan per query block is then the same plan).
    """
    m, n = q.shape[1], k.shape[1]
    if (n - m) % cfg.block_size:
        raise ValueError(
            f"a chunk of queries must start on a block boundary: the queries are the last "
            f"M = {m} of N = {n} positions, and N - M = {n - m} is not a multiple of "
            f"block_size = {cfg.block_size}"
        )


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Fast dense causal attention, the one rule for where sparsity does not pay.

    q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]`` (GQA native) → ``[B, N, Hq, D]``: cuDNN flash
    attention on GPU for 16-bit inputs (its only dtypes), XLA otherwise. q ``[B, M, Hq, D]``
    with M < N: the last M positions (a chunk continuing a cache), by
    :func:`dense_continuation_attention`.
    """
    cudnn = _on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16)
    if q.shape[1] != k.shape[1]:
        return dense_continuation_attention(q, k, v, cudnn=cudnn)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn" if cudnn else "xla"
    )


def _attention_with_lse(q, k, v, causal: bool, cudnn: bool) -> tuple[jax.Array, jax.Array]:
    """(out ``[B, T, Hq, D]`` float32, logsumexp of the scaled logits ``[B, T, Hq]`` float32).

    ``causal``: top-left aligned (query i sees keys 0..i; T = S). jax.nn's wrapper rounds the
    logsumexp to the input dtype, too coarse to merge bf16 parts, so cuDNN is called through
    the function under it, whose softmax statistics are float32; XLA runs in float32.
    """
    scale = 1.0 / float(np.sqrt(q.shape[-1]))
    if cudnn:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        mask = cudnn_attention.MaskType.CAUSAL if causal else cudnn_attention.MaskType.NO_MASK
        out, lse = cudnn_attention.dot_product_attention(
            q, k, v, scale=scale, mask_type=mask, qkv_layout="BTNH", return_residual=True
        )
        return out.astype(jnp.float32), jnp.swapaxes(lse.astype(jnp.float32), 1, 2)  # BNT→BTN
    out, lse = jax.nn.dot_product_attention(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        is_causal=causal,
        scale=scale,
        implementation="xla",
        return_residual=True,
    )
    return out, lse


def dense_continuation_attention(q, k, v, *, cudnn: bool) -> jax.Array:
    """Dense causal attention of a chunk: q ``[B, M, Hq, D]`` at positions N - M … N - 1,
    k/v ``[B, N, Hkv, D]`` → ``[B, M, Hq, D]`` in q's dtype.

    Flash kernels align a causal mask top-left (query i sees keys 0..i), so the chunk is two
    flash calls merged by their logsumexps: every earlier key (no mask) and the chunk's own
    keys (a square causal mask). Never an ``[M, N]`` mask, never the earlier rows' work.
    """
    m, n = q.shape[1], k.shape[1]
    earlier, earlier_lse = _attention_with_lse(q, k[:, : n - m], v[:, : n - m], False, cudnn)
    own, own_lse = _attention_with_lse(q, k[:, n - m :], v[:, n - m :], True, cudnn)
    lse = jnp.logaddexp(earlier_lse, own_lse)[..., None]
    out = earlier * jnp.exp(earlier_lse[..., None] - lse) + own * jnp.exp(own_lse[..., None] - lse)
    return out.astype(q.dtype)


def _dense(q, k, v, impl):
    """Dense causal attention for sequences too short for sparsity to pay (the oracle when
    ``impl="reference"``)."""
    if impl == "reference":
        return reference.exact_causal_attention(q, k, v)
    return dense_attention(q, k, v)


def pbs_plan(q: jax.Array, k: jax.Array, cfg: PBSConfig) -> tuple[jax.Array, jax.Array]:
    """Permutation and block mask: ``perm [B, Hp, N]`` int32, ``block_mask [B, Hq, Tq, T]`` bool
    (q ``[B, M, Hq, D]``, the last M ≤ N positions; Tq = ceil(M / block_size))."""
    perm = compute_permutation(q, k, cfg)
    return perm, select_blocks(q, k, perm, cfg)


def kernel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    perm: jax.Array,
    lists: blocks.BlockLists,
    cfg: PBSConfig,
) -> jax.Array:
    """The block-sparse kernel for a plan: ``perm [B, Hp, N]``, lists from ``index_lists``.

    The backend choice and each kernel's input preparation belong to
    ``pallas_kernels.planned_attention`` (Mosaic on Hopper, Triton elsewhere).
    """
    return planned_attention(
        q,
        k,
        v,
        perm,
        lists.ids,
        lists.full_counts,
        lists.total_counts,
        block_size=cfg.block_size,
        segment_blocks=segment_blocks(cfg),
    )


def _as_operand(name: str, x) -> jax.Array:
    """An array-like as a jax array; float64 is refused rather than silently downcast."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = jnp.asarray(x)
    elif jnp.dtype(dtype) == jnp.float64:
        raise ValueError(
            f"{name} is float64; pbs_attention computes in float32, bfloat16 or float16 "
            f"(cast first, e.g. {name}.astype(jnp.float32))"
        )
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def pbs_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cfg: PBSConfig = PBSConfig(),
    *,
    impl: str = "auto",
    return_aux: bool = False,
):
    """Permuted block-sparse causal attention for prefill.

    Args:
      q: ``[B, M, Hq, D]`` queries (the layout of ``jax.nn.dot_product_attention``), M ≤ N:
        the LAST M positions N - M … N - 1 (M = N: a whole prefill; M < N: a chunk continuing
        a cache, N - M a multiple of ``cfg.block_size``). A chunk's output is the last M rows
        of this op on the whole prompt's queries ending in q, exactly: the proxy is the chunk's
        own last ``proxy_blocks × block_size`` rows (all M rows when it has fewer: then it
        differs), and selection is per query block. Only the chunk's Tq × T block grid is
        planned.
      k, v: ``[B, N, Hkv, D]``, Hq a multiple of Hkv.
      cfg: static :class:`PBSConfig`.
      impl: ``"reference"`` (pure jnp, exact, O(N²) memory), ``"pallas"`` (the kernel; interpret
        mode when no GPU is present) or ``"auto"`` (the reference on CPU; on GPU the kernel, or
        cuDNN dense attention where sparsity cannot pay: below the break-even length, or a plan
        denser than the break-even density of ``AUTO_BREAK_EVEN``, decided on device without a
        host sync).
        Sequences of at most ``segment_size`` tokens take dense causal attention (cuDNN on GPU),
        as the official code does.
      return_aux: also return :class:`PBSAux`.

    Returns:
      ``[B, M, Hq, D]`` in q's dtype, and the aux when asked.

    Forward only: a prefill op with no gradient (``jax.grad`` through it raises a clear
    ``NotImplementedError``). Jit-compiled inside; array-likes are converted, float64 refused.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(cfg, PBSConfig):
        raise TypeError(f"cfg must be a PBSConfig, got {type(cfg).__name__}")
    q, k, v = _as_operand("q", q), _as_operand("k", k), _as_operand("v", v)
    validate_inputs(q, k, v)
    validate_chunk(q, k, cfg)
    return _forward(q, k, v, cfg, impl, return_aux)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _forward_only(q, k, v, cfg: PBSConfig, impl: str, return_aux: bool):
    return _pbs_forward(q, k, v, cfg, impl, return_aux)


@_forward_only.defjvp
def _no_derivative(cfg, impl, return_aux, primals, tangents):
    raise NotImplementedError(
        "pbs_attention is forward-only (a prefill op): it has no gradient or JVP. The block "
        "selection is discrete and the kernels have no backward pass; for training, use dense "
        "attention (pbs_jax.dense_attention) or stop gradients before the op."
    )


_forward = jax.jit(_forward_only, static_argnums=(3, 4, 5))


def _pbs_forward(q, k, v, cfg: PBSConfig, impl: str, return_aux: bool):
    """The op's body on validated arrays (traced once per static configuration)."""
    b, m, hq, _ = q.shape
    n = k.shape[1]  # M < N: q is a chunk of the last M positions
    t = num_blocks(n, cfg.block_size)

    auto_gpu = impl == "auto" and _on_gpu()
    if n <= cfg.segment_size or (auto_gpu and auto_max_density(n) is None):
        out = _dense(q, k, v, impl)
        perm = identity_permutation(b, cfg.num_perm_heads(hq, k.shape[2]), n)
        tq = num_blocks(m, cfg.block_size)
        causal = jnp.arange(t)[None, :] <= jnp.arange(t - tq, t)[:, None]
        block_mask = jnp.broadcast_to(causal, (b, hq, tq, t))
        sparse = jnp.bool_(False)
        dens = jnp.mean(blocks.density(block_mask))
    else:
        perm, block_mask = pbs_plan(q, k, cfg)
        dens = jnp.mean(blocks.density(block_mask))
        if impl == "pallas" or auto_gpu:

            def sparse_path(q, k, v):
                return kernel_attention(q, k, v, perm, blocks.index_lists(block_mask, cfg), cfg)

            if auto_gpu:
                sparse = dens <= auto_max_density(n, mgpu_supported(q, cfg.block_size))
                out = jax.lax.cond(
                    sparse, sparse_path, lambda q, k, v: _dense(q, k, v, impl), q, k, v
                )
            else:
                sparse = jnp.bool_(True)
                out = sparse_path(q, k, v)
        else:
            sparse = jnp.bool_(True)
            out = reference.permuted_block_sparse_attention(
                q, k, v, perm, block_mask, cfg.block_size
            )
    if not return_aux:
        return out
    return out, PBSAux(perm, block_mask, dens, sparse)
