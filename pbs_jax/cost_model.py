"""The measured cost model behind ``impl="auto"``: when the block-sparse path beats cuDNN.

One table per card kind (``jax.devices()[0].device_kind``), measured by
``experiments/bench_kernel.py`` at B=1, Hq=32, Hkv=8, D=128, bf16 (:data:`MEASURED_SHAPE`),
and per measured length N:

- ``cudnn_ms``: cuDNN's dense causal attention;
- the kernel as ``fixed_ms + per_density_ms · density`` (:class:`KernelFit`), least squares over
  the bench's 100/40/20/10 % densities; the Mosaic fit includes the K/V slot-order copy that the
  op makes before that kernel;
- ``estimate_ms``: ``impl="auto"``'s estimate stage (:func:`estimate_density`);
- ``plan_ms``: the rest of the plan (permutation, selection with its index lists);
- ``densest_op_ratios``: the whole sparse op (plan + kernel) at its densest over cuDNN, timed side
  by side, one per rule of :data:`DENSEST_RULES` (the paper's, the default): on random inputs,
  whose flat block scores make the top-p rule keep about as many blocks as it ever can (τ of
  them and the forced ones); None where not measured.
- ``estimate_ms`` and ``plan_ms`` are the GPU time of the stage's kernels (a profile: what the
  stage adds to the op while the host dispatches ahead) where the run profiled them, else the
  wall time of the stage jitted alone (which adds its own dispatch: ~0.1 ms more at 8K).

Between measured lengths every quantity is interpolated linearly in (log N, log ms), i.e. as a
power law; outside them the nearest segment's power law is extended, except that plan costs
below the first length are held at that length's (its fixed launch costs dominate there, so a
power law would promise a plan cheaper than it is). Other shapes are scaled from the measured
one, an assumption rather than a measurement: attention (cuDNN and kernel) ∝ B·Hq·D (its work
is B·Hq·D·N²; the N² is in the table) for head dims from the measured one up, and ∝ B·Hq below
it: a smaller head is not cheaper for cuDNN (H200, 8K tokens: SmolLM2's 2 × 9 heads of D 64 took
0.723 ms, 0.728 by heads alone, half of that by B·Hq·D; results/bench_kernel_tuned_plan.md),
and scaling it down by D made ``impl="auto"`` refuse every plan at trace time for SmolLM2 where
the sparse op was faster (0.605 vs 0.723 ms); the kernel at D 64 took 0.78 of the heads-alone
time, so the rule is conservative for it. The plan and the estimate ∝ B·Hq (their long-N work is
the T×T block scores and top-p of every query head, which do not depend on D; the D-dependent
proxy and pooling are small next to them).

The rule (:func:`choose`): the kernel is worth it when the kernel's time at the density plus
what is still to pay of the planning is below cuDNN's time. ``impl="auto"`` asks it twice, the
second time with less still to pay (what is spent is sunk):

1. ``AT_TRACE`` (static, trace time): at the floor density (:func:`floor_density`, forced blocks
   only), with estimate and plan still to pay. No: dense, and no plan at all.
2. ``AFTER_ESTIMATE`` (on device): at the density predicted from the estimate
   (:func:`predicted_density`), with the plan still to pay. No: dense, the plan skipped; yes:
   plan and kernel.

``AFTER_PLAN`` (nothing left to pay: the kernel at a plan's own density against cuDNN) is the
rule's plain form; ``impl="auto"`` no longer asks it on device. Each on-device choice is a host
round trip (a ``lax.cond`` waits for its predicate: H200, 4K, structured inputs, one choice 0.406
ms, the former two 0.434, the sparse op 0.362, results/explore_auto_conditionals.log; mixed
elsewhere in that log: 4K random 0.571 vs 0.543, 8K structured 0.675 vs 0.674), and a plan denser
than predicted costs little: the kernel at every block, K/V copy included, takes 0.93-1.01× of
cuDNN's time by the H200 fits, 4K to 128K (results/bench_kernel_one_choice.md,
bench_kernel.md).

Before both, at trace time and for a whole prefill, :func:`sparse_always_pays`: where even the
densest plan's sparse op is measured within :data:`SURE_TOLERANCE` of cuDNN, no input can make
sparse lose by more than that, so ``impl="auto"`` plans and runs the kernel with no estimate and no
on-device choice. The estimate and the choice took 88 µs of a 0.59 ms op at 8K (H200, structured
inputs: one choice 0.675 ms vs the sparse op 0.587, results/explore_auto_conditionals.log).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pbs_jax import blocks, selection
from pbs_jax.config import PBSConfig
from pbs_jax.grid import real_block_counts
from pbs_jax.permutation import identity_permutation

AT_TRACE, AFTER_ESTIMATE, AFTER_PLAN = "trace", "estimate", "plan"
STAGES = (AT_TRACE, AFTER_ESTIMATE, AFTER_PLAN)
# A fitted fixed cost is kept at least this (ms): the fit stays positive, so it interpolates
# geometrically.
_MIN_MS = 1e-4


@dataclasses.dataclass(frozen=True)
class CallShape:
    """What attention's cost scales with besides N: batch, query heads, head dim."""

    batch: int
    q_heads: int
    head_dim: int


