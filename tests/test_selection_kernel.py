"""The mean-pooling selection kernel against the jnp selection it replaces on GPU.

- ``pooled_top_p_blocks`` (Pallas, interpret mode here) equals the jnp path's top-p mask
  ``top_p_blocks(block_probabilities(...))`` exactly, and with the forced blocks OR-ed in it
  equals ``select_from_probabilities``: T not a power of two, GQA 1 and 4, both softmax domains
  (with and without permutation), thresholds 0.5 / 0.9 / 1.0, default and explicit tiles (3
  and 7 cuts per step of the cut-off search among them);
- ``pooled_selection`` (the same kernel writing the forced blocks and the block lists) equals
  ``pooled_selection_reference``: T a power of two and not, a chunk's Tq < T rows, GQA 1, 3
  and 4, codes with never-selected (ragged) rows, sinks -1 and >= 0, thresholds 0.5 / 0.9;
- ``select_blocks``' GPU path (the kernel, run here in interpret mode) equals its CPU path, and
  ``pbs_plan``'s lists from the kernel equal ``index_lists`` of its mask (ragged and chunked);
- the contract's validation.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pbs_jax
from pallas_kernels import (
    CODE_DOMAIN,
    CODE_EARLIER,
    CODE_FORCED,
    CODE_NEVER,
    MAX_POOLED_BLOCKS,
    PooledTopPTiles,
    pooled_selection,
    pooled_selection_reference,
    pooled_top_p_blocks,
    pooled_top_p_blocks_reference,
    pooled_top_p_supported,
    pooled_top_p_tiles,
)
from pbs_jax import PBSConfig, blocks, grid, permutation, selection
from tests.conftest import interpret_on_fake_gpu, make_qkv

BLOCK, SEGMENT = 16, 64  # 4 blocks per segment: the permuted domain has several segments


@dataclasses.dataclass(frozen=True)
class Case:
    num_blocks: int  # T
    seq_len: int  # N: a partial last block where N < 16 T
    q_heads: int
    kv_heads: int
    gqa: str  # "replicate": Hp = Hq (GQA 1); "shared": Hp = Hkv (GQA Hq / Hkv)
    permute: bool  # softmax domain: earlier segments (True) or the causal blocks (False)
    threshold: float
    head_dim: int = 16
    tiles: PooledTopPTiles | None = None

    @property
    def cfg(self) -> PBSConfig:
        return PBSConfig.paper(
            block_size=BLOCK,
            segment_size=SEGMENT,
            permute=self.permute,
            gqa=self.gqa,
            threshold=self.threshold,
        )


CASES = [
    Case(5, 75, 4, 4, "replicate", True, 1.0),
    Case(24, 380, 4, 1, "shared", True, 0.5),
    # Two head-dim chunks per dot and 32-row tiles (T_pad = 128).
    Case(70, 1110, 4, 4, "replicate", False, 0.9, head_dim=32, tiles=PooledTopPTiles(32, 16)),
    # The cut-off search with 3 and 7 masked sums per step: the same mask.
    Case(24, 380, 4, 1, "shared", True, 0.9, tiles=PooledTopPTiles(16, 16, cuts_per_step=3)),
    Case(70, 1110, 4, 4, "replicate", False, 0.5, tiles=PooledTopPTiles(16, 16, cuts_per_step=7)),
]
GPU_PATH_CASE = CASES[1]  # GQA 4, the permuted domain


def _case_id(case: Case) -> str:
    cuts = case.tiles.cuts_per_step if case.tiles else 1
    return f"T{case.num_blocks}-{case.gqa}-{case.threshold}-c{cuts}"


@functools.cache
def _qk():
    """One draw (a single compile of the conftest sampler) that every case slices:
    ``q [2, 1120, 4, 32]``, ``k [2, 1120, 4, 32]``, with heavy-hitter keys."""
    q, k, _ = make_qkv(11, 2, 1120, 4, 4, 32)
    return q, k


def _random_permutation(case: Case, num_perm_heads: int) -> np.ndarray:
    """``perm [2, Hp, N]``: each complete segment shuffled at random (identity without
    permute); the selection does not care how a permutation was found."""
    n = case.seq_len
    perm = np.broadcast_to(np.arange(n, dtype=np.int32), (2, num_perm_heads, n)).copy()
    if case.permute:
        rng = np.random.default_rng(case.num_blocks)
        segments = n // SEGMENT
        order = np.argsort(rng.random((2, num_perm_heads, segments, SEGMENT)), axis=-1)
        shuffled = order + np.arange(segments)[:, None] * SEGMENT
        perm[..., : segments * SEGMENT] = shuffled.reshape(2, num_perm_heads, -1)
    return perm


@functools.cache
def _jnp_selection(case: Case):
    """Operands and the jnp path's masks of one case (one compile per case): ``q, k, perm`` and
    ``(pooled_q, pooled_k, domain, top_p, forced, selected)``, masks ``[B, Hq, T, T]``."""
    cfg = case.cfg
    q, k = _qk()
    q = q[:, : case.seq_len, : case.q_heads, : case.head_dim]
    k = k[:, : case.seq_len, : case.kv_heads, : case.head_dim]
    perm = jnp.asarray(_random_permutation(case, cfg.num_perm_heads(case.q_heads, case.kv_heads)))

    @jax.jit
    def run(q, k, perm):
        probs = selection.block_probabilities(q, k, perm, cfg)
        domain = grid.softmax_domain(case.num_blocks, cfg)
        return (
            *selection.pooled_blocks(q, k, perm, cfg),
            domain,
            selection.top_p_blocks(probs, domain, case.threshold),
            selection.forced_blocks(perm, case.q_heads, cfg),
            selection.select_from_probabilities(probs, perm, cfg),
        )

    return q, k, perm, run(q, k, perm)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_equals_jnp_selection(case):
    *_, (pooled_q, pooled_k, domain, top_p, forced, selected) = _jnp_selection(case)
    assert pooled_q.shape == (2, case.num_blocks, case.q_heads, case.head_dim)
    mask = pooled_top_p_blocks(
        pooled_q, pooled_k, domain, case.threshold, tiles=case.tiles, interpret=True
    )
    assert mask.dtype == jnp.bool_ and mask.shape == top_p.shape
    mask, top_p = np.asarray(mask), np.asarray(top_p)
    np.testing.assert_array_equal(mask, top_p)
    np.testing.assert_array_equal(mask | np.asarray(forced), np.asarray(selected))
    # Not vacuous: something is selected, and below τ = 1 not every allowed block.
    allowed_count = np.asarray(domain).sum() * top_p.shape[0] * top_p.shape[1]
    assert 0 < top_p.sum() <= allowed_count
    assert (top_p.sum() < allowed_count) == (case.threshold < 1.0)


@pytest.mark.parametrize("tq", [1, 5, 17])
def test_chunk_rows_equal_the_reference(tq):
    """A chunk's last Tq < T query blocks (rows padded to whole tiles, the domain's last rows):
    the kernel equals its contract reference, and each row equals that row of the whole grid's
    kernel (rows are independent)."""
    case = CASES[1]
    *_, (pooled_q, pooled_k, domain, top_p, _, _) = _jnp_selection(case)
    t = case.num_blocks
    chunk_domain = grid.softmax_domain(t, case.cfg, t - tq)
    np.testing.assert_array_equal(np.asarray(chunk_domain), np.asarray(domain)[t - tq :])
    chunk_q = pooled_q[:, t - tq :]
    mask = pooled_top_p_blocks(chunk_q, pooled_k, chunk_domain, case.threshold, interpret=True)
    assert mask.shape == (2, case.q_heads, tq, t)
    reference = pooled_top_p_blocks_reference(chunk_q, pooled_k, chunk_domain, case.threshold)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(reference))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(top_p)[:, :, t - tq :])
    assert np.asarray(mask).any()


@pytest.mark.parametrize("chunk_blocks", [None, 6])
def test_select_blocks_gpu_path_equals_cpu_path(monkeypatch, chunk_blocks):
    """``select_blocks`` on GPU (the kernel, interpret mode here) equals its CPU path (the jnp
    selection): one rule, two evaluations, the forced blocks OR-ed in by the same function;
    also for a chunk (queries the last ``chunk_blocks`` blocks), whose rows the kernel takes."""
    case = GPU_PATH_CASE
    q, k, perm, (*_, selected) = _jnp_selection(case)
    if chunk_blocks is not None:
        q = q[:, q.shape[1] - (chunk_blocks - 1) * BLOCK - q.shape[1] % BLOCK :]
        assert pbs_jax.num_blocks(q.shape[1], BLOCK) == chunk_blocks
        selected = selected[:, :, -chunk_blocks:]
    calls = _interpret_the_gpu_path(monkeypatch)
    on_gpu = jax.jit(functools.partial(selection.select_blocks, cfg=case.cfg))(q, k, perm)
    assert calls, "the GPU path did not run the kernel"
    np.testing.assert_array_equal(np.asarray(on_gpu), np.asarray(selected))


def _interpret_the_gpu_path(monkeypatch) -> list:
    """Make the selection take its GPU path on this CPU: the selection kernel (and the pooling
    kernels of the permuted keys and of the queries) in interpret mode. Returns the keyword
    arguments of each selection kernel call."""
    calls = interpret_on_fake_gpu(
        monkeypatch, selection, "pooled_selection", "permuted_block_means", "masked_block_means"
    )
    return calls["pooled_selection"]


@dataclasses.dataclass(frozen=True)
class CodesCase:
    num_blocks: int  # T
    query_blocks: int  # Tq <= T: the last Tq query blocks
    q_heads: int
    perm_heads: int
    threshold: float
    ragged: bool  # codes per batch row, with CODE_NEVER outside a shorter row's blocks
    sink: str  # "none": all -1; "some": random blocks, some -1


CODES_CASES = [
    CodesCase(32, 32, 4, 4, 0.9, ragged=False, sink="none"),  # T a power of two, GQA 1
    CodesCase(21, 13, 4, 1, 0.5, ragged=True, sink="some"),  # a chunk, T_pad 32, GQA 4
    CodesCase(40, 40, 3, 1, 0.9, ragged=True, sink="some"),  # GQA 3, T_pad 64
    CodesCase(40, 7, 4, 4, 0.5, ragged=False, sink="some"),  # 7 rows of a 16-row tile
]


def _codes_case_id(case: CodesCase) -> str:
    ragged = "ragged" if case.ragged else "shared"
    heads = f"{case.q_heads}/{case.perm_heads}"
    return (
        f"T{case.num_blocks}-Tq{case.query_blocks}-H{heads}-{case.threshold}-{ragged}-{case.sink}"
    )


def _random_codes_operands(case: CodesCase, b: int = 2, d: int = 16):
    """Fresh random pooled blocks and codes: a causal-like domain with random holes, random
    forced blocks, an earlier-blocks prefix per row, and (ragged) batch row 1 cut to its first
    ``T // 2`` query and key blocks by ``CODE_NEVER``."""
    t, tq = case.num_blocks, case.query_blocks
    kq, kk = jax.random.split(jax.random.key(t * 100 + tq))
    pooled_q = jax.random.normal(kq, (b, tq, case.q_heads, d), jnp.float32)
    pooled_k = jax.random.normal(kk, (b, t, case.perm_heads, d), jnp.float32)
    rng = np.random.default_rng(t + tq)
    rows = (t - tq + np.arange(tq))[:, None]  # absolute query blocks
    cols = np.arange(t)[None, :]
    bc = b if case.ragged else 1
    domain = (cols <= rows) & (rng.random((bc, tq, t)) < 0.8)
    forced = rng.random((bc, tq, t)) < 0.1
    earlier = np.broadcast_to(cols < rows - rows % 4, (bc, tq, t))  # 4 blocks per "segment"
    codes = (domain * CODE_DOMAIN + forced * CODE_FORCED + earlier * CODE_EARLIER).astype(np.int8)
    if case.ragged:
        real = t // 2
        codes[1] |= (((rows >= real) | (cols >= real)) * CODE_NEVER).astype(np.int8)
    if case.sink == "none":
        sink = np.full((b, case.q_heads), -1)
    else:
        sink = rng.integers(-1, t, (b, case.q_heads))
        sink[0, 0], sink[-1, -1] = -1, t - 1
    return pooled_q, pooled_k, jnp.asarray(codes), jnp.asarray(sink, jnp.int32)


