"""The public op: ``pbs_attention`` (permutation → selection and block lists → kernel)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import FLOAT_DTYPES, mgpu_supported, planned_attention
from pbs_jax import blocks, cost_model, reference
from pbs_jax.config import PBSConfig
from pbs_jax.grid import (
    causal_blocks,
    num_blocks,
    real_block_counts,
    real_blocks,
    segment_blocks,
    zero_padding,
)
from pbs_jax.permutation import compute_permutation, identity_permutation
from pbs_jax.selection import mean_pool_blocks, select_blocks_and_lists

IMPLS = ("auto", "reference", "pallas")


class PBSAux(NamedTuple):
    """What ``return_aux=True`` adds to the output.

    perm: ``[B, Hp, N]`` int32, original position of the key at each slot.
    block_mask: ``[B, Hq, Tq, T]`` bool, computed (query block, key-slot block) pairs (Tq = T
      unless the queries are a chunk of the last M < N positions).
    density: float32 scalar, computed blocks / causal blocks, averaged over batch and heads.
    sparse: bool scalar, whether the block-sparse path produced the output (``impl="auto"`` may
      take dense attention instead, where the cost model says the kernel cannot beat cuDNN: then
      perm is the identity and block_mask every causal block; it decides before planning).
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
        if jnp.dtype(x.dtype).name not in FLOAT_DTYPES:
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


def validate_lengths(lengths, batch: int, seq_len: int) -> jax.Array | None:
    """``lengths`` (array-like ``[B]`` int, or None) as an int32 array; a clear ``ValueError``
    for a wrong shape or dtype, and, when the values are concrete, for any length outside
    ``[1, N]``. A traced ``lengths`` (under an outer ``jit``) cannot be range-checked: the op
    then clamps it to ``[1, N]``."""
    if lengths is None:
        return None
    if not isinstance(lengths, jax.Array):
        lengths = np.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(
            f"lengths must have shape [B] = ({batch},) (one length per batch row), got "
            f"{tuple(lengths.shape)}"
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        bad = (values < 1) | (values > seq_len)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"lengths must lie in [1, N] = [1, {seq_len}] (right padding: row b holds "
                f"lengths[b] real tokens), got lengths[{row}] = {int(values[row])}"
            )
    return jnp.asarray(lengths, jnp.int32)


def validate_chunk(q, k, cfg: PBSConfig, lengths=None) -> None:
    """Raise a clear ``ValueError`` unless a chunk of queries starts on a block boundary.

    q ``[B, M, Hq, D]`` holds the last M of the N positions of k ``[B, N, Hkv, D]``; N - M must
    be a multiple of ``cfg.block_size``, so the chunk's query blocks are exactly the blocks the
    whole prompt's queries would have (a plan per query block is then the same plan). A chunk
    (M < N) of a ragged batch (``lengths``) is refused with ``NotImplementedError``: the
    per-row rules (proxy rows, zero padding of the pooled queries) assume M = N.
    """
    m, n = q.shape[1], k.shape[1]
    if lengths is not None and m != n:
        raise NotImplementedError(
            f"lengths (a ragged batch) with a chunk of queries (M = {m} < N = {n}) is not "
            "supported: chunk a ragged batch row by row, or prefill it whole (M = N)"
        )
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


def _dense(q, k, v, impl, lengths=None):
    """Dense causal attention for sequences too short for sparsity to pay (the oracle when
    ``impl="reference"``)."""
    if impl == "reference":
        return reference.exact_causal_attention(q, k, v, lengths)
    return dense_attention(q, k, v)


class Plan(NamedTuple):
    """A PBS plan (:func:`pbs_plan`).

    perm: ``[B, Hp, N]`` int32, original position of the key at each slot.
    block_mask: ``[B, Hq, Tq, T]`` bool, the selected (query block, key-slot block) pairs.
    lists: :class:`pbs_jax.blocks.BlockLists` of ``block_mask``, the kernels' input.
    """

    perm: jax.Array
    block_mask: jax.Array
    lists: blocks.BlockLists


def pbs_plan(
    q: jax.Array,
    k: jax.Array,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    pooled_q: jax.Array | None = None,
) -> Plan:
    """Permutation, block mask and its block lists (:class:`Plan`; q ``[B, M, Hq, D]``, the last
    M ≤ N positions; Tq = ceil(M / block_size)).

    ``lengths [B]`` int32 (right padding; None: all N; M = N only): each row's plan is that
    row's alone, its padding left in place and never selected.

    The permutation is :func:`pbs_jax.permutation.compute_permutation` (on GPU the importance
    kernel, then the segment sort); on GPU the selection pools the permuted keys in a kernel
    and the selection kernel writes the lists with the mask
    (:func:`pbs_jax.selection.select_blocks_and_lists`). ``pooled_q``: the block means of q
    where the caller holds them (``impl="auto"``'s estimate pooled the same queries), else
    None."""
    perm = compute_permutation(q, k, cfg, lengths)
    return Plan(perm, *select_blocks_and_lists(q, k, perm, cfg, lengths, pooled_q))