MEASURED_SHAPE = CallShape(batch=1, q_heads=32, head_dim=128)


@dataclasses.dataclass(frozen=True)
class KernelFit:
    """Kernel time as a line in the block density: ``fixed_ms + per_density_ms · density``."""

    fixed_ms: float
    per_density_ms: float

    def ms(self, density):
        """Time at ``density`` (a float, or a traced scalar)."""
        return self.fixed_ms + self.per_density_ms * density


def fit_kernel(points: Sequence[tuple[float, float]], extra_fixed_ms: float = 0.0) -> KernelFit:
    """Least-squares line through ``(density, ms)`` points, plus ``extra_fixed_ms`` (the copy the
    op makes before the kernel). A negative intercept is refitted through ~0 (a kernel does not
    take negative time at low density)."""
    d = np.array([p[0] for p in points], np.float64)
    ms = np.array([p[1] for p in points], np.float64)
    slope, fixed = np.polyfit(d, ms, 1)
    if fixed < _MIN_MS:
        fixed = _MIN_MS
        slope = float(np.dot(d, ms - fixed) / np.dot(d, d))
    return KernelFit(round(float(fixed) + extra_fixed_ms, 4), round(float(slope), 4))


@dataclasses.dataclass(frozen=True)
class LengthCosts:
    """Measured costs (ms) at one length, at the table's shape. ``mosaic`` is None on cards
    without the Mosaic GPU kernel (the op runs Triton there)."""

    seq_len: int
    cudnn_ms: float
    triton: KernelFit
    mosaic: KernelFit | None
    estimate_ms: float
    plan_ms: float
    densest_op_ratios: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class CardCosts:
    """One card's cost table.

    lengths: ascending, at least two. sparsity_gain: the estimate's calibration (see
    :func:`predicted_density`). source: where and when it was measured.
    """

    device_kind: str
    source: str
    sparsity_gain: float
    lengths: tuple[LengthCosts, ...]
    shape: CallShape = MEASURED_SHAPE

    def __post_init__(self):
        ns = [c.seq_len for c in self.lengths]
        if len(ns) < 2 or ns != sorted(set(ns)):
            raise ValueError(f"a cost table needs >= 2 ascending lengths, got {ns}")


@dataclasses.dataclass(frozen=True)
class OpCosts:
    """The costs (ms) of one call: a length and shape, the kernel the op runs there."""

    cudnn_ms: float
    kernel: KernelFit
    estimate_ms: float
    plan_ms: float


