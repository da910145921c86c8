"""One decoder layer of the model as the prefill runs it, and cheap variants of it timed beside it
by ``experiments.profile_layer``: q/k/v as one matmul, gate/up as one matmul (the layer's own
weights concatenated: a measurement, not a model change), other MLP chunk sizes, XLA's Triton
GEMMs off.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import FULL_ATTENTION
from models.layers import MLP, Attention, DecoderLayer


class Columns(nnx.Module):
    """Columns [start, stop) of its input's last axis: one projection's share of the output of
    a fused matmul, in the projection's place."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, y: jax.Array) -> jax.Array:
        return y[..., self.start : self.stop]


def concatenated_linear(*linears: nnx.Linear) -> nnx.Linear:
    """One ``nnx.Linear`` computing ``linears`` side by side: kernel [n_in, Σ n_out] (and bias)
    their columns concatenated, so its output's columns are theirs in order."""
    first = linears[0]
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
    bias = jnp.concatenate([lin.bias[...] for lin in linears]) if first.use_bias else None
    return nnx.Linear(
        *kernel.shape,
        use_bias=first.use_bias,
        dtype=first.dtype,
        param_dtype=first.param_dtype,
        kernel_init=lambda *_: kernel,
        bias_init=lambda *_: bias,
        rngs=nnx.Rngs(0),
    )


def column_slices(widths) -> list[Columns]:
    """Consecutive ``Columns`` of the given widths."""
    starts = [sum(widths[:i]) for i in range(len(widths) + 1)]
    return [Columns(a, b) for a, b in zip(starts, starts[1:], strict=False)]


class FusedQKVAttention(Attention):
    """``Attention`` with q/k/v as one matmul, x @ [Wq | Wk | Wv] (the given layer's weights),
    then ``Attention._qkv`` itself (reshape, RoPE) with column slices for projections."""

    def __init__(self, attn: Attention):
        self.config = attn.config
        names = ("q_proj", "k_proj", "v_proj")
        self.qkv_proj = concatenated_linear(*(getattr(attn, name) for name in names))
        widths = [attn.config.layer_linears[name].n_out for name in names]
        self.q_proj, self.k_proj, self.v_proj = column_slices(widths)
        self.o_proj = attn.o_proj

    def _qkv(self, x, positions):
        return super()._qkv(self.qkv_proj(x), positions)


class FusedGateUpMLP(MLP):
    """``MLP`` with gate/up as one matmul, x @ [Wgate | Wup], then ``MLP.__call__`` itself with
    column slices for the two projections."""

    def __init__(self, mlp: MLP):
        self.gate_up_proj = concatenated_linear(mlp.gate_proj, mlp.up_proj)
        self.gate_proj, self.up_proj = column_slices([mlp.gate_proj.out_features] * 2)
        self.down_proj = mlp.down_proj

    def __call__(self, x):
        return super().__call__(self.gate_up_proj(x))


def fuse_qkv(layer: DecoderLayer) -> None:
    layer.attn = FusedQKVAttention(layer.attn)


def fuse_gate_up(layer: DecoderLayer) -> None:
    layer.mlp = FusedGateUpMLP(layer.mlp)


def mlp_chunk_of(tokens: int):
    """The change that runs the layer's MLP over chunks of ``tokens`` (``DecoderLayer``'s)."""

    def set_chunk(layer: DecoderLayer) -> None:
        layer.mlp_chunk = tokens

    return set_chunk


class Variant(NamedTuple):
    """A variant of the layer: ``changes`` (functions of the merged layer) applied once to its
    weights, or inside each call when ``per_call``; compiled with XLA ``compiler_options``."""

    changes: tuple = ()
    per_call: bool = False
    compiler_options: dict | None = None


# XLA autotunes each dot between cuBLAS and its own Triton GEMMs; this leaves cuBLAS alone.
CUBLAS_ONLY = {"xla_gpu_enable_triton_gemm": False}


def variants(n: int, mlp_chunk: int) -> dict[str, Variant]:
    """The variants timed beside the model's layer, by name. The MLP chunk ones: twice and four
    times the model's chunk and none (the whole prompt), distinct ones only."""
    both = (fuse_qkv, fuse_gate_up)
    out = {
        "model": Variant(),
        "fused q/k/v": Variant((fuse_qkv,)),
        "fused gate/up": Variant((fuse_gate_up,)),
        "fused q/k/v + gate/up": Variant(both),
        "fused q/k/v + gate/up, concatenated per call": Variant(both, per_call=True),
        "model, XLA Triton GEMMs off (cuBLAS only)": Variant(compiler_options=CUBLAS_ONLY),
    }
    for chunk in sorted({min(n, f * mlp_chunk) for f in (2, 4)} | {n}):
        if chunk > mlp_chunk:
            name = "MLP unchunked" if chunk == n else f"MLP chunk {chunk}"
            out[name] = Variant((mlp_chunk_of(chunk),))
    return out


def layer_call(graphdef, changes=(), per_call: bool = False):
    """The layer step of the prefill, jitted: (state, x [1,N,d], positions [N]) -> (hidden
    [1,N,d], (k, v) [1,N,Hkv,D], density); ``changes`` applied to the merged layer inside the
    call when ``per_call`` (else the caller applied them to the state already)."""

    def forward(state, x, positions):
        layer = nnx.merge(graphdef, state)
        for change in changes if per_call else ():
            change(layer)
        return layer(x, positions, FULL_ATTENTION)

    return jax.jit(forward)


def variant_call(call, graphdef, state, variant: Variant, *args):
    """(compiled call, its state) of a variant of the layer ``graphdef, state`` whose own call
    is ``call`` (its arguments after the state: ``args``)."""
    if variant.per_call:
        fn, fn_state = layer_call(graphdef, variant.changes, per_call=True), state
    elif variant.changes:
        layer = nnx.merge(graphdef, state)
        for change in variant.changes:
            change(layer)
        variant_graphdef, fn_state = nnx.split(layer)
        fn = layer_call(variant_graphdef)
    else:
        fn, fn_state = call, state
    if variant.compiler_options:
        fn = fn.lower(fn_state, *args).compile(compiler_options=variant.compiler_options)
    return fn, fn_state
