"""The boundary between the model and the op: what a prefill ``attention`` argument may be, and
the one function (``attend``) that runs it.

An attention spec is a static (hashable) jit argument:

- ``"full"`` (``FULL_ATTENTION``): dense causal attention, ``pbs_jax.dense_attention`` (cuDNN on
  GPU for 16-bit inputs, XLA otherwise), the op's own dense rule;
- a ``pbs_jax.PBSConfig``, or a ``PBSAttention`` naming the ``pbs_attention`` implementation;
- a ``LayerAttention``: one of the above per layer;
- any hashable callable ``(q, k, v) -> (out, statistics)``: a study's own attention.

Shapes: B batch, T tokens, Hq / Hkv query / key-value heads, D head_dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pbs_jax import IMPLS, PBSConfig, dense_attention, pbs_attention
from pbs_jax.grid import causal_block_count, num_blocks

__all__ = [
    "FULL_ATTENTION",
    "AttentionSpec",
    "LayerAttention",
    "PBSAttention",
    "attend",
    "check_chunk_size",
    "resolve_attention",
]

FULL_ATTENTION = "full"


@dataclasses.dataclass(frozen=True)
class PBSAttention:
    """PBS-Attn with an explicit ``pbs_attention`` implementation (one of ``pbs_jax.IMPLS``).

    A bare ``PBSConfig`` passed as ``attention`` means ``PBSAttention(config, impl="auto")``.
    """

    config: PBSConfig
    impl: str = "auto"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"PBSAttention.impl must be one of {IMPLS}, got {self.impl!r}")


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """A different attention spec for some layers: ``overrides`` maps layer index → spec, the
    rest take ``default``. E.g. ``LayerAttention(PBSConfig(), ((0, "full"), (17, "full")))``
    keeps layers 0 and 17 dense (experiments/results/layer_schedule.md measures such schedules
    on SmolLM2).

    Specs are "full", a PBSConfig or a PBSAttention (each returns a scalar density). The layers
    stay under one ``lax.scan``: every distinct spec is compiled once and a ``lax.switch`` on
    the layer index picks it.
    """

    default: Any
    overrides: tuple = ()

    def __post_init__(self):
        for spec in (self.default, *(s for _, s in self.overrides)):
            if isinstance(spec, LayerAttention) or not isinstance(
                resolve_attention(spec), (str, PBSAttention)
            ):
                raise TypeError(
                    f"LayerAttention takes 'full', PBSConfig or PBSAttention specs, got {spec!r}"
                )
        layers = [layer for layer, _ in self.overrides]
        if len(set(layers)) != len(layers) or any(
            not isinstance(layer, int) or layer < 0 for layer in layers
        ):
            raise ValueError(
                f"LayerAttention.overrides needs distinct layer indices >= 0, got {layers}"
            )

    def branches(self, num_layers: int) -> tuple[tuple, np.ndarray]:
        """(distinct resolved specs, [L] int32 index of each layer's spec)."""
        if any(layer >= num_layers for layer, _ in self.overrides):
            raise ValueError(
                f"LayerAttention overrides layers {[l for l, _ in self.overrides]} "
                f"but the model has {num_layers}"
            )
        per_layer = [resolve_attention(self.default)] * num_layers
        for layer, spec in self.overrides:
            per_layer[layer] = resolve_attention(spec)
        specs = tuple(dict.fromkeys(per_layer))
        return specs, np.array([specs.index(s) for s in per_layer], np.int32)


AttentionSpec = str | PBSConfig | PBSAttention | LayerAttention | Callable


def resolve_attention(attention: AttentionSpec) -> str | PBSAttention | LayerAttention | Callable:
    """Normalises an attention spec: a PBSConfig becomes ``PBSAttention(config)``, the other
    valid specs are returned as they are; raises on anything else."""
    if isinstance(attention, str):
        if attention != FULL_ATTENTION:
            raise ValueError(f"attention must be 'full' or a PBSConfig, got {attention!r}")
        return attention
    if isinstance(attention, (PBSAttention, LayerAttention)):
        return attention
    if isinstance(attention, PBSConfig):
        return PBSAttention(attention)
    if callable(attention):
        # Any hashable callable (q, k, v) -> (out, density): a study's own attention (e.g. a
        # benchmark at a fixed block density) plugs in without touching the model.
        return attention
    raise TypeError(
        f"attention must be 'full', a pbs_jax.PBSConfig or a PBSAttention, got {type(attention)}"
    )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attention: str | PBSAttention | Callable,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """Prefill attention by resolved spec: q [B,T,Hq,D], k/v [B,T,Hkv,D] (after RoPE).

    Returns (out [B,T,Hq,D] in q.dtype, density: float32 scalar = computed / causal blocks;
    1.0 for dense). A study's callable may return any pytree of float32 per-layer statistics
    in place of the density (e.g. the layer's q and k); the model stacks it over layers.

    ``lengths [B]`` int32 (a right-padded batch; None: every row holds T): PBS plans each row
    on its real tokens (``pbs_attention(lengths=)``); dense attention needs nothing, causality
    keeps padding out of real rows. A callable then gets ``lengths=`` as a keyword.
    """
    if attention == FULL_ATTENTION:
        return dense_attention(q, k, v), jnp.ones((), jnp.float32)
    # A sparse attention's plan needs only q and k: without the barrier XLA's scheduler may start
    # it before the v projection, keeping the layer input alive through the plan.
    q, k, v = jax.lax.optimization_barrier((q, k, v))
    if not isinstance(attention, PBSAttention):
        out, density = (
            attention(q, k, v) if lengths is None else attention(q, k, v, lengths=lengths)
        )
        return out, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), density)
    out, aux = pbs_attention(
        q, k, v, attention.config, impl=attention.impl, return_aux=True, lengths=lengths
    )
    return out, jnp.asarray(aux.density, jnp.float32)


