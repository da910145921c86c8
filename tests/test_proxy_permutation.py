"""The fused permutation kernel against its oracle, and the planner's GPU path through it.

- ``proxy_permutation`` (Pallas, interpret mode here) against ``proxy_permutation_reference``:
  float32 and bfloat16, GQA 1, 3 and 4, P 128 and 256, N 256, 768 and 1000 (an incomplete last
  segment), both GQA modes, 1 to 8 key tiles per segment; ``key_pos`` sorts the reference
  importances, equals the reference permutation wherever no near-tie lets rounding decide, and
  keeps the incomplete segment in place; ``pooled_k`` equals the block means of the keys in
  its slot order and the reference's;
- exact ties (repeated keys across tiles) broken as the stable argsort breaks them;
- ``pbs_plan`` with the fused path (the GPU path, run here in interpret mode) equals the jnp
  plan: perm and block mask, both GQA modes;
- the contract's validation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    ImportanceTiles,
    block_means,
    pooled_selection,
    proxy_importance,
    proxy_importance_reference,
    proxy_permutation,
    proxy_permutation_reference,
    proxy_permutation_supported,
    slot_order,
)
from pbs_jax import PBSConfig, pbs_plan, permutation, selection
from tests.conftest import make_qkv

HEAD_DIM = 16  # small: interpret mode runs every tile's dot on the CPU
SEGMENT = 256
BATCH, MAX_KEYS, MAX_Q_HEADS, KV_HEADS = 2, 1000, 8, 2
# Relative gap between neighbouring sorted importances under which rounding (the kernel's
# base-2 softmax and summation order against the reference's) may decide their order.
NEAR_TIE = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    rows: int  # P
    keys: int  # N
    group: int  # Hq / Hkv
    gqa: str
    block_size: int
    tiles: ImportanceTiles | None = None

    @property
    def id(self) -> str:
        return f"{self.dtype}-P{self.rows}-N{self.keys}-G{self.group}-{self.gqa}-b{self.block_size}"


CASES = [
    # float32 default tiles: 64-key tiles, 4 per segment; 2 complete segments + none.
    Case("float32", 128, 768, 3, "replicate", 128),
    # Incomplete last segment (232 keys, a partial last block), shared GQA 4, 8 blocks a segment.
    Case("float32", 256, 1000, 4, "shared", 32, ImportanceTiles(64, 64, split_keys=128)),
    Case("bfloat16", 256, 768, 3, "shared", 128),
    Case("bfloat16", 128, 256, 1, "replicate", 128),
    # 8 key tiles of 32 per segment, pass 1 in splits of 256 (the last one short).
    Case("bfloat16", 128, 1000, 4, "replicate", 64, ImportanceTiles(64, 32, split_keys=256)),
    Case("float32", 128, 1000, 1, "shared", 128),
]


@functools.cache
def _qk():
    """One draw (a single compile of the conftest sampler) that every case slices:
    ``q [2, 1000, 8, 16]``, ``k [2, 1000, 2, 16]`` float32, with heavy-hitter keys."""
    q, k, _ = make_qkv(7, BATCH, MAX_KEYS, MAX_Q_HEADS, KV_HEADS, HEAD_DIM)
    return q, k


def _operands(case: Case):
    q, k = _qk()
    dtype = jnp.dtype(case.dtype)
    return q[:, -case.rows :, : KV_HEADS * case.group].astype(dtype), k[:, : case.keys].astype(
        dtype
    )


def _reference_importance(q_proxy, k, gqa) -> np.ndarray:
    """``[B, Hp, G*S]`` float64: the importance the permutation sorts (the oracle's)."""
    b, _, hq, _ = q_proxy.shape
    complete = k.shape[1] // SEGMENT * SEGMENT
    importance = np.asarray(proxy_importance_reference(q_proxy, k[:, :complete]), np.float64)
    if gqa == "shared":
        importance = importance.reshape(b, KV_HEADS, hq // KV_HEADS, complete).mean(axis=2)
    return importance


def _tie_free_segments(importance: np.ndarray) -> np.ndarray:
    """``[B, Hp, G]`` bool: segments whose sorted importances are all further apart than
    rounding (relative gap above ``NEAR_TIE``)."""
    b, hp, complete = importance.shape
    ordered = -np.sort(-importance.reshape(b, hp, complete // SEGMENT, SEGMENT), axis=-1)
    gaps = (ordered[..., :-1] - ordered[..., 1:]) / np.maximum(ordered[..., :-1], 1e-30)
    return gaps.min(axis=-1) > NEAR_TIE


@functools.cache
def _run(case: Case):
    """(kernel, reference) ``(key_pos, pooled_k)`` of one case, computed once per session."""
    q_proxy, k = _operands(case)
    kwargs = dict(segment_size=SEGMENT, block_size=case.block_size, gqa=case.gqa)
    # interpret=None: the compiled kernel on a GPU, interpret mode elsewhere.
    kernel = proxy_permutation(q_proxy, k, tiles=case.tiles, interpret=None, **kwargs)
    reference = proxy_permutation_reference(q_proxy, k, **kwargs)
    return tuple(map(np.asarray, kernel)), tuple(map(np.asarray, reference))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_key_pos_is_the_reference_permutation(case):
    (key_pos, _), (ref_pos, _) = _run(case)
    q_proxy, k = _operands(case)
    hp = KV_HEADS * case.group if case.gqa == "replicate" else KV_HEADS
    n, complete = case.keys, case.keys // SEGMENT * SEGMENT
    assert key_pos.shape == (BATCH, hp, n) and key_pos.dtype == np.int32
    # A bijection of each complete segment; the incomplete one in place.
    segments = key_pos[..., :complete].reshape(BATCH, hp, -1, SEGMENT)
    starts = np.arange(complete // SEGMENT)[:, None] * SEGMENT
    np.testing.assert_array_equal(
        np.sort(segments, axis=-1), np.broadcast_to(starts + np.arange(SEGMENT), segments.shape)
    )
    np.testing.assert_array_equal(
        key_pos[..., complete:], np.broadcast_to(np.arange(complete, n), (BATCH, hp, n - complete))
    )
    # It sorts the reference importances (descending, up to rounding)...
    importance = _reference_importance(q_proxy, k, case.gqa)
    in_kernel_order = np.take_along_axis(importance, key_pos[..., :complete], axis=-1)
    steps = np.diff(in_kernel_order.reshape(BATCH, hp, -1, SEGMENT), axis=-1)
    assert (steps <= NEAR_TIE * in_kernel_order.reshape(BATCH, hp, -1, SEGMENT)[..., :-1]).all()
    # ... and is the reference permutation wherever no near-tie lets rounding decide.
    tie_free = _tie_free_segments(importance)
    assert tie_free.mean() >= 0.25, "the inputs leave too few segments to compare exactly"
    ref_segments = ref_pos[..., :complete].reshape(BATCH, hp, -1, SEGMENT)
    np.testing.assert_array_equal(segments[tie_free], ref_segments[tie_free])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pooled_k_is_the_block_means_of_the_permuted_keys(case):
    (key_pos, pooled), (ref_pos, ref_pooled) = _run(case)
    _, k = _operands(case)
    hp = key_pos.shape[1]
    t = -(-case.keys // case.block_size)
    assert pooled.shape == (BATCH, t, hp, HEAD_DIM) and pooled.dtype == np.float32
    # The means of the keys in the kernel's own slot order (zero padding of a partial block
    # counted), whatever the order of near-ties...
    own_order = np.asarray(block_means(slot_order(k, jnp.asarray(key_pos)), case.block_size))
    np.testing.assert_allclose(pooled, own_order, rtol=1e-5, atol=1e-6)
    # ... and the reference's wherever the permutations agree (blocks never straddle one).
    same_block = (key_pos == ref_pos).reshape(BATCH, hp, -1)
    same_block = np.pad(
        same_block, ((0, 0), (0, 0), (0, t * case.block_size - case.keys)), constant_values=True
    )
    same_block = same_block.reshape(BATCH, hp, t, case.block_size).all(-1).transpose(0, 2, 1)
    assert same_block.mean() > 0.5
    np.testing.assert_allclose(pooled[same_block], ref_pooled[same_block], rtol=1e-5, atol=1e-6)


def test_exact_ties_keep_their_original_order():
    """Each segment's keys repeat a pattern of 64, so every importance is tied with three keys
    in the other 64-key tiles (float32 tiles: 4 per segment): the kernel must break the ties
    by original position across tiles and within one, as the stable argsort does."""
    q, k = _qk()
    k = jnp.tile(k[:, :64], (1, 8, 1, 1))  # [2, 512, 2, 16]
    q_proxy = q[:, -128:, :KV_HEADS]
    kwargs = dict(segment_size=SEGMENT, block_size=128, gqa="replicate")
    key_pos, pooled = proxy_permutation(q_proxy, k, interpret=None, **kwargs)
    ref_pos, ref_pooled = proxy_permutation_reference(q_proxy, k, **kwargs)
    key_pos, ref_pos = np.asarray(key_pos), np.asarray(ref_pos)
    # The reference's ties are exact (equal keys, equal softmax values): its order within each
    # group of four equal keys ascends.
    slots = key_pos.reshape(BATCH, KV_HEADS, -1, 4)
    assert (np.diff(slots, axis=-1) == 64).all()
    np.testing.assert_array_equal(key_pos, ref_pos)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(ref_pooled), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The planner's GPU path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_plan_through_the_fused_kernel_equals_jnp_plan(monkeypatch, gqa):
    """``pbs_plan`` on GPU (the fused permutation kernel, then the selection kernel on its
    pooled keys; interpret mode here) equals the jnp plan: perm and block mask. N = 1000: an
    incomplete last segment and a partial last block; GQA 3 (replicate) or 4 (shared)."""
    group = 3 if gqa == "replicate" else 4
    cfg = PBSConfig.paper(block_size=32, segment_size=SEGMENT, proxy_blocks=4, gqa=gqa)  # P 128
    q, k = _qk()
    q = q[:, :, : KV_HEADS * group]
    cpu_perm, cpu_mask, _ = jax.jit(functools.partial(pbs_plan, cfg=cfg))(q, k)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(permutation, "FUSED_PERMUTATION", True)
    calls = []

    def interpreted_permutation(*args, **kwargs):
        calls.append("proxy_permutation")
        return proxy_permutation(*args, **kwargs, interpret=True)

    def interpreted_selection(*args, **kwargs):
        calls.append("pooled_selection")
        return pooled_selection(*args, **kwargs, interpret=True)

    monkeypatch.setattr(permutation, "proxy_permutation", interpreted_permutation)
    monkeypatch.setattr(selection, "pooled_selection", interpreted_selection)
    monkeypatch.setattr(selection, "pooled_permuted_keys", None)  # must not pool again
    monkeypatch.setattr(
        selection,
        "masked_block_means",
        functools.partial(selection.masked_block_means, interpret=True),
    )
    gpu_perm, gpu_mask, _ = jax.jit(functools.partial(pbs_plan, cfg=cfg))(q, k)
    assert calls == ["proxy_permutation", "pooled_selection"]
    np.testing.assert_array_equal(np.asarray(gpu_perm), np.asarray(cpu_perm))
    np.testing.assert_array_equal(np.asarray(gpu_mask), np.asarray(cpu_mask))


def test_ragged_plan_keeps_the_jnp_permutation(monkeypatch):
    """With ``lengths`` (a right-padded batch) the plan's permutation stays on the jnp path:
    the fused kernel has no per-row proxy or key count. (The importances come from the
    ragged ``proxy_importance`` kernel, interpret mode here.)"""
    cfg = PBSConfig(block_size=32, segment_size=SEGMENT)
    q, k = _qk()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(permutation, "FUSED_PERMUTATION", True)
    monkeypatch.setattr(permutation, "proxy_permutation", None)  # calling it would raise
    monkeypatch.setattr(
        permutation, "proxy_importance", functools.partial(proxy_importance, interpret=True)
    )
    perm, pooled_k = permutation.plan_permutation(
        q[:, :, :KV_HEADS], k, cfg, jnp.array([1000, 700], jnp.int32)
    )
    assert pooled_k is None and perm.shape == (BATCH, KV_HEADS, MAX_KEYS)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _small(p=32, n=512, hq=2, hkv=1, d=16):
    return jnp.zeros((1, p, hq, d), jnp.float32), jnp.zeros((1, n, hkv, d), jnp.float32)


@pytest.mark.parametrize(
    "operands,kwargs,match",
    [
        (_small(), dict(segment_size=256, block_size=96), "multiple of block_size"),
        (_small(), dict(segment_size=264, block_size=8), "multiple of 16"),
        (_small(), dict(segment_size=256, block_size=0), "positive int"),
        (_small(n=200), dict(segment_size=256, block_size=128), "complete segment"),
        (_small(p=40), dict(segment_size=256, block_size=128), "P \\(proxy rows\\)"),
        (_small(hq=3, hkv=2), dict(segment_size=256, block_size=128), "multiple of Hkv"),
        (_small(), dict(segment_size=256, block_size=128, gqa="mean"), "gqa must be"),
        (
            _small(),
            dict(segment_size=256, block_size=128, tiles=ImportanceTiles(32, 512)),
            "block_keys=512 must divide",
        ),
        (
            _small(n=1024),
            dict(segment_size=1024, block_size=128, tiles=ImportanceTiles(32, 32)),
            "more than 16 key tiles",
        ),
    ],
)
def test_proxy_permutation_rejects_bad_operands(operands, kwargs, match):
    with pytest.raises(ValueError, match=match):
        proxy_permutation(*operands, interpret=True, **kwargs)
    if "tiles" not in kwargs:
        assert not proxy_permutation_supported(*operands, **kwargs)


def test_default_tiles_fit_the_segment():
    """The default key tile shrinks to divide the segment (48 keys: 16-key tiles, though the
    96 complete keys alone would take 32)."""
    q, k = _small(p=32, n=100)
    assert proxy_permutation_supported(q, k, segment_size=48, block_size=16)
    assert proxy_permutation_supported(*_small(), segment_size=256, block_size=128)
