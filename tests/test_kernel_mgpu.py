"""The Mosaic GPU kernel against the same independent oracles as the Triton kernel.

The kernel tests need Hopper (wgmma) and are skipped elsewhere, so CI on CPU does not run them;
run them on an H100/H200 with `python -m pytest tests/test_kernel_mgpu.py`. Semantics checked:
listed earlier-segment blocks of the permuted keys plus the query's whole own segment,
token-masked on original positions. The kernel reads that segment in original order; the lemma
it rests on (attention over a key set does not depend on the keys' order, and a segment's
permutation is a bijection of the segment) is checked on any machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pbs_jax
from pallas_kernels import (
    block_sparse_attention_mgpu,
    block_sparse_attention_mgpu_reference,
    block_sparse_attention_reference,
    mgpu_supported,
    planned,
    planned_attention,
)
from pallas_kernels.planned import perm_heads_per_launch
from pbs_jax import PBSConfig
from tests.conftest import jit_plan, make_case, make_qkv, numpy_oracle, permute_kv, rel_err


def hopper(test):
    """Marked ``hopper`` and skipped where the Mosaic GPU kernel cannot run."""
    on_hopper = mgpu_supported(jnp.zeros((1, 1, 1, 64), jnp.bfloat16), 128)
    skip = pytest.mark.skipif(not on_hopper, reason="the Mosaic GPU kernel needs a Hopper GPU")
    return pytest.mark.hopper(skip(test))


def mgpu_args(c):
    """The Mosaic kernel's array arguments for a kernel case: q, K/V in slot order, K/V in
    original order, the lists and the earlier-segment counts."""
    kp, vp = permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos)
    return c.q, kp, vp, c.k, c.v, jnp.asarray(c.ids), jnp.asarray(c.full)


TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


@hopper
@pytest.mark.parametrize(
    "n,d,hq,hk,hp,dtype",
    [
        (256, 64, 1, 1, 1, jnp.bfloat16),
        (1024, 64, 4, 2, 4, jnp.bfloat16),  # GQA 2, one permutation per query head
        (1024, 128, 4, 2, 2, jnp.float16),  # one permutation per KV head
        (2048, 128, 8, 2, 8, jnp.bfloat16),
        (1536, 64, 3, 1, 3, jnp.bfloat16),  # GQA 3, odd segment count
    ],
)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_matches_reference(n, d, hq, hk, hp, dtype, density):
    c = make_case(n, n=n, d=d, hq=hq, hk=hk, hp=hp, block_size=128, dtype=dtype, density=density)
    ref = block_sparse_attention_reference(*c.args(), block_size=128)
    out = block_sparse_attention_mgpu(*mgpu_args(c), block_size=128, segment_blocks=2)
    assert out.shape == c.q.shape and out.dtype == c.q.dtype
    assert rel_err(out, ref) < TOL[dtype]
    contract = block_sparse_attention_mgpu_reference(
        *mgpu_args(c), block_size=128, segment_blocks=2
    )
    assert rel_err(out, contract) < TOL[dtype]


# The contract's reference on any machine: reading the own segment in original order with a
# causal mask is PBS's token mask over permuted slots (the lemma the kernel rests on).
@pytest.mark.parametrize(
    "n,hq,hk,hp,seg_blocks,density",
    [
        (256, 2, 2, 2, 2, 0.5),
        (300, 4, 2, 4, 2, 0.3),  # ragged N, GQA 2, one permutation per query head
        (320, 3, 1, 1, 4, 0.7),  # GQA 3, one permutation per KV head, 4 blocks per segment
        (192, 2, 1, 2, 1, 1.0),  # MeanPooling-like: the own segment is the diagonal block
    ],
)
def test_mgpu_contract_reference_equals_the_token_mask(n, hq, hk, hp, seg_blocks, density):
    c = make_case(
        n, n=n, d=16, hq=hq, hk=hk, hp=hp, block_size=32, seg_blocks=seg_blocks, density=density
    )
    out = block_sparse_attention_mgpu_reference(
        *mgpu_args(c), block_size=32, segment_blocks=seg_blocks
    )
    assert rel_err(out, numpy_oracle(c)) < 1e-5


@pytest.mark.parametrize("hp", [1, 4])  # one permutation per KV head (physical), per query head
def test_planned_attention_off_hopper_is_the_triton_contract(hp):
    """The kernel entry on a machine without Hopper: the Triton kernel (interpret mode on CPU),
    K/V permuted physically when Hp == Hkv and gathered in-kernel otherwise."""
    c = make_case(7, n=200, d=16, hq=4, hk=1, hp=hp, block_size=32, density=0.5)
    out = planned_attention(*c.args(), block_size=32, segment_blocks=2)
    assert rel_err(out, numpy_oracle(c)) < 1e-4


@pytest.mark.parametrize(
    "n,hp,hkv,expected",
    [
        # Heads of 128, bf16: 2 · N · 256 bytes of copy per permutation head (4 MiB at 8K).
        (8192, 32, 8, 32),  # 128 MiB in all: one launch
        (16384, 32, 8, 32),  # 256 MiB: still one launch
        (32768, 32, 8, 8),  # 16 MiB a head: groups of 8 (two KV heads) fill 128 MiB
        (131072, 32, 8, 2),  # 64 MiB a head: two of one KV head's four
        (131072, 8, 8, 2),  # one permutation per KV head: two KV heads a launch
        (1048576, 32, 8, 1),  # above the limit even alone: one head, the smallest unit
        (32768, 24, 8, 6),  # 3 per KV head: 6 = two whole KV heads; 4 would split one
        (65536, 24, 8, 3),  # 32 MiB a head: 3 (one KV head), not 4
        (131072, 24, 8, 1),  # 64 MiB a head: 2 does not divide a KV head's 3, so one
    ],
)
def test_perm_heads_per_launch_worked_by_hand(n, hp, hkv, expected):
    assert perm_heads_per_launch(1, n, hp, hkv, 128, 2, 128 * 2**20) == expected


@pytest.mark.parametrize(
    "hq,hk,hp,per",
    [(4, 2, 4, 1), (8, 2, 8, 2), (8, 2, 8, 4), (6, 3, 3, 1), (4, 4, 4, 2), (8, 2, 2, 1)],
)
def test_mosaic_path_per_head_group_equals_one_launch(hq, hk, hp, per):
    """The Mosaic path launched per group of ``per`` permutation heads (part of a KV head's,
    one KV head's, or several KV heads') is the one launch, on the kernel's contract reference
    (any machine), ragged N padded, and the token-mask oracle."""
    c = make_case(11, n=200, d=16, hq=hq, hk=hk, hp=hp, block_size=32, density=0.5)
    per_head = 2 * 200 * 16 * 4  # bytes of one permutation head's K and V copy (float32)

    def mosaic_path(limit, single_launch):
        return planned._mosaic(
            *c.args()[:6],  # q, k, v, key_pos, ids, full (the Mosaic path has no totals)
            block_size=32,
            segment_blocks=2,
            kernel=block_sparse_attention_mgpu_reference,
            limit=limit,
            single_launch=single_launch,
        )

    assert perm_heads_per_launch(1, 200, hp, hk, 16, 4, per * per_head, 0) == per
    grouped, whole = mosaic_path(per * per_head, 0), mosaic_path(0, 2**40)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(whole), rtol=1e-6, atol=1e-6)
    assert rel_err(grouped, numpy_oracle(c)) < 1e-5


@hopper
def test_planned_attention_per_head_group_on_hopper(monkeypatch):
    """The Mosaic kernel launched once per permutation head equals one launch (bf16, GQA 4,
    ragged N)."""
    c = make_case(
        5, n=1000, d=128, hq=8, hk=2, hp=8, block_size=128, dtype=jnp.bfloat16, density=0.4
    )
    whole = planned_attention(*c.args(), block_size=128, segment_blocks=2)
    monkeypatch.setattr(planned, "SLOT_COPY_LIMIT_BYTES", 0)
    monkeypatch.setattr(planned, "SINGLE_LAUNCH_COPY_BYTES", 0)
    grouped = planned_attention(*c.args(), block_size=128, segment_blocks=2)
    np.testing.assert_array_equal(np.asarray(grouped, np.float32), np.asarray(whole, np.float32))
    assert rel_err(grouped, numpy_oracle(c)) < TOL[jnp.bfloat16]


@hopper
def test_unlisted_blocks_are_never_read():
    """NaN in every permuted block that no list names, and in the original K/V outside the own
    segments actually used, must not reach the output."""
    c = make_case(
        3, n=1024, d=64, hq=2, hk=1, hp=2, block_size=128, dtype=jnp.bfloat16, density=0.3
    )
    kp, vp = permute_kv(c.k, c.key_pos), permute_kv(c.v, c.key_pos)
    listed = np.zeros((2, 8), bool)
    for h in range(2):
        for qb in range(8):
            listed[h, c.ids[0, h, qb, : c.full[0, h, qb]]] = True
    poison = np.repeat(~listed, 128, axis=1).T[None, :, :, None]  # [1, N, Hp, 1]
    kp = jnp.where(poison, jnp.nan, kp).astype(kp.dtype)
    vp = jnp.where(poison, jnp.nan, vp).astype(vp.dtype)
    out = block_sparse_attention_mgpu(
        c.q,
        kp,
        vp,
        c.k,
        c.v,
        jnp.asarray(c.ids),
        jnp.asarray(c.full),
        block_size=128,
        segment_blocks=2,
    )
    assert bool(jnp.isfinite(out).all())
    assert rel_err(out, block_sparse_attention_reference(*c.args(), block_size=128)) < 2e-2


@hopper
@pytest.mark.parametrize("n", [300, 700, 1000, 2048])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_op_on_hopper_equals_reference_op(n, gqa):
    """pbs_attention(impl="pallas") takes this kernel on Hopper (ragged N padded)."""
    cfg = PBSConfig(gqa=gqa)
    q, k, v = make_qkv(n, 1, n, 8, 2, 64, jnp.bfloat16)
    out = pbs_jax.pbs_attention(q, k, v, cfg, impl="pallas")
    ref = pbs_jax.pbs_attention(q, k, v, cfg, impl="reference")
    assert rel_err(out, ref) < 2e-2


@hopper
def test_dense_lists_equal_cudnn():
    q, k, v = make_qkv(0, 1, 4096, 8, 2, 128, jnp.bfloat16)
    t = 32
    ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, 8, t, t))
    off = jnp.broadcast_to((jnp.arange(t, dtype=jnp.int32) // 2) * 2, (1, 8, t))
    out = block_sparse_attention_mgpu(q, k, v, k, v, ids, off, block_size=128, segment_blocks=2)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("n", [640, 700])
@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_own_segment_in_original_order_is_the_token_mask(n, gqa):
    """The contract between the planner and this kernel, in float64 on any machine: with the
    op's real permutation and lists, the own-segment keys seen through the permuted slots with
    the token mask (key_pos <= q_pos) give the same attention as the segment's keys in original
    order with a plain causal mask (what the kernel reads), and list entries [0, full) are
    exactly the earlier-segment blocks (what it reads from the permuted keys)."""
    cfg = PBSConfig(block_size=32, segment_size=128, gqa=gqa)
    hq, hk, d = 4, 2, 16
    qj, kj, vj = make_qkv(n, 1, n, hq, hk, d, jnp.float32)
    perm, mask = jit_plan(qj, kj, cfg)
    lists = pbs_jax.index_lists(mask, cfg)
    perm, ids, full, total = (
        np.asarray(x) for x in (perm, lists.ids, lists.full_counts, lists.total_counts)
    )
    q, k, v = (np.asarray(x, np.float64) for x in (qj, kj, vj))
    bs, seg = cfg.block_size, cfg.segment_size
    for h in range(hq):
        p, kv = h // (hq // perm.shape[1]), h // (hq // hk)
        for i in range(0, n, 7):
            qb, own_start = i // bs, (i // seg) * seg
            listed = ids[0, h, qb, : total[0, h, qb]]
            assert all(blk * bs < own_start for blk in listed[: full[0, h, qb]])
            assert all(blk * bs >= own_start for blk in listed[full[0, h, qb] :])
            slots = [j for blk in listed for j in range(blk * bs, min(blk * bs + bs, n))]
            via_slots = [
                int(perm[0, p, j]) for j in slots if perm[0, p, j] < own_start or perm[0, p, j] <= i
            ]
            via_order = [int(perm[0, p, j]) for j in slots if j < own_start] + list(
                range(own_start, i + 1)
            )
            assert sorted(via_slots) == sorted(via_order)
            outs = []
            for keys in (via_slots, via_order):
                logits = k[0, keys, kv] @ q[0, i, h] / np.sqrt(d)
                w = np.exp(logits - logits.max())
                outs.append((w / w.sum()) @ v[0, keys, kv])
            np.testing.assert_allclose(outs[0], outs[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "q": a["q"].astype(jnp.float32)}, "16-bit dtype"),
        (lambda a: {**a, "k": a["k"][:, :128]}, "k_perm/v_perm must be"),
        (
            lambda a: {
                **a,
                "k_perm": a["k_perm"][:, :, :1].repeat(3, axis=2),
                "v_perm": a["v_perm"][:, :, :1].repeat(3, axis=2),
            },
            "dividing Hq",
        ),
        (lambda a: {**a, "off_counts": a["off_counts"][:, :, :1]}, "off_counts"),
        (
            lambda a: {
                **a,
                "q": a["q"][:, :200],
                "k_perm": a["k_perm"][:, :200],
                "v_perm": a["v_perm"][:, :200],
                "k": a["k"][:, :200],
                "v": a["v"][:, :200],
            },
            "multiple of block_size",
        ),
    ],
)
def test_bad_inputs_raise(mutate, match):
    """Shape and dtype errors are raised before any lowering, on any machine."""
    x = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    good = {
        "q": x,
        "k_perm": x,
        "v_perm": x,
        "k": x[:, :, :2],
        "v": x[:, :, :2],
        "block_ids": jnp.zeros((1, 4, 2, 2), jnp.int32),
        "off_counts": jnp.zeros((1, 4, 2), jnp.int32),
    }
    a = mutate(good)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention_mgpu(
            a["q"], a["k_perm"], a["v_perm"], a["k"], a["v"], a["block_ids"], a["off_counts"]
        )
