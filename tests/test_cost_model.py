"""impl="auto"'s cost model (pbs_jax/cost_model.py) on hand-worked tables: the kernel fits, the
interpolation in log N and the shape scaling, the decision at its three points, the floor and
estimate densities; that impl="auto" on CPU is still the reference; and the bench's cost-table
helpers and the capture file round trip (experiments)."""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_kernel
from experiments.lib import capture
from pbs_jax import PBSConfig, attention, blocks, cost_model, pbs_attention, selection
from pbs_jax.cost_model import (
    AFTER_ESTIMATE,
    AFTER_PLAN,
    AT_TRACE,
    CallShape,
    CardCosts,
    KernelFit,
    LengthCosts,
)
from pbs_jax.permutation import identity_permutation
from tests.conftest import make_qkv


def toy_table(sparsity_gain=2.0, mosaic=True) -> CardCosts:
    """Two lengths a factor 4 apart: cuDNN ∝ N² (1 → 16 ms), the kernel ∝ N² too, the estimate
    and the plan ∝ N (1 → 4, 3 → 12 ms)."""
    return CardCosts(
        device_kind="toy",
        source="by hand",
        sparsity_gain=sparsity_gain,
        lengths=(
            LengthCosts(
                1000, 10.0, KernelFit(2.0, 20.0), KernelFit(1.0, 10.0) if mosaic else None, 1.0, 3.0
            ),
            LengthCosts(
                4000,
                160.0,
                KernelFit(32.0, 320.0),
                KernelFit(16.0, 160.0) if mosaic else None,
                4.0,
                12.0,
            ),
        ),
    )


def test_fit_kernel_by_hand():
    # Points on 1 + 2·d: the line itself; the extra fixed cost (a copy) is added.
    points = [(1.0, 3.0), (0.4, 1.8), (0.2, 1.4), (0.1, 1.2)]
    assert cost_model.fit_kernel(points) == KernelFit(1.0, 2.0)
    assert cost_model.fit_kernel(points, 0.25) == KernelFit(1.25, 2.0)
    # 2·d - 0.5 would be negative at low density: refitted through (0, 1e-4),
    # slope = Σ d (ms - 1e-4) / Σ d² = (0.5·0.4999 + 1.4999) / 1.25 = 1.39988.
    assert cost_model.fit_kernel([(0.5, 0.5), (1.0, 1.5)]) == KernelFit(0.0001, 1.3999)
    assert KernelFit(1.0, 2.0).ms(0.25) == 1.5


def test_op_costs_interpolate_in_log_n_and_scale_with_the_shape():
    table = toy_table()
    at_1000 = cost_model.op_costs(table, 1000)
    assert at_1000 == cost_model.OpCosts(10.0, KernelFit(1.0, 10.0), 1.0, 3.0)
    # 2000 is halfway in log N: quantities ∝ N² are 4× those at 1000, those ∝ N 2×.
    mid = cost_model.op_costs(table, 2000)
    assert mid.cudnn_ms == pytest.approx(40.0)
    assert mid.kernel.fixed_ms == pytest.approx(4.0)
    assert mid.kernel.per_density_ms == pytest.approx(40.0)
    assert (mid.estimate_ms, mid.plan_ms) == pytest.approx((2.0, 6.0))
    # Beyond the table the end segment's power law; below it the plan is held (fixed costs).
    assert cost_model.op_costs(table, 8000).cudnn_ms == pytest.approx(640.0)
    assert cost_model.op_costs(table, 8000).plan_ms == pytest.approx(24.0)
    low = cost_model.op_costs(table, 500)
    assert low.cudnn_ms == pytest.approx(2.5)
    assert (low.estimate_ms, low.plan_ms) == (1.0, 3.0)
    # B·Hq = 2·16 is the measured 1·32, and a head dim below the measured 128 costs as 128:
    # attention and the plan (∝ B·Hq) stay; 8 heads of D 256 are a quarter of the heads, each
    # twice the work: attention halves, the plan is a quarter.
    scaled = cost_model.op_costs(table, 1000, CallShape(batch=2, q_heads=16, head_dim=64))
    assert scaled == cost_model.OpCosts(10.0, KernelFit(1.0, 10.0), 1.0, 3.0)
    wide = cost_model.op_costs(table, 1000, CallShape(batch=1, q_heads=8, head_dim=256))
    assert wide == cost_model.OpCosts(5.0, KernelFit(0.5, 5.0), 0.25, 0.75)
    # The Triton fit where the Mosaic kernel does not run, or was not measured.
    triton = KernelFit(2.0, 20.0)
    assert cost_model.op_costs(table, 1000, mosaic=False).kernel == triton
    assert cost_model.op_costs(toy_table(mosaic=False), 1000).kernel == triton


