"""Tests of the Pallas block-sparse attention kernel (pallas_kernels/).

On CPU every kernel call runs in Pallas interpret mode (interpret=None picks it); on a GPU the
same file runs the compiled Triton kernel. Three-way check: kernel == pure-jnp reference ==
an independent float64 numpy oracle written here (loops over heads and query rows).
"""

from __future__ import annotations

import dataclasses

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    DEFAULT_TILES,
    TileConfig,
    block_sparse_attention,
    block_sparse_attention_reference,
    get_tiles,
)
from tests.conftest import make_case, numpy_oracle, permute_kv, rel_err, tol

pytestmark = pytest.mark.filterwarnings("ignore:.*Pallas Triton backend is deprecated.*")

# --------------------------------------------------------------------------------------------
# Kernel == reference == oracle on random lists
# --------------------------------------------------------------------------------------------

# (n, d, hq, hk, hp, dtype, block_size, gather_kv, tiles)
ORACLE_CASES = [
    pytest.param(128, 64, 2, 2, 2, jnp.float32, 32, True, None, id="n_multiple"),
    pytest.param(100, 64, 2, 2, 2, jnp.float32, 32, True, None, id="n_ragged"),
    pytest.param(20, 64, 2, 2, 2, jnp.float32, 32, True, None, id="n_lt_block"),
    pytest.param(1, 64, 2, 1, 1, jnp.float32, 16, True, None, id="n_one"),
    pytest.param(100, 128, 2, 2, 2, jnp.float32, 32, True, None, id="d128"),
    pytest.param(150, 64, 4, 1, 4, jnp.float32, 32, True, None, id="gqa4_replicate_gather"),
    pytest.param(150, 64, 4, 1, 1, jnp.float32, 32, True, None, id="gqa4_shared_gather"),
    pytest.param(150, 64, 4, 1, 4, jnp.float32, 32, False, None, id="gqa4_replicate_permuted"),
    pytest.param(150, 64, 4, 1, 1, jnp.float32, 32, False, None, id="gqa4_shared_permuted"),
    pytest.param(96, 64, 2, 2, 2, jnp.float32, 32, False, None, id="mha_permuted_multiple"),
    pytest.param(130, 64, 4, 1, 4, jnp.bfloat16, 32, True, None, id="bf16_gqa4_replicate"),
    pytest.param(130, 128, 4, 1, 1, jnp.bfloat16, 32, False, None, id="bf16_d128_shared_perm"),
    pytest.param(70, 64, 2, 1, 2, jnp.float16, 32, True, None, id="f16"),
    pytest.param(300, 64, 2, 1, 2, jnp.bfloat16, 128, True, TileConfig(64, 64), id="bs128_bf16"),
    pytest.param(
        256, 128, 2, 2, 2, jnp.float32, 128, True, TileConfig(64, 32), id="bs128_f32_d128"
    ),
]


@pytest.mark.parametrize("n,d,hq,hk,hp,dtype,block_size,gather_kv,tiles", ORACLE_CASES)
def test_matches_reference_and_oracle(n, d, hq, hk, hp, dtype, block_size, gather_kv, tiles):
    case = make_case(
        n * 7 + d + hq * 3 + hp,
        n=n,
        d=d,
        hq=hq,
        hk=hk,
        hp=hp,
        dtype=dtype,
        block_size=block_size,
        density=0.5,
    )
    k = v = None
    if not gather_kv:
        k, v = permute_kv(case.k, case.key_pos), permute_kv(case.v, case.key_pos)
    out = block_sparse_attention(
        *case.args(k, v), block_size=block_size, gather_kv=gather_kv, tiles=tiles
    )
    ref = block_sparse_attention_reference(
        *case.args(k, v), block_size=block_size, gather_kv=gather_kv
    )
    oracle = numpy_oracle(case, gather_kv=gather_kv, k=k, v=v)

    chex.assert_shape(out, case.q.shape)
    assert out.dtype == case.q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(ref, oracle) < tol(dtype)
    assert rel_err(out, oracle) < tol(dtype), rel_err(out, oracle)
    assert rel_err(out, ref) < tol(dtype)
    if gather_kv:
        # Same answer when the caller permutes K/V itself (gather_kv=False, K/V per perm head).
        kp_, vp_ = permute_kv(case.k, case.key_pos), permute_kv(case.v, case.key_pos)
        out2 = block_sparse_attention(
            *case.args(kp_, vp_), block_size=block_size, gather_kv=False, tiles=tiles
        )
        assert rel_err(out2, out) < tol(dtype)


