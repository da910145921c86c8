"""The Flax NNX building blocks of a Llama decoder layer: ``RMSNorm``, ``Attention`` (GQA
with RoPE; prefill through the chosen attention spec, chunked prefill and decode through the
``KVCache``), ``MLP`` (SwiGLU) and ``DecoderLayer`` (pre-norm residual block).

Conventions (the Hugging Face ones, so checkpoints map one to one): RoPE in the rotate-half
layout (``models.rope``); Linear kernels stored ``[in, out]`` (``nnx.Linear``), built from
``LlamaConfig.layer_linears``.

Shapes: B batch, T tokens, S cache length, Hq / Hkv query / key-value heads, D head_dim,
d d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention_spec import attend
from models.cache import KVCache
from models.config import LlamaConfig
from models.rope import apply_rope, rope_inverse_frequencies

__all__ = ["MLP", "Attention", "DecoderLayer", "RMSNorm"]


def _linear(config: LlamaConfig, name: str, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """The layer's ``name`` matmul as ``config.layer_linears`` enumerates it."""
    shape = config.layer_linears[name]
    return nnx.Linear(
        shape.n_in, shape.n_out, use_bias=shape.bias, dtype=dtype, param_dtype=dtype, rngs=rngs
    )


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, statistics in float32 (HF LlamaRMSNorm rounding order)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention with RoPE; the prefill attention kernel is chosen per call."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        self.q_proj = _linear(config, "q_proj", dtype, rngs)
        self.k_proj = _linear(config, "k_proj", dtype, rngs)
        self.v_proj = _linear(config, "v_proj", dtype, rngs)
        self.o_proj = _linear(config, "o_proj", dtype, rngs)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """x [B,T,d], positions [T] -> q [B,T,Hq,D], k/v [B,T,Hkv,D]; q and k rotated."""
        c = self.config
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inverse_frequencies(c)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def _output(self, out: jax.Array) -> jax.Array:
        batch, length = out.shape[:2]
        return self.o_proj(out.reshape(batch, length, -1))

    def __call__(self, x, positions, attention, lengths=None):
        """Prefill: x [B,T,d] -> (out [B,T,d], (k, v) [B,T,Hkv,D], density scalar); lengths
        [B] for a right-padded batch (``attend``)."""
        q, k, v = self._qkv(x, positions)
        out, density = attend(q, k, v, attention, lengths)
        return self._output(out), (k, v), density

    def prefill_chunk(self, x, start: int, attention, cache: KVCache, layer_index):
        """A chunk of a chunked prefill: x [B,C,d] at positions start … end-1 (static ints).

        Writes the chunk's k/v into the cache at [layer, :, start:end], then its queries attend
        (the spec's op, the queries being the last C of ``end`` positions) to the cache's keys
        0 … end-1 -> (out [B,C,d], cache, density).
        """
        end = start + x.shape[1]
        q, k, v = self._qkv(x, jnp.arange(start, end, dtype=jnp.int32))
        cache = cache.write(layer_index, k, v, start)
        b, _, hkv, d = k.shape
        visible = (1, b, end, hkv, d)  # this layer's keys 0 … end-1
        layer_keys = jax.lax.dynamic_slice(cache.keys, (layer_index, 0, 0, 0, 0), visible)[0]
        layer_values = jax.lax.dynamic_slice(cache.values, (layer_index, 0, 0, 0, 0), visible)[0]
        out, density = attend(q, layer_keys, layer_values, attention)
        return self._output(out), cache, density

    def decode(self, x, position, cache: KVCache, layer_index):
        """One token: x [B,1,d] at scalar position -> (out [B,1,d], cache with it written).

        Writes only this token's k/v (at [layer, :, position]) so the step costs O(S) reads
        and O(1) writes per layer, then attends densely to slots <= position. A position [B]
        (rows of a ragged batch, each at its own position): :meth:`decode_per_row`.
        """
        if jnp.ndim(position) == 1:
            return self.decode_per_row(x, position, cache, layer_index)
        q, k, v = self._qkv(x, jnp.reshape(position, (1,)))
        cache = cache.write(layer_index, k, v, position)
        return self._attend_cache(q, cache, layer_index, position), cache

    def decode_per_row(self, x, positions, cache: KVCache, layer_index):
        """One token per row at its own position: x [B,1,d], positions [B] int32 -> (out
        [B,1,d], cache with row b's k/v written at slot positions[b]); row b attends densely to
        its slots <= positions[b]."""
        # The B tokens as one sequence of length B: RoPE rotates each by its own position.
        q, k, v = (y.swapaxes(0, 1) for y in self._qkv(x.swapaxes(0, 1), positions))
        cache = cache.write(layer_index, k, v, positions)
        return self._attend_cache(q, cache, layer_index, positions), cache

    def _attend_cache(self, q, cache: KVCache, layer_index, position) -> jax.Array:
        """Decode attention, dense: q [B,1,Hq,D] to this layer's cache slots <= position (a
        scalar, or [B] one per row) -> out [B,1,d]."""
        visible = jnp.arange(cache.max_len) <= jnp.reshape(position, (-1, 1))  # [1 or B, S]
        out = jax.nn.dot_product_attention(
            q,
            cache.keys[layer_index],
            cache.values[layer_index],
            mask=visible[:, None, None, :],
            implementation="xla",
        )
        return self._output(out)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(config, "gate_proj", dtype, rngs)
        self.up_proj = _linear(config, "up_proj", dtype, rngs)
        self.down_proj = _linear(config, "down_proj", dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config.rms_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.mlp_chunk = config.mlp_chunk

    def _mlp_residual(self, h: jax.Array) -> jax.Array:
        """h [B,T,d] -> h + mlp(norm(h)), over chunks of ``mlp_chunk`` tokens when T is longer
        (the MLP is position-wise, so chunking changes nothing but peak memory)."""
        b, t, d = h.shape
        if t <= self.mlp_chunk:
            return h + self.mlp(self.mlp_norm(h))
        chunks = -(-t // self.mlp_chunk)
        padded = jnp.pad(h, ((0, 0), (0, chunks * self.mlp_chunk - t), (0, 0)))
        padded = padded.reshape(b, chunks, self.mlp_chunk, d).swapaxes(0, 1)
        out = jax.lax.map(lambda x: x + self.mlp(self.mlp_norm(x)), padded)
        return out.swapaxes(0, 1).reshape(b, chunks * self.mlp_chunk, d)[:, :t]

    def __call__(self, x, positions, attention, lengths=None):
        attn_out, kv, density = self.attn(self.attn_norm(x), positions, attention, lengths)
        return self._mlp_residual(x + attn_out), kv, density

    def decode(self, x, position, cache, layer_index):
        attn_out, cache = self.attn.decode(self.attn_norm(x), position, cache, layer_index)
        return self._mlp_residual(x + attn_out), cache

    def prefill_chunk(self, x, start, attention, cache, layer_index):
        attn_out, cache, density = self.attn.prefill_chunk(
            self.attn_norm(x), start, attention, cache, layer_index
        )
        return self._mlp_residual(x + attn_out), cache, density