def test_choose_at_the_three_points_by_hand():
    """At N=1000: cuDNN 10, kernel 1 + 10·d, estimate 1, plan 3 (ms)."""
    table = toy_table()

    def choose(density, stage):
        return cost_model.choose(table, 1000, density, stage=stage)

    # d = 0.5: kernel 6. After the plan 6 < 10; plan still to pay 9 < 10; both 10, not < 10.
    assert choose(0.5, AFTER_PLAN) and choose(0.5, AFTER_ESTIMATE)
    assert not choose(0.5, AT_TRACE)
    # d = 0.8: kernel 9 beats cuDNN once the plan is spent (sunk), not before.
    assert choose(0.8, AFTER_PLAN) and not choose(0.8, AFTER_ESTIMATE)
    assert not choose(0.95, AFTER_PLAN)  # 10.5
    # Traced densities give the same answer, on device.
    traced = jax.jit(lambda d: cost_model.choose(table, 1000, d, stage=AFTER_PLAN))
    assert bool(traced(jnp.float32(0.8))) and not bool(traced(jnp.float32(0.95)))
    with pytest.raises(ValueError, match="stage"):
        cost_model.choose(table, 1000, 0.5, stage="later")


def densest_table(ratios, mosaic=True) -> CardCosts:
    """:func:`toy_table` with the densest op's ratios (paper rule, default rule) per length: a
    pair, one number for both, or None (not measured)."""
    table = toy_table(mosaic=mosaic)
    pairs = [r if r is None or isinstance(r, tuple) else (r, r) for r in ratios]
    lengths = tuple(
        dataclasses.replace(c, densest_op_ratios=r) for c, r in zip(table.lengths, pairs)
    )
    return dataclasses.replace(table, lengths=lengths)


def test_sparse_always_pays_by_hand():
    """Sure where the densest op is within 3% of cuDNN at both measured lengths around N, or at
    the last measured one for N beyond it; never below the first; on the measured kernel."""
    paper = PBSConfig.paper()
    table = densest_table((1.0, 1.1))  # sure at 1000 only
    assert cost_model.sparse_always_pays(table, 1000, paper)
    assert not cost_model.sparse_always_pays(table, 2000, paper)  # no interpolation
    assert not cost_model.sparse_always_pays(table, 4000, paper)
    assert not cost_model.sparse_always_pays(table, 16000, paper)
    table = densest_table((1.1, 1.03))  # sure at 4000 and beyond only
    assert not cost_model.sparse_always_pays(table, 2000, paper)
    assert cost_model.sparse_always_pays(table, 4000, paper)
    assert cost_model.sparse_always_pays(table, 16000, paper)
    table = densest_table((1.0, 0.9))  # sure everywhere from 1000
    assert cost_model.sparse_always_pays(table, 2000, paper)
    assert cost_model.sparse_always_pays(table, 16000, paper)
    assert not cost_model.sparse_always_pays(table, 500, paper)
    # Not measured at a length (below the first measured), or measured on Mosaic but asked for
    # Triton (or the reverse).
    assert not cost_model.sparse_always_pays(densest_table((None, 0.5)), 1000, paper)
    assert cost_model.sparse_always_pays(densest_table((None, 0.5)), 4000, paper)
    assert not cost_model.sparse_always_pays(table, 1000, paper, mosaic=False)
    assert not cost_model.sparse_always_pays(densest_table((0.5, 0.5), False), 1000, paper)
    assert cost_model.sparse_always_pays(densest_table((0.5, 0.5), False), 1000, paper, False)