@pytest.mark.parametrize("lists_rows", [0, 8])
@pytest.mark.parametrize("case", CODES_CASES, ids=_codes_case_id)
def test_selection_with_lists_equals_reference(case, lists_rows):
    """The selection's mask, ids and counts equal the reference's (the top-p mask of the same
    row rules, the codes and sink applied, then lists by a stable sort of each row), with the
    lists written by the selection kernel itself (lists_rows 0) or by the separate lists kernel
    (8 query blocks per program); the mask-only launch writes the same mask."""
    operands = _random_codes_operands(case)
    codes = np.asarray(operands[2])
    b, t, tq = 2, case.num_blocks, case.query_blocks
    tiles = dataclasses.replace(pooled_top_p_tiles(t, operands[0].shape[-1]), lists_rows=lists_rows)
    got = pooled_selection(*operands, case.threshold, tiles=tiles, interpret=True)
    mask, ids, full, total = pooled_selection_reference(*operands, case.threshold)
    chex.assert_shape([got.mask, got.ids], (b, case.q_heads, tq, t))
    chex.assert_shape([got.full_counts, got.total_counts], (b, case.q_heads, tq))
    assert got.mask.dtype == jnp.bool_ and got.ids.dtype == jnp.int32
    chex.assert_trees_all_equal(tuple(got), (mask, ids, full, total))
    only_mask = pooled_selection(
        *operands, case.threshold, with_lists=False, tiles=tiles, interpret=True
    )
    assert only_mask.ids is None and only_mask.full_counts is None
    chex.assert_trees_all_equal(only_mask.mask, mask)
    # Not vacuous: the top-p cut drops allowed blocks, forced blocks outside the domain are
    # kept, never-selected blocks are not, and the lists are not all full rows.
    mask = np.asarray(mask)
    domain = (codes & CODE_DOMAIN) != 0
    never = np.broadcast_to((codes & CODE_NEVER) != 0, (b, tq, t))[:, None]
    assert (domain[:, None] & ~mask & ~never).any()
    assert (mask & ~domain[:, None]).any()
    assert not (mask & never).any()
    assert 0 < np.asarray(full).sum() < np.asarray(total).sum() < mask.size
    if case.ragged:
        assert never.any()


