"""The attention a study compares: thresholded block-sparse methods (a pbs_jax selector with or
without permutation), the static sink + local window, and a capturing dense attention.

Every entry is a hashable attention spec the model takes (``models.PBSAttention`` or a frozen
callable ``(q, k, v) -> (out, per-layer aux)``), so each compiles once per prefill shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pbs_jax
from models import PBSAttention
from pbs_jax import PBSConfig


@dataclasses.dataclass(frozen=True)
class Method:
    """A thresholded block-sparse method: a pbs_jax selector, with or without permutation."""

    key: str
    label: str
    selector: str
    permute: bool

    def config(self, threshold: float) -> PBSConfig:
        return PBSConfig.paper(threshold=threshold, permute=self.permute, selector=self.selector)


METHODS = (
    Method("pbs", "PBS (mean-pool, permuted)", "meanpool", True),
    Method("meanpool", "MeanPooling (no permutation)", "meanpool", False),
    Method("antidiagonal", "Antidiagonal (XAttention-style)", "antidiagonal", False),
    Method("pbs_plus", "PBS+ (antidiagonal, permuted)", "antidiagonal", True),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}
SINK_LOCAL = "sink_local"
LABELS = {
    **{m.key: m.label for m in METHODS},
    SINK_LOCAL: "Sink + local window",
    "full": "Full attention",
}


@dataclasses.dataclass(frozen=True)
class SinkLocalAttention:
    """Callable attention ``(q, k, v) -> (out, density)``: the static sink + local window.

    q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]``; the block mask is
    :func:`pbs_jax.sink_local_mask` over unpermuted keys, run by the same reference attention.
    """

    window: int
    block_size: int = PBSConfig.block_size

    def __call__(self, q, k, v):
        b, n, hq, _ = q.shape
        mask = pbs_jax.sink_local_mask((b, hq, pbs_jax.num_blocks(n, self.block_size)), self.window)
        perm = pbs_jax.identity_permutation(b, k.shape[2], n)
        out = pbs_jax.permuted_block_sparse_attention(q, k, v, perm, mask, self.block_size)
        return out, jnp.mean(pbs_jax.density(mask))


@dataclasses.dataclass(frozen=True)
class CaptureAttention:
    """Callable attention: dense causal attention (the model's own "full" rule), handing back
    the layer's q ``[B, N, Hq, D]`` and k, v ``[B, N, Hkv, D]`` (the model stacks them over
    layers)."""

    def __call__(self, q, k, v):
        return pbs_jax.dense_attention(q, k, v), {"q": q, "k": k, "v": v}


@dataclasses.dataclass(frozen=True)
class FixedDensityPBS:
    """Callable attention ``(q, k, v) -> (out, density)``: PBS at a fixed block density. The
    real plan is computed (its cost counts), then a random mask of the given density
    (own-segment blocks always in) replaces its block selection; the kernel runs it."""

    density: float
    cfg: PBSConfig = PBSConfig.paper()

    def __call__(self, q, k, v):
        """q ``[B, M, Hq, D]`` (the last M ≤ N positions: a chunk when M < N), k/v ``[B, N,
        Hkv, D]``: the chunk's Tq × T mask at the density of its rows."""
        perm = pbs_jax.pbs_plan(q, k, self.cfg).perm
        t = pbs_jax.num_blocks(k.shape[1], self.cfg.block_size)
        tq = pbs_jax.num_blocks(q.shape[1], self.cfg.block_size)
        mask = pbs_jax.fixed_density_mask(
            jax.random.key(0), (q.shape[0], q.shape[2], t), self.density, self.cfg, t - tq
        )
        lists = pbs_jax.index_lists(mask, self.cfg)
        return pbs_jax.kernel_attention(q, k, v, perm, lists, self.cfg), jnp.mean(
            pbs_jax.density(mask)
        )


def attention_for(method: str, threshold: float | None, window: int):
    """The spec of one sparse prefill: a :data:`METHODS` key at ``threshold`` (reference
    implementation), or :data:`SINK_LOCAL` with ``window`` blocks."""
    if method == SINK_LOCAL:
        return SinkLocalAttention(window)
    return PBSAttention(METHOD_BY_KEY[method].config(threshold), impl="reference")