def test_densest_ratio_per_rule_by_hand():
    """Each rule is bounded by the measured rules that cover it (no denser, no more to plan, the
    same grid), the least of them; none covers a denser or costlier rule, or another grid."""
    costs = densest_table(((0.95, 1.10), None)).lengths[0]
    assert cost_model.densest_ratio(costs, PBSConfig.paper()) == 0.95
    assert cost_model.densest_ratio(costs, PBSConfig()) == 1.10  # the paper's does not cover it
    # Covered by both (threshold <= 0.88, one proxy block, no dense tail): the least.
    assert cost_model.densest_ratio(costs, PBSConfig.paper(threshold=0.8)) == 0.95
    # Covered by the default only (a dense tail), by neither (threshold 0.9 with 4 proxy blocks).
    assert cost_model.densest_ratio(costs, PBSConfig(threshold=0.85, dense_tail=64)) == 1.10
    for cfg in (
        PBSConfig(threshold=0.9),
        PBSConfig(threshold=0.95),
        PBSConfig(proxy_blocks=8),
        PBSConfig(dense_tail=256),
        PBSConfig(block_size=64),
        PBSConfig(selector="antidiagonal"),
        PBSConfig(permute=False),
    ):
        assert cost_model.densest_ratio(costs, cfg) is None, cfg
    assert cost_model.densest_ratio(densest_table((None, 1.0)).lengths[0], PBSConfig()) is None
    # At the table's level: the paper rule is sure at 1000, the default is not.
    table = densest_table(((0.95, 1.10), (0.9, 0.9)))
    assert cost_model.sparse_always_pays(table, 1000, PBSConfig.paper())
    assert not cost_model.sparse_always_pays(table, 1000, PBSConfig())
    assert not cost_model.sparse_always_pays(table, 1000, PBSConfig(threshold=0.9))


def test_predicted_density_by_hand():
    table = toy_table(sparsity_gain=2.0)
    # 1 - 2·(1 - 0.9) = 0.8; a low estimate is held at the floor.
    assert float(cost_model.predicted_density(table, 0.9, 0.1)) == pytest.approx(0.8)
    assert float(cost_model.predicted_density(table, 0.3, 0.1)) == pytest.approx(0.1)


def test_floor_density_by_hand():
    # N = 1024: T = 8, 36 causal blocks; segments of 2 blocks: 4 × 3 own-segment causal blocks,
    # plus the sink for the 6 query blocks after the first segment → 18 / 36.
    assert cost_model.floor_density(1024, PBSConfig.paper()) == 0.5
    # A dense last block row adds its earlier-segment blocks but the sink's: 5 more → 23 / 36.
    assert cost_model.floor_density(1024, PBSConfig(threshold=0.9)) == pytest.approx(23 / 36)
    # Under jit too (a Python float at trace time).
    assert jax.jit(lambda: jnp.float32(cost_model.floor_density(1024, PBSConfig.paper())))() == 0.5


def test_estimate_is_the_meanpool_baseline_density():
    """The estimate is the unpermuted MeanPooling rule (one key pooling per KV head), exactly."""
    cfg = PBSConfig(threshold=0.8)
    q, k, _ = make_qkv(1, 1, 768, 4, 2, 16)
    baseline = dataclasses.replace(cfg, permute=False)
    select = jax.jit(selection.select_blocks, static_argnums=3)
    mask = select(q, k, identity_permutation(1, 4, 768), baseline)
    want = float(jnp.mean(blocks.density(mask)))
    got = float(jax.jit(cost_model.estimate_density, static_argnums=2)(q, k, cfg))
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.0 < got < 1.0


def test_estimate_takes_pooled_queries_and_ragged_rows():
    """Given the pooled queries (auto shares them with its plan) the estimate is the same
    number; with ``lengths`` it is the mean of each row's estimate on that row alone."""
    cfg = PBSConfig(threshold=0.8)
    q, k, _ = make_qkv(3, 2, 768, 4, 2, 16)
    estimate = jax.jit(cost_model.estimate_density, static_argnums=2)
    whole = float(estimate(q, k, cfg))
    pooled_q = selection.mean_pool_blocks(q, cfg.block_size)
    assert float(estimate(q, k, cfg, None, pooled_q)) == pytest.approx(whole, abs=1e-7)
    lengths = (768, 500)
    rows = [float(estimate(q[i : i + 1, :n], k[i : i + 1, :n], cfg)) for i, n in enumerate(lengths)]
    assert rows[0] != pytest.approx(rows[1])  # the rows differ, so the mean is not vacuous
    ragged = float(estimate(q, k, cfg, jnp.asarray(lengths, jnp.int32)))
    assert ragged == pytest.approx(np.mean(rows), abs=1e-6)