@pytest.mark.parametrize(
    "lengths,chunk_blocks,force_sink",
    [(None, None, True), ((380, 200), None, True), ((380, 40), None, False), (None, 6, True)],
)
def test_plan_lists_equal_index_lists(monkeypatch, lengths, chunk_blocks, force_sink):
    """``pbs_plan`` on GPU (the selection kernel writing mask and lists, interpret mode here):
    its mask equals the CPU plan's, and its lists equal ``index_lists`` of that mask (the
    independent compaction). Ragged rows (one of 40 tokens: no complete segment, identity
    permutation) and a chunk of the last 6 query blocks; the default config's dense tail."""
    cfg = PBSConfig(block_size=BLOCK, segment_size=SEGMENT, gqa="shared", force_sink=force_sink)
    q, k = _qk()
    q, k = q[:, :380, :4, :16], k[:, :380, :1, :16]  # T = 24, GQA 4
    if chunk_blocks is not None:
        q = q[:, q.shape[1] - (chunk_blocks - 1) * BLOCK - q.shape[1] % BLOCK :]
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)

    def plan(q, k, lengths):  # a fresh jit per call: the GPU path must trace anew
        return jax.jit(functools.partial(pbs_jax.pbs_plan, cfg=cfg))(q, k, lengths=lengths)

    cpu = plan(q, k, lengths)
    chex.assert_trees_all_equal(cpu.lists, blocks.index_lists(cpu.block_mask, cfg))
    calls = _interpret_the_gpu_path(monkeypatch)
    # The importance stays on its jnp path, so the permutation is the CPU plan's exactly.
    monkeypatch.setattr(permutation, "proxy_importance_supported", lambda *args: False)
    gpu = plan(q, k, lengths)
    with_lists = [kwargs.get("with_lists", True) for kwargs in calls]
    assert with_lists == [True], "the GPU plan did not run the kernel with lists"
    chex.assert_trees_all_equal(gpu.perm, cpu.perm)
    chex.assert_trees_all_equal(gpu.block_mask, cpu.block_mask)
    chex.assert_trees_all_equal(gpu.lists, blocks.index_lists(gpu.block_mask, cfg))
    if lengths is not None:  # nothing selected outside the short row's blocks
        real = pbs_jax.num_blocks(int(lengths[1]), BLOCK)
        short_row = np.asarray(gpu.block_mask)[1]
        assert short_row[:, :real, :real].any()
        assert not short_row[:, real:].any() and not short_row[:, :, real:].any()