def _log_interp(ns: Sequence[int], values: Sequence[float], n: int, hold_below: bool) -> float:
    """``values`` at lengths ``ns`` (ascending) → the value at ``n``: linear in (log N, log v)
    between the two bracketing lengths, the end segment's power law beyond them (or, with
    ``hold_below``, the first value below the first length)."""
    if hold_below and n <= ns[0]:
        return float(values[0])
    i = int(np.clip(np.searchsorted(ns, n) - 1, 0, len(ns) - 2))
    lo, hi = max(values[i], _MIN_MS), max(values[i + 1], _MIN_MS)
    w = math.log(n / ns[i]) / math.log(ns[i + 1] / ns[i])
    return float(lo * (hi / lo) ** w)


def op_costs(
    table: CardCosts, seq_len: int, shape: CallShape = MEASURED_SHAPE, mosaic: bool = True
) -> OpCosts:
    """The table at ``seq_len``, scaled to ``shape`` (module docstring), for the Mosaic kernel
    (``mosaic`` and measured) or the Triton one."""
    rows = table.lengths
    ns = [c.seq_len for c in rows]
    fits = [c.mosaic if mosaic and c.mosaic is not None else c.triton for c in rows]
    m = table.shape
    head_dim = max(shape.head_dim, m.head_dim)  # smaller heads cost as the measured (docstring)
    attention = (shape.batch * shape.q_heads * head_dim) / (m.batch * m.q_heads * m.head_dim)
    plan = (shape.batch * shape.q_heads) / (m.batch * m.q_heads)

    def at(values, hold_below=False):
        return _log_interp(ns, values, seq_len, hold_below)

    return OpCosts(
        cudnn_ms=attention * at([c.cudnn_ms for c in rows]),
        kernel=KernelFit(
            attention * at([f.fixed_ms for f in fits]),
            attention * at([f.per_density_ms for f in fits]),
        ),
        estimate_ms=plan * at([c.estimate_ms for c in rows], hold_below=True),
        plan_ms=plan * at([c.plan_ms for c in rows], hold_below=True),
    )