def test_card_costs_and_table_checks():
    assert cost_model.card_costs("NVIDIA H100 80GB HBM3") is cost_model.H100
    assert cost_model.card_costs("a card never measured") is cost_model.FALLBACK
    one = toy_table().lengths[:1]
    with pytest.raises(ValueError, match="2 ascending lengths"):
        dataclasses.replace(toy_table(), lengths=one)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's auto path")
def test_auto_on_cpu_is_the_reference():
    cfg = PBSConfig(threshold=0.8)
    q, k, v = make_qkv(2, 1, 768, 2, 1, 16)
    out, aux = pbs_attention(q, k, v, cfg, impl="auto", return_aux=True)
    ref, ref_aux = pbs_attention(q, k, v, cfg, impl="reference", return_aux=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(aux.block_mask), np.asarray(ref_aux.block_mask))
    assert bool(aux.sparse)


def test_auto_gpu_path_traces():
    """The GPU branch of auto (estimate, then plan and kernel or cuDNN under lax.cond) traces on
    CPU with consistent branch outputs (it cannot run the GPU choice here)."""
    cfg = PBSConfig(threshold=0.8)
    q = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
    out, perm, mask, dens, sparse = jax.eval_shape(
        lambda q, k, v: attention._auto_on_gpu(q, k, v, cfg), q, kv, kv
    )
    assert out.shape == (1, 1024, 4, 64) and out.dtype == jnp.bfloat16
    assert perm.shape == (1, 4, 1024) and mask.shape == (1, 4, 8, 8)
    assert dens.shape == () and sparse.dtype == jnp.bool_
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)  # a ragged batch takes the same branches
    out, *_ = jax.eval_shape(
        lambda q, k, v, n: attention._auto_on_gpu(q, k, v, cfg, n), q, kv, kv, lengths
    )
    assert out.shape == (1, 1024, 4, 64)


def test_auto_skips_the_estimate_where_sparse_always_pays(monkeypatch):
    """On GPU (stood in for here), impl="auto" with a table whose densest op is within noise of
    cuDNN traces plan + kernel with no estimate and no lax.cond (no on-device choice, no host
    round trip); with a table that is not sure it keeps its conditionals."""
    q = jax.ShapeDtypeStruct((1, 2048, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2048, 2, 64), jnp.bfloat16)
    shape = CallShape(batch=1, q_heads=4, head_dim=64)
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    # cuDNN cannot be traced without a GPU: a stand-in of its shape for the dense branches.
    monkeypatch.setattr(attention, "_dense", lambda q, k, v, impl, lengths=None: jnp.zeros_like(q))

    def primitives(ratios, queries=q):
        table = densest_table(ratios)
        monkeypatch.setattr(attention, "_auto_costs", lambda q, cfg: (table, shape, True))
        jaxpr = jax.make_jaxpr(
            lambda q, k, v: attention._pbs_forward(q, k, v, PBSConfig.paper(), "auto", True)
        )(queries, kv, kv)
        return _primitive_counts(jaxpr.jaxpr)

    sure, unsure = primitives((1.0, 1.0)), primitives((1.2, 1.2))
    assert sure["cond"] == 0 and unsure["cond"] == 1  # one on-device choice
    assert sure["pallas_call"] > 0  # the kernel path, not the dense stand-in
    # A chunk (M < N) is never sure: its plan weighs more against its attention.
    chunk = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    assert primitives((1.0, 1.0), chunk)["cond"] == 1


# Primitives that only structure a program (calls, control flow, derivative rules): the op's own
# choices are found inside them. Kernels are not looked into: a kernel body's ``pl.when`` is a
# ``cond`` on the device, not a choice of the op (pallas_call on Triton, its own primitive on
# Mosaic GPU).
_STRUCTURE = {
    "jit", "pjit", "closed_call", "core_call", "cond", "while", "scan", "remat", "checkpoint",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map",
}  # fmt: skip