def test_default_tiles_follow_t():
    assert pooled_top_p_tiles(5, 16) == PooledTopPTiles(16, 16, num_warps=4)
    assert pooled_top_p_tiles(64, 128) == PooledTopPTiles(16, 128, num_warps=4)
    assert pooled_top_p_tiles(1024, 128) == PooledTopPTiles(32, 16, num_warps=8, lists_rows=8)
    assert pooled_top_p_tiles(MAX_POOLED_BLOCKS, 64) == PooledTopPTiles(
        16, 16, num_warps=8, lists_rows=8
    )


def _operands(b=1, t=8, hq=2, hp=1, d=16, q_dtype=jnp.float32, k_t=None):
    pooled_q = jnp.zeros((b, t, hq, d), q_dtype)
    pooled_k = jnp.zeros((b, t if k_t is None else k_t, hp, d), jnp.float32)
    return pooled_q, pooled_k


_DOMAIN8 = jnp.tril(jnp.ones((8, 8), jnp.bool_))


@pytest.mark.parametrize(
    "operands,domain,threshold,tiles,match",
    [
        (_operands(hq=3, hp=2), _DOMAIN8, 0.9, None, "multiple of Hp"),
        (_operands(d=24), _DOMAIN8, 0.9, None, "head dim"),
        (_operands(q_dtype=jnp.bfloat16), _DOMAIN8, 0.9, None, "float32"),
        (_operands(k_t=7), _DOMAIN8[:, :7], 0.9, None, "T >= Tq"),  # more query than key blocks
        ((jnp.zeros((8, 2, 16)), jnp.zeros((1, 8, 1, 16))), _DOMAIN8, 0.9, None, "4-d"),
        (_operands(t=MAX_POOLED_BLOCKS + 1), None, 0.9, None, "pooled blocks"),
        (_operands(), _DOMAIN8[:7], 0.9, None, "domain must be"),
        (_operands(), _DOMAIN8.astype(jnp.float32), 0.9, None, "bool or integer"),
        (_operands(), _DOMAIN8, 0.0, None, "threshold"),
        (_operands(), _DOMAIN8, 1.5, None, "threshold"),
        (_operands(), _DOMAIN8, jnp.float32(0.9), None, "threshold"),
        (_operands(), _DOMAIN8, 0.9, PooledTopPTiles(32, 16), "block_rows=32"),
        (_operands(d=16), _DOMAIN8, 0.9, PooledTopPTiles(16, 32), "depth_chunk=32"),
        (_operands(), _DOMAIN8, 0.9, "tiles", "PooledTopPTiles or None"),
    ],
)
def test_rejects_bad_operands(operands, domain, threshold, tiles, match):
    if domain is None:
        t = operands[0].shape[1]
        domain = jnp.zeros((t, t), jnp.bool_)
    with pytest.raises(ValueError, match=match):
        pooled_top_p_blocks(*operands, domain, threshold, tiles=tiles, interpret=True)