def still_to_pay_ms(costs: OpCosts, stage: str) -> float:
    """Planning time not yet spent at ``stage`` (one of :data:`STAGES`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return {
        AT_TRACE: costs.estimate_ms + costs.plan_ms,
        AFTER_ESTIMATE: costs.plan_ms,
        AFTER_PLAN: 0.0,
    }[stage]


def choose(
    table: CardCosts,
    seq_len: int,
    density,
    *,
    stage: str = AFTER_PLAN,
    shape: CallShape = MEASURED_SHAPE,
    mosaic: bool = True,
):
    """Whether the kernel path beats cuDNN: kernel(density) + planning still to pay < cuDNN.

    ``density``: a float (then a Python bool comes back) or a traced scalar (a traced bool: the
    choice stays on device). What is already spent is sunk and does not count.
    """
    costs = op_costs(table, seq_len, shape, mosaic)
    return costs.kernel.ms(density) + still_to_pay_ms(costs, stage) < costs.cudnn_ms


# impl="auto" skips its estimate where the sparse op at its densest is at most this much slower
# than cuDNN: the "never slower than dense by more than noise" (0.97 of the faster).
SURE_TOLERANCE = 0.03
# The rules the densest op is measured with (name → rule, the order of densest_op_ratios).
DENSEST_RULES = {"paper": PBSConfig.paper(), "default": PBSConfig()}


def densest_ratio(costs: LengthCosts, cfg: PBSConfig) -> float | None:
    """The densest op's ratio to cuDNN that bounds ``cfg``'s at one length: the least of the
    measured rules that cover it (the same grid and selector, a threshold, proxy and dense tail
    no larger: no denser a plan, no more to plan); None where none covers it or not measured."""
    if costs.densest_op_ratios is None:
        return None
    covering = [
        ratio
        for rule, ratio in zip(DENSEST_RULES.values(), costs.densest_op_ratios)
        if all(
            getattr(cfg, f) == getattr(rule, f)
            for f in ("block_size", "segment_size", "selector", "permute")
        )
        and cfg.threshold <= rule.threshold
        and cfg.proxy_blocks <= rule.proxy_blocks
        and cfg.dense_tail <= rule.dense_tail
    ]
    return min(covering, default=None)


def sparse_always_pays(table: CardCosts, seq_len: int, cfg: PBSConfig, mosaic: bool = True) -> bool:
    """Trace time: whether the sparse op at its densest (:func:`densest_ratio`) is within
    :data:`SURE_TOLERANCE` of cuDNN at ``seq_len``: then no input makes the kernel path lose by
    more than noise, and ``impl="auto"`` takes it without estimating.

    At a measured length, its own answer; between two, only when both are sure (no
    interpolation: a ratio near the tolerance is noise, not a trend); beyond the last measured
    length, the last one's (the plan's share only shrinks with N, the kernel's ratio to cuDNN at a
    density does not grow: an extrapolation, stated); never below the first. The ratio is taken
    as the table's at any shape (attention and the densest op scale alike), on the kernel the
    table measured (Mosaic where it has Mosaic fits)."""
    measured = [(c, densest_ratio(c, cfg)) for c in table.lengths]
    rows = [(c, ratio) for c, ratio in measured if ratio is not None]
    if not rows or mosaic != all(c.mosaic is not None for c, _ in rows):
        return False
    sure = {c.seq_len: ratio <= 1.0 + SURE_TOLERANCE for c, ratio in rows}
    ns = sorted(sure)
    if seq_len in sure:
        return sure[seq_len]
    if seq_len > ns[-1]:
        return sure[ns[-1]]
    above = next(i for i, n in enumerate(ns) if n > seq_len)
    return above > 0 and sure[ns[above - 1]] and sure[ns[above]]


@functools.lru_cache(maxsize=64)
def floor_density(seq_len: int, cfg: PBSConfig) -> float:
    """The least density any plan can have: the forced blocks alone (own segment, sink, dense
    tail), from the static block grid (a Python float, also under jit)."""
    with jax.ensure_compile_time_eval():  # concrete even while the op is being traced
        return float(_forced_density(seq_len, cfg))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forced_density(seq_len: int, cfg: PBSConfig) -> jax.Array:
    # One compiled call: op by op, each grid op would compile on its own for every new N.
    forced = selection.forced_blocks(identity_permutation(1, 1, seq_len), 1, cfg)
    return blocks.density(forced).reshape(())


def estimate_config(cfg: PBSConfig) -> PBSConfig:
    """The estimate's rule: ``cfg``'s top-p and forced blocks with MeanPooling scores over
    unpermuted keys (the paper's MeanPooling baseline), one key pooling per KV head."""
    return dataclasses.replace(cfg, permute=False, selector="meanpool", gqa="shared")


def estimate_density(
    q: jax.Array,
    k: jax.Array,
    cfg: PBSConfig,
    lengths: jax.Array | None = None,
    pooled_q: jax.Array | None = None,
) -> jax.Array:
    """The cheap stage of ``impl="auto"``: the block density of :func:`estimate_config`'s plan.

    Args:
      q: ``[B, M, Hq, D]`` (the last M ≤ N positions); k: ``[B, N, Hkv, D]``.
      lengths: ``[B]`` int32 (a right-padded batch, M = N) or None: each row's own blocks.
      pooled_q: ``selection.mean_pool_blocks(q, cfg.block_size, lengths)`` where the caller
        holds it (the plan that may follow pools the same queries), else None.
    Returns:
      float32 scalar, averaged over batch and heads (each ragged row over its own blocks). No
      sort of keys and no proxy pass: pooled block logits ``Tq × T`` per head, their causal
      softmax and the same top-p rule.
    """
    est = estimate_config(cfg)
    b, _, hq, _ = q.shape
    n = k.shape[1]
    perm = identity_permutation(b, est.num_perm_heads(hq, k.shape[2]), n)
    mask = selection.select_blocks(q, k, perm, est, lengths, pooled_q=pooled_q)
    row_blocks = None if lengths is None else real_block_counts(lengths, cfg.block_size)
    return jnp.mean(blocks.density(mask, row_blocks))


def predicted_density(table: CardCosts, estimate, floor: float):
    """The PBS density predicted from the estimate: ``max(floor, 1 - gain · (1 - estimate))``.

    A heuristic, calibrated per table: permuting keys gathers the important ones, so the PBS plan
    drops more blocks than MeanPooling over unpermuted keys; ``table.sparsity_gain`` is the
    median ratio of the blocks the two leave out (1 - density), measured by bench_kernel over its
    input families and lengths. It is not a bound: a plan can come out denser or sparser than
    predicted: ``impl="auto"`` then runs the kernel at the plan's density (within a few percent
    of cuDNN at worst; module docstring), or, predicted too dense, forgoes the kernel's gain.
    """
    return jnp.maximum(floor, 1.0 - table.sparsity_gain * (1.0 - estimate))


# ---- the tables -----------------------------------------------------------------------------
# Re-measured by `python -m experiments.bench_kernel` on the card (it prints the literal to paste
# here, and keeps it in its JSON under "cost_table").

H100 = CardCosts(
    device_kind="NVIDIA H100 80GB HBM3",
    # Kernel fits, cuDNN and plan (permutation + selection + lists) from
    # experiments/results/bench_kernel.json (JAX 0.11.2, 2026-11-26). That run timed neither the
    # estimate stage nor the K/V copy: estimate_ms is its selection stage (the same pooled scores
    # and top-p, plus the permuted pooling the estimate skips: an upper bound), and the Mosaic
    # fits leave out the copy. sparsity_gain 1.0 (no gain: predicted = estimate) until measured.
    source="experiments/results/bench_kernel.json (H100, JAX 0.11.2, 2026-11-26)",
    sparsity_gain=1.0,
    lengths=(
        LengthCosts(
            4096, 0.4228, KernelFit(0.1557, 0.4019), KernelFit(0.1158, 0.2828), 0.1633, 0.5382
        ),
        LengthCosts(
            8192, 1.0941, KernelFit(0.2258, 1.4511), KernelFit(0.1983, 0.8186), 0.1775, 0.6314
        ),
        LengthCosts(
            16384, 3.8474, KernelFit(0.3661, 5.2695), KernelFit(0.2657, 3.5101), 0.4253, 1.1673
        ),
        LengthCosts(
            32768, 14.4092, KernelFit(0.5221, 20.5868), KernelFit(0.6113, 13.7032), 0.5195, 1.6845
        ),
        LengthCosts(
            65536, 56.4792, KernelFit(0.8433, 83.0822), KernelFit(1.3557, 55.1022), 1.0927, 3.092
        ),
        LengthCosts(
            131072,
            252.5001,
            KernelFit(0.0001, 334.7773),
            KernelFit(0.4526, 235.6727),
            3.2078,
            7.1829,
        ),
    ),
)

# Measured by experiments/bench_kernel.py on one H200: the table impl="auto" uses on this card.
H200 = CardCosts(
    device_kind="NVIDIA H200",
    source="experiments/bench_kernel.py (NVIDIA H200, JAX 0.11.2, 2026-11-30)",
    # Over the families of 4K-64K in results/bench_kernel_one_choice.md.
    sparsity_gain=0.959,
    lengths=(
        # 4K-64K: results/bench_kernel_one_choice.md (one run per call: 4K-8K, 16K-32K, 64K),
        # the estimate and plan as their kernels' GPU time, the Mosaic fit with the K/V copy's.
        LengthCosts(
            seq_len=4096,
            cudnn_ms=0.5057,
            triton=KernelFit(fixed_ms=0.1442, per_density_ms=0.5607),
            mosaic=KernelFit(fixed_ms=0.2223, per_density_ms=0.2477),
            estimate_ms=0.0242,
            plan_ms=0.0703,
            densest_op_ratios=(1.2362, 1.334),
        ),
        LengthCosts(
            seq_len=8192,
            cudnn_ms=1.2751,
            triton=KernelFit(fixed_ms=0.3333, per_density_ms=1.505),
            mosaic=KernelFit(fixed_ms=0.3014, per_density_ms=0.9518),
            estimate_ms=0.0445,
            plan_ms=0.1195,
            # The median of the four runs that measured the densest op at 8K (paper rule 0.9405,
            # 1.0125, 1.05, 1.0583; default 1.0341, 1.1024, 1.1487, 1.1759: results/
            # bench_kernel_auto, _auto_short, _captured_4layers, _one_choice): cuDNN's own time
            # moved 1.26-1.50 ms between them. Just over the tolerance: auto estimates at 8K.
            densest_op_ratios=(1.0313, 1.1255),
        ),
        LengthCosts(
            seq_len=16384,
            cudnn_ms=4.1318,
            triton=KernelFit(fixed_ms=0.4029, per_density_ms=5.3797),
            mosaic=KernelFit(fixed_ms=0.3739, per_density_ms=3.635),
            estimate_ms=0.1096,
            plan_ms=0.3692,
            densest_op_ratios=(0.9943, 1.0625),
        ),
        LengthCosts(
            seq_len=32768,
            cudnn_ms=15.3959,
            triton=KernelFit(fixed_ms=0.6035, per_density_ms=21.0816),
            mosaic=KernelFit(fixed_ms=0.6595, per_density_ms=14.7773),
            estimate_ms=0.1821,
            plan_ms=0.4518,
            densest_op_ratios=(0.9698, 0.9957),
        ),
        LengthCosts(
            seq_len=65536,
            cudnn_ms=59.0847,
            triton=KernelFit(fixed_ms=0.6797, per_density_ms=84.1531),
            mosaic=KernelFit(fixed_ms=1.6235, per_density_ms=58.0469),
            estimate_ms=0.4143,
            plan_ms=0.9417,
            densest_op_ratios=(0.9348, 0.9369),
        ),
        LengthCosts(
            seq_len=131072,
            cudnn_ms=250.0994,
            triton=KernelFit(fixed_ms=0.0001, per_density_ms=337.0554),
            mosaic=KernelFit(fixed_ms=2.8721, per_density_ms=235.524),
            # cuDNN and the kernel fits: results/bench_kernel.md (an earlier run, not
            # re-measured since). Estimate and plan: their GPU time in
            # results/profile_plan_transposed.md (this planner but the proxy's in-place read, 2 µs
            # at 8K); wall times jitted alone 1.4397 / 2.9477 ms in results/bench_kernel_auto.md,
            # whose densest ops these are.
            estimate_ms=1.0085,
            plan_ms=2.1663,
            densest_op_ratios=(0.86, 0.8494),
        ),
    ),
    shape=CallShape(batch=1, q_heads=32, head_dim=128),
)


# device_kind → table. A card not listed falls back to the H100's (the closest measured card;
# on a slower or faster card the kernel/cuDNN ratios it rests on are usually alike, but the
# plan's share is not: measure the card and add its table).
COST_TABLES: dict[str, CardCosts] = {H100.device_kind: H100, H200.device_kind: H200}
FALLBACK = H100


def card_costs(device_kind: str | None = None) -> CardCosts:
    """The table of ``device_kind`` (default: the first device's), else :data:`FALLBACK`."""
    if device_kind is None:
        device_kind = getattr(jax.devices()[0], "device_kind", "")
    return COST_TABLES.get(device_kind, FALLBACK)