def _primitive_counts(jaxpr) -> collections.Counter:
    """Equations per primitive in a jaxpr and the jaxprs nested in its structuring primitives
    (:data:`_STRUCTURE`), never inside a kernel."""
    counts = collections.Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        if eqn.primitive.name not in _STRUCTURE:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's, or a Jaxpr
                if hasattr(inner, "eqns"):
                    counts += _primitive_counts(inner)
    return counts


# ---- experiments: the bench's cost table, the capture file -------------------------------------


def bench_row(n, scale):
    """A bench row on 1 + 2·d (× scale) at every measured density, with its stages."""
    row = {"n": n, "cudnn_ms": 4.0 * scale}
    for d in (100, 40, 20, 10):
        row[f"kernel_d{d}"] = {"density": d / 100, "ms": scale * (1 + 2 * d / 100)}
        row[f"mgpu_d{d}"] = {"density": d / 100, "ms": scale * (0.5 + d / 100)}
    row["stages"] = {"estimate_ms": 0.1, "plan_ms": 0.5, "kv_copy_ms": 0.05}
    row["densest"] = {"ratios": {"paper": 0.9 * scale, "default": scale}}
    row["families"] = {
        "a": {"density": 0.6, "estimate_density": 0.8},  # left out 0.4 / 0.2 → 2
        "b": {"density": 0.9, "estimate_density": 0.9},  # → 1
        "c": {"density": 0.5, "estimate_density": 0.99},  # estimate leaves out < 2%: ignored
    }
    return row


def test_bench_cost_table_and_its_literal():
    payload = {
        "stamp": {"device": "Toy GPU", "jax": "0", "date": "today"},
        "shape": {"heads": 32, "kv_heads": 8, "dim": 128},
        "rows": [bench_row(4096, 1.0), bench_row(8192, 4.0)],
    }
    table = bench_kernel.cost_table(payload)
    assert table.sparsity_gain == 1.5  # the median of 2 and 1, over both lengths
    first = table.lengths[0]
    assert first.triton == KernelFit(1.0, 2.0)
    assert first.mosaic == KernelFit(0.55, 1.0)  # the K/V copy in the fixed cost
    assert (first.cudnn_ms, first.estimate_ms, first.plan_ms) == (4.0, 0.1, 0.5)
    assert [c.densest_op_ratios for c in table.lengths] == [(0.9, 1.0), (3.6, 4.0)]
    # A profiled run's GPU times stand for the estimate and the plan.
    profiled = bench_row(4096, 1.0)
    profiled["stages"].update(estimate_gpu_ms=0.04, plan_gpu_ms=0.12)
    gpu = bench_kernel.cost_table({**payload, "rows": [profiled, bench_row(8192, 4.0)]})
    assert (gpu.lengths[0].estimate_ms, gpu.lengths[0].plan_ms) == (0.04, 0.12)
    literal = bench_kernel.cost_table_literal(table, "TOY")
    names = {"CardCosts": CardCosts, "LengthCosts": LengthCosts, "KernelFit": KernelFit}
    names["CallShape"] = CallShape
    exec(literal, names)
    assert names["TOY"] == table
    assert bench_kernel.cost_table({**payload, "rows": payload["rows"][:1]}) is None


def test_capture_layers_and_file_round_trip(tmp_path):
    assert capture.spread_layers(30, 4) == (0, 10, 19, 29)
    assert capture.spread_layers(2, 4) == (0, 1)
    x = np.asarray(jnp.linspace(-3, 3, 2 * 8 * 3 * 4, dtype=jnp.bfloat16)).reshape(2, 8, 3, 4)
    captured = {"q": x, "k": x[:, :, :1], "v": -x[:, :, :1]}
    capture.save(tmp_path / "c.npz", captured, layers=(0, 5), text="toy")
    (q, k, v), meta = capture.load(tmp_path / "c.npz")
    assert q.dtype == jnp.bfloat16 and math.prod(k.shape) == 2 * 8 * 4
    np.testing.assert_array_equal(np.asarray(v, np.float32), -np.asarray(x[:, :, :1], np.float32))
    assert meta == {"layers": "(0, 5)", "text": "toy"}