def test_full_causal_list_equals_dense_causal():
    """100% density with identity key_pos is plain causal attention (GQA 4)."""
    n, bs, hq, hk, d = 200, 64, 4, 1, 64
    t = -(-n // bs)
    kq, kk, kv = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(kq, (1, n, hq, d))
    k = jax.random.normal(kk, (1, n, hk, d))
    v = jax.random.normal(kv, (1, n, hk, d))
    kp = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, hk, n))
    ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, hq, t, t))
    total = jnp.broadcast_to(jnp.arange(1, t + 1, dtype=jnp.int32), (1, hq, t))
    out = block_sparse_attention(q, k, v, kp, ids, total - 1, total, block_size=bs)
    with jax.default_matmul_precision("highest"):  # no TF32 in the XLA baseline on GPU
        dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, dense) < 1e-5


def test_custom_sm_scale_and_jit():
    case = make_case(3, n=90, d=64, block_size=32)
    f = jax.jit(lambda *a: block_sparse_attention(*a, block_size=32, sm_scale=0.3))
    out = f(*case.args())
    assert rel_err(out, numpy_oracle(case, sm_scale=0.3)) < 1e-4


@hypothesis.settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(data=st.data())
def test_property_random_shapes(data):
    """Random N (incl. 1), block sizes, tiles, GQA layouts, densities and gather modes."""
    block_size = data.draw(st.sampled_from([16, 32]), "block_size")
    n = data.draw(st.integers(1, 5 * block_size + 3), "n")
    hk = data.draw(st.sampled_from([1, 2]), "hk")
    group = data.draw(st.sampled_from([1, 2]), "group")
    hq = hk * group
    hp = data.draw(st.sampled_from([hk, hq]), "hp")
    gather_kv = data.draw(st.booleans(), "gather_kv")
    bm = data.draw(st.sampled_from([16, block_size]), "block_m")
    bn = data.draw(st.sampled_from([16, block_size]), "block_n")
    density = data.draw(st.sampled_from([0.0, 0.5, 1.0]), "density")
    seg_blocks = data.draw(st.sampled_from([1, 2]), "seg_blocks")
    case = make_case(
        data.draw(st.integers(0, 2**16), "seed"),
        n=n,
        d=32,
        hq=hq,
        hk=hk,
        hp=hp,
        b=2,
        block_size=block_size,
        seg_blocks=seg_blocks,
        density=density,
    )
    k = v = None
    if not gather_kv:
        k, v = permute_kv(case.k, case.key_pos), permute_kv(case.v, case.key_pos)
    out = block_sparse_attention(
        *case.args(k, v), block_size=block_size, gather_kv=gather_kv, tiles=TileConfig(bm, bn, 2, 1)
    )
    oracle = numpy_oracle(case, gather_kv=gather_kv, k=k, v=v)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, oracle) < 1e-4