def kernel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    perm: jax.Array,
    lists: blocks.BlockLists,
    cfg: PBSConfig,
) -> jax.Array:
    """The block-sparse kernel for a plan: ``perm [B, Hp, N]``, its lists (:class:`Plan`).

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
    lengths=None,
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
        mode when no GPU is present) or ``"auto"`` (the reference on CPU; on GPU the kernel or
        cuDNN dense attention, whichever the card's measured cost model
        (:mod:`pbs_jax.cost_model`) says is faster, asked before planning, after a cheap
        density estimate; where even the densest plan's op is measured
        within noise of cuDNN, the kernel path with no estimate and no choice on device).
        Sequences of at most ``segment_size`` tokens take dense causal attention (cuDNN on GPU),
        as the official code does.
      return_aux: also return :class:`PBSAux`.
      lengths: ``[B]`` int array-like, a right-padded batch: row b holds ``lengths[b]`` real
        tokens at positions ``[0, lengths[b])``, each in ``[1, N]``; None (default): every row
        holds N. Checked when concrete; a traced ``lengths`` (under your own ``jit``) cannot be,
        and is clamped to ``[1, N]``. One compile serves every length vector of a shape. Only
        with M = N: a chunk (M < N) of a ragged batch raises ``NotImplementedError``.

    Returns:
      ``[B, M, Hq, D]`` in q's dtype, and the aux when asked.

    Ragged batches: row b equals that row run alone on its first ``lengths[b]`` tokens (up to
    float rounding): its own proxy (its last real queries), its own complete segments (keys of
    an incomplete or padded segment stay in place), its zero-padded partial last block in the
    pooled means, its own dense tail, and dense attention when ``lengths[b] <= segment_size``.
    Padded keys are never attended by a real query: they lie after it, so causality excludes
    them (the kernels need nothing more). Outputs at positions ``>= lengths[b]`` are exactly 0.
    Padding may hold any finite values (they do not change the result); the aux's
    ``block_mask`` selects nothing outside a row's own blocks and its density is the mean of the
    rows' own densities.

    Forward only: a prefill op with no gradient (``jax.grad`` through it raises a clear
    ``NotImplementedError``). Jit-compiled inside; array-likes are converted, float64 refused.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(cfg, PBSConfig):
        raise TypeError(f"cfg must be a PBSConfig, got {type(cfg).__name__}")
    q, k, v = _as_operand("q", q), _as_operand("k", k), _as_operand("v", v)
    validate_inputs(q, k, v)
    validate_chunk(q, k, cfg, lengths)
    lengths = validate_lengths(lengths, q.shape[0], k.shape[1])
    return _forward(q, k, v, cfg, impl, return_aux, lengths)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _forward_only(q, k, v, cfg: PBSConfig, impl: str, return_aux: bool, lengths=None):
    return _pbs_forward(q, k, v, cfg, impl, return_aux, lengths)


@_forward_only.defjvp
def _no_derivative(cfg, impl, return_aux, primals, tangents):
    raise NotImplementedError(
        "pbs_attention is forward-only (a prefill op): it has no gradient or JVP. The block "
        "selection is discrete and the kernels have no backward pass; for training, use dense "
        "attention (pbs_jax.dense_attention) or stop gradients before the op."
    )


_forward = jax.jit(_forward_only, static_argnums=(3, 4, 5))


def _mean_density(block_mask, lengths, cfg: PBSConfig):
    """The aux's density: mean over batch and heads (each ragged row over its own blocks)."""
    row_blocks = None if lengths is None else real_block_counts(lengths, cfg.block_size)
    return jnp.mean(blocks.density(block_mask, row_blocks))


def _pbs_forward(q, k, v, cfg: PBSConfig, impl: str, return_aux: bool, lengths=None):
    """The op's body on validated arrays (traced once per static configuration)."""
    b, m, hq, _ = q.shape
    n = k.shape[1]  # M < N: q is a chunk of the last M positions
    if lengths is not None:  # a traced lengths could not be range-checked: clamp it
        lengths = jnp.clip(lengths, 1, n)

    auto_gpu = impl == "auto" and _on_gpu()
    if n <= cfg.segment_size or (auto_gpu and not _auto_may_pay(q, k, cfg)):
        out = _dense(q, k, v, impl, lengths)
        perm, block_mask, dens = _dense_plan(b, m, n, hq, k.shape[2], cfg, lengths)
        sparse = jnp.bool_(False)
    elif auto_gpu and not _auto_always_pays(q, k, cfg):
        out, perm, block_mask, dens, sparse = _auto_on_gpu(q, k, v, cfg, lengths)
    else:
        perm, block_mask, lists = pbs_plan(q, k, cfg, lengths)
        dens = _mean_density(block_mask, lengths, cfg)
        sparse = jnp.bool_(True)
        if impl == "pallas" or auto_gpu:
            out = kernel_attention(q, k, v, perm, lists, cfg)
        else:
            out = reference.permuted_block_sparse_attention(
                q, k, v, perm, block_mask, cfg.block_size, lengths
            )
    if lengths is not None:  # padded queries of the kernels and cuDNN: defined as 0
        out = zero_padding(out, lengths)
    if not return_aux:
        return out
    return out, PBSAux(perm, block_mask, dens, sparse)