def _pbs_configs(attention) -> list[PBSConfig]:
    """Every PBSConfig a spec runs: its own, its layers', or (duck-typed) a callable's ``.cfg``
    (e.g. ``experiments.lib.specs.FixedDensityPBS``) or those of the spec it wraps in
    ``.attention`` (e.g. ``models.sharding.HeadParallel``)."""
    if isinstance(attention, PBSConfig):
        return [attention]
    if isinstance(attention, PBSAttention):
        return [attention.config]
    if isinstance(getattr(attention, "cfg", None), PBSConfig):
        return [attention.cfg]
    if isinstance(attention, LayerAttention):
        specs = (attention.default, *(spec for _, spec in attention.overrides))
        return [cfg for spec in specs for cfg in _pbs_configs(spec)]
    inner = getattr(attention, "attention", None)
    return [] if inner is None or inner is attention else _pbs_configs(inner)


def chunk_bounds(length: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """(start, end) of each chunk of a prefill of ``length`` tokens: ``chunk_size`` at a time,
    the last one possibly shorter (None: one chunk, the whole prompt)."""
    step = chunk_size or length
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def chunk_density_weights(bounds: list[tuple[int, int]], attention) -> list[float]:
    """Per chunk, its share of the prompt's causal blocks: the weights that make the chunks'
    densities (computed / causal blocks of their rows) the whole prompt's. Blocks of the spec's
    PBS block size (one size for all its configs); tokens (block 1) when it has none or several
    (dense attention: density 1 whatever the weights)."""
    sizes = {cfg.block_size for cfg in _pbs_configs(attention)}
    block = sizes.pop() if len(sizes) == 1 else 1

    counts = [
        causal_block_count(num_blocks(end, block), num_blocks(start, block))
        for start, end in bounds
    ]
    return [c / sum(counts) for c in counts]


def check_chunk_size(chunk_size, attention) -> None:
    """Raise a clear ``ValueError`` unless ``chunk_size`` can cut a prefill for ``attention``.

    None (one chunk) always can; otherwise a positive int, a multiple of the ``segment_size``
    of every PBSConfig the spec runs: chunks then start on segment boundaries, so every
    segment a chunk completes is sorted by that chunk's proxy and no chunk starts mid-block.
    """
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for cfg in _pbs_configs(attention):
        if chunk_size % cfg.segment_size:
            raise ValueError(
                f"chunk_size ({chunk_size}) must be a multiple of the PBS segment_size "
                f"({cfg.segment_size}): chunks start on segment boundaries"
            )