# --------------------------------------------------------------------------------------------
# Robustness: every row written, nothing unlisted read, total == 0 gives zeros
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather_kv", [True, False])
def test_poisoned_unlisted_blocks_and_garbage_entries(gather_kv):
    """NaN K/V in blocks no query lists, list entries past `total` pointing at those blocks,
    query blocks with total == 0, and rows masked everywhere: the kernel must match the oracle
    exactly where defined, write every row, and never read the poison."""
    n, bs, d, hq = 224, 32, 64, 2
    t = n // bs  # 7 blocks, segments of 2 blocks
    case = make_case(5, n=n, d=d, hq=hq, hk=hq, hp=hq, block_size=bs, density=0.0)
    poison_block = 1  # never listed below: only own segments, and segment 0 = blocks {0, 1}
    ids = np.full_like(case.ids, poison_block)
    full, total = np.zeros_like(case.full), np.zeros_like(case.total)
    for h in range(hq):
        for qb in range(t):
            s0 = (qb // 2) * 2
            row = [0] * (s0 > 0) + [kb for kb in range(s0, min(s0 + 2, t)) if kb != 1]
            if qb in (0, 1):
                row = []  # blocks 0 and 1: nothing listed -> zeros
            if qb == 4:
                # Block 5 (masked part) has every key after every query of block 4 (see below):
                # head 1 still has block 0 (full); head 0 has no allowed key at all -> zeros.
                row = [0, 5] if h == 1 else [5]
            nf = int(row[:1] == [0] and s0 > 0)
            ids[0, h, qb, : len(row)] = row
            full[0, h, qb], total[0, h, qb] = nf, len(row)
    # With identity key_pos in block 5, every key there is > every query of block 4: the
    # masked part is fully masked for those rows; only block 0 (full) contributes.
    kp = case.key_pos.copy()
    kp[:, :, 5 * bs : 6 * bs] = np.arange(5 * bs, 6 * bs)
    # For gather_kv=True poison the rows that slots of block 1 point at; else slots themselves.
    rows = kp[0, :, bs : 2 * bs].ravel() if gather_kv else np.arange(bs, 2 * bs)
    nan_rows = np.zeros(n, bool)
    nan_rows[rows] = True
    # Poison only rows no listed slot points at (a gathered row could be shared otherwise).
    for h in range(hq):
        for qb in range(t):
            for e in range(total[0, h, qb]):
                kb = ids[0, h, qb, e]
                slots = np.arange(kb * bs, (kb + 1) * bs)
                nan_rows[kp[0, h, slots] if gather_kv else slots] = False
    assert nan_rows.sum() > 0
    k = jnp.where(jnp.asarray(nan_rows)[None, :, None, None], jnp.nan, case.k)
    v = jnp.where(jnp.asarray(nan_rows)[None, :, None, None], jnp.nan, case.v)
    case = dataclasses.replace(case, k=k, v=v, key_pos=kp, ids=ids, full=full, total=total)

    out = np.asarray(
        block_sparse_attention(
            *case.args(), block_size=bs, gather_kv=gather_kv, tiles=TileConfig(16, 16)
        )
    )
    assert np.isfinite(out).all(), "poison or uninitialised rows leaked into the output"
    np.testing.assert_array_equal(out[0, : 2 * bs], 0.0)  # total == 0 -> exact zeros
    np.testing.assert_array_equal(out[0, 4 * bs : 5 * bs, 0], 0.0)  # every listed key masked
    oracle = numpy_oracle(case, gather_kv=gather_kv)
    assert np.isfinite(oracle).all()
    np.testing.assert_allclose(out, oracle, rtol=1e-4, atol=1e-5)


def test_empty_lists_and_kmax_zero():
    case = make_case(9, n=70, d=64, block_size=32)
    b, hq, t = case.full.shape
    zeros = np.zeros((b, hq, t), np.int32)
    out = block_sparse_attention(
        case.q,
        case.k,
        case.v,
        jnp.asarray(case.key_pos),
        jnp.zeros((b, hq, t, 0), jnp.int32),
        zeros,
        zeros,
        block_size=32,
    )
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    ref = block_sparse_attention_reference(
        case.q,
        case.k,
        case.v,
        jnp.asarray(case.key_pos),
        jnp.zeros((b, hq, t, 0), jnp.int32),
        zeros,
        zeros,
        block_size=32,
    )
    np.testing.assert_array_equal(np.asarray(ref), 0.0)


def test_partial_last_block_listed_unmasked():
    """The ragged last block listed in the *unmasked* part (a caller choice allowed by the
    contract): its padding slots must still never contribute, its real keys unmasked."""
    n, bs = 80, 32  # 3 blocks, the last holds 16 real slots
    case = make_case(21, n=n, d=64, block_size=bs)
    t = 3
    ids = np.tile(np.array([0, 1, 2, -1], np.int32), (1, 2, t, 1))
    full = np.full((1, 2, t), 3, np.int32)
    total = np.full((1, 2, t), 3, np.int32)
    full[0, 1, 2] = 2  # head 1, q block 2: last block masked instead
    case = dataclasses.replace(case, ids=ids, full=full, total=total)
    for gather_kv in (True, False):
        k = v = None
        if not gather_kv:
            k, v = permute_kv(case.k, case.key_pos), permute_kv(case.v, case.key_pos)
        out = block_sparse_attention(*case.args(k, v), block_size=bs, gather_kv=gather_kv)
        assert rel_err(out, numpy_oracle(case, gather_kv=gather_kv, k=k, v=v)) < 1e-4


@pytest.mark.parametrize(
    "tiles",
    [
        TileConfig(16, 16, 2, 1),
        TileConfig(16, 64, 4, 2),
        TileConfig(32, 16),
        TileConfig(64, 32, 8, 3),
    ],
)
def test_tile_configs_agree(tiles):
    n, bs = 200, 64
    case = make_case(13, n=n, d=64, hq=4, hk=2, hp=2, block_size=bs, density=0.6)
    base = block_sparse_attention(*case.args(), block_size=bs, tiles=TileConfig(64, 64))
    out = block_sparse_attention(*case.args(), block_size=bs, tiles=tiles)
    assert rel_err(out, base) < 1e-5
    assert rel_err(out, numpy_oracle(case)) < 1e-4


# --------------------------------------------------------------------------------------------
# Configuration and validation
# --------------------------------------------------------------------------------------------


def test_default_tiles_table():
    for (d, name, gather_kv), tiles in DEFAULT_TILES.items():
        assert d in (64, 128) and name in ("bfloat16", "float16", "float32")
        assert isinstance(gather_kv, bool)
        tiles.check_divides(128)
    assert get_tiles(128, jnp.bfloat16) == DEFAULT_TILES[(128, "bfloat16", True)]
    assert get_tiles(128, jnp.bfloat16, gather_kv=False) == DEFAULT_TILES[(128, "bfloat16", False)]
    small = get_tiles(64, jnp.bfloat16, block_size=32)
    assert small.block_m == 32 and small.block_n == 32
    assert get_tiles(256, jnp.float32).block_m >= 16  # fallback for untabled D
    hash(TileConfig(64, 64))  # static jit argument


def _good():
    case = make_case(1, n=64, d=64, block_size=32)
    return list(case.args())


@pytest.mark.parametrize(
    "mutate,kwargs,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), {}, "q must have rank 4"),
        (
            lambda a: [a.__setitem__(i, jnp.concatenate([a[i]] * 2, 2)[:, :, :3]) for i in (1, 2)],
            {},
            "multiple of Hk",
        ),
        (lambda a: a.__setitem__(2, a[2][:, :32]), {}, "v must have the same shape"),
        (lambda a: [a.__setitem__(i, a[i][..., :48]) for i in range(3)], {}, "power of two"),
        (lambda a: a.__setitem__(0, a[0].astype(jnp.bfloat16)), {}, "share one dtype"),
        (lambda a: [a.__setitem__(i, a[i].astype(jnp.int32)) for i in range(3)], {}, "q.dtype"),
        (lambda a: a.__setitem__(3, jnp.concatenate([a[3]] * 3, 1)[:, :3]), {}, "multiple of Hp"),
        (lambda a: a.__setitem__(3, a[3][:, :, :10]), {}, "key_pos must be"),
        (lambda a: a.__setitem__(3, a[3].astype(jnp.float32)), {}, "key_pos must have an integer"),
        (lambda a: a.__setitem__(4, a[4][:, :, :1]), {}, "block_ids must be"),
        (lambda a: a.__setitem__(5, a[5][:, :1]), {}, "full_counts must be"),
        (lambda a: a.__setitem__(6, a[6][..., None]), {}, "total_counts must be"),
        (None, {"block_size": 48}, "block_size must be a power of two"),
        (None, {"tiles": TileConfig(64, 16)}, "block_m=64 must divide block_size=32"),
        (None, {"tiles": (32, 32, 4, 2)}, "tiles must be a TileConfig"),
        (None, {"sm_scale": -1.0}, "sm_scale"),
    ],
)
def test_bad_inputs_raise(mutate, kwargs, match):
    args = _good()
    if mutate is not None:
        mutate(args)
    kw = {"block_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*args, **kw)
    if "tiles" not in kwargs:
        with pytest.raises(ValueError, match=match):
            block_sparse_attention_reference(*args, **kw)


@pytest.mark.parametrize(
    "field,val", [("block_m", 24), ("block_n", 8), ("num_warps", 3), ("num_stages", 0)]
)
def test_bad_tile_config(field, val):
    kw = {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2, field: val}
    with pytest.raises(ValueError, match=f"TileConfig.{field}"):
        TileConfig(**kw)