def _dense_plan(b: int, m: int, n: int, hq: int, hkv: int, cfg: PBSConfig, lengths=None):
    """The aux of dense attention: identity ``perm [B, Hp, N]``, every causal block
    ``[B, Hq, Tq, T]`` of the queries' blocks (the last Tq = ceil(M / block_size); of each
    row's own grid with ``lengths``), density 1."""
    t, tq = num_blocks(n, cfg.block_size), num_blocks(m, cfg.block_size)
    perm = identity_permutation(b, cfg.num_perm_heads(hq, hkv), n)
    causal = causal_blocks(t, t - tq)
    if lengths is not None:  # M = N (validate_chunk)
        causal = causal & real_blocks(lengths, t, cfg.block_size)[:, None]
    block_mask = jnp.broadcast_to(causal, (b, hq, tq, t))
    return perm, block_mask, _mean_density(block_mask, lengths, cfg)


def _auto_costs(q: jax.Array, cfg: PBSConfig):
    """(this card's cost table, the call's shape, whether the op runs the Mosaic kernel)."""
    b, _, hq, d = q.shape
    shape = cost_model.CallShape(batch=b, q_heads=hq, head_dim=d)
    return cost_model.card_costs(), shape, mgpu_supported(q, cfg.block_size)


# impl="auto" with a chunk of queries (M < N): the cost model is measured on whole prefills, so
# a chunk is judged at the length of its keys N with its own density (computed blocks / causal
# blocks of its rows): the kernel's and cuDNN's work both scale with the chunk's causal blocks,
# so their ratio at a density is about the whole prefill's; the floor is the whole grid's.


def _auto_may_pay(q: jax.Array, k: jax.Array, cfg: PBSConfig) -> bool:
    """``impl="auto"``, at trace time: can even a plan of only forced blocks beat cuDNN?"""
    table, shape, mosaic = _auto_costs(q, cfg)
    n = k.shape[1]
    floor = cost_model.floor_density(n, cfg)
    return cost_model.choose(table, n, floor, stage=cost_model.AT_TRACE, shape=shape, mosaic=mosaic)


def _auto_always_pays(q: jax.Array, k: jax.Array, cfg: PBSConfig) -> bool:
    """``impl="auto"``, at trace time: is the sparse op at its densest within noise of cuDNN
    here (:func:`pbs_jax.cost_model.sparse_always_pays`)? Then no estimate and no choice on
    device: plan and kernel. Whole prefills only: the densest op is measured on them, and a
    chunk's plan (a proxy against all N keys) weighs more against its M × N attention."""
    if q.shape[1] != k.shape[1]:
        return False
    table, _, mosaic = _auto_costs(q, cfg)
    return cost_model.sparse_always_pays(table, k.shape[1], cfg, mosaic)


def _auto_on_gpu(q, k, v, cfg: PBSConfig, lengths=None):
    """``impl="auto"`` past the trace-time check (:mod:`pbs_jax.cost_model`): the estimate, then
    one choice on device: plan and kernel where the estimate predicts a win, else cuDNN with no
    plan. Returns (out, perm, block_mask, density, sparse).

    One choice, not a second after the plan: each ``lax.cond`` is a host round trip (XLA reads
    its predicate before it launches a branch; ~13 µs at 4K), and a second choice could only
    turn a plan denser than predicted back to cuDNN, whose time the kernel at every block is
    within a few percent of anyway (:mod:`pbs_jax.cost_model`'s docstring has the figures).
    """
    b, m, hq, _ = q.shape
    n = k.shape[1]
    table, shape, mosaic = _auto_costs(q, cfg)

    # The estimate and the plan pool the same queries: once, for both (the only stage they share).
    pooled_q = mean_pool_blocks(q, cfg.block_size, lengths)

    def planned(q, k, v, pooled_q):
        perm, block_mask, lists = pbs_plan(q, k, cfg, lengths, pooled_q)
        out = kernel_attention(q, k, v, perm, lists, cfg)
        return out, perm, block_mask, _mean_density(block_mask, lengths, cfg), jnp.bool_(True)

    def skipped(q, k, v, pooled_q):
        plan = _dense_plan(b, m, n, hq, k.shape[2], cfg, lengths)
        return _dense(q, k, v, "auto", lengths), *plan, jnp.bool_(False)

    estimate = cost_model.estimate_density(q, k, cfg, lengths, pooled_q)
    predicted = cost_model.predicted_density(table, estimate, cost_model.floor_density(n, cfg))
    sparse = cost_model.choose(
        table, n, predicted, stage=cost_model.AFTER_ESTIMATE, shape=shape, mosaic=mosaic
    )
    return jax.lax.cond(sparse, planned, skipped, q, k, v, pooled_q)