_CODES8 = jnp.ones((1, 8, 8), jnp.int8)
_NO_SINK = jnp.full((1, 2), -1, jnp.int32)


@pytest.mark.parametrize(
    "codes,sink,match",
    [
        (_CODES8[:, :7], _NO_SINK, "codes must be"),  # Tq rows
        (jnp.ones((3, 8, 8), jnp.int8), _NO_SINK, "codes must be"),  # neither 1 nor B rows
        (_CODES8.astype(jnp.int32), _NO_SINK, "int8"),
        (_CODES8, _NO_SINK[:, :1], "sink must be"),  # one per query head
        (_CODES8, _NO_SINK.astype(jnp.int8), "sink must be"),
    ],
)
def test_selection_rejects_bad_codes(codes, sink, match):
    with pytest.raises(ValueError, match=match):
        pooled_selection(*_operands(), codes, sink, 0.9, interpret=True)


def test_supported():
    assert pooled_top_p_supported(*_operands(t=MAX_POOLED_BLOCKS))
    assert not pooled_top_p_supported(*_operands(t=MAX_POOLED_BLOCKS + 1))
    assert not pooled_top_p_supported(*_operands(d=8))


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        PooledTopPTiles(block_rows=8)
    with pytest.raises(ValueError, match="power of two"):
        PooledTopPTiles(depth_chunk=48)
    with pytest.raises(ValueError, match="num_warps"):
        PooledTopPTiles(num_warps=3)
    for cuts in (0, 2, 15, 3.0):
        with pytest.raises(ValueError, match="PooledTopPTiles.cuts_per_step must be one of"):
            PooledTopPTiles(cuts_per_step=cuts)
    with pytest.raises(ValueError, match="lists_rows=12 must be 0"):
        PooledTopPTiles(lists_rows=12)
