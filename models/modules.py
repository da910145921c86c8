"""The Flax NNX Llama modules: ``RMSNorm``, ``Attention``, ``MLP``, ``DecoderLayer``, ``Llama``,
and the prefill/decode state they hand back (``KVCache``, ``PrefillAux``).

Covers Llama 2/3.x (with Llama-3 RoPE frequency scaling), SmolLM2 and Qwen2-style q/k/v bias.
Conventions (the Hugging Face ones, so checkpoints map one to one):

- RoPE in the rotate-half layout (models.rope).
- Linear kernels are stored ``[in, out]`` (``nnx.Linear``); HF stores ``[out, in]``.
- The decoder layers are ONE module with stacked parameters (leading axis = layer) and run
  under ``lax.scan``: one layer is traced and compiled, not 30.

The modules are traceable (``model(tokens)``, ``model.prefill``, ``model.decode_step``): handy
in tests and inside your own ``jax.jit``. For timed paths use ``models.runner.JittedLlama``.

Shapes: B batch, T tokens, S cache length, L layers, Hq / Hkv query / key-value heads,
D head_dim, V vocabulary, d d_model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention_spec import (
    FULL_ATTENTION,
    AttentionSpec,
    LayerAttention,
    attend,
    check_chunk_size,
    chunk_bounds,
    chunk_density_weights,
    resolve_attention,
)
from models.config import LlamaConfig
from models.rope import apply_rope, rope_inverse_frequencies
from pbs_jax import validate_lengths

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "KVCache",
    "Llama",
    "PrefillAux",
    "RMSNorm",
    "check_prefill_arguments",
]


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys (after RoPE) and values in original token order, preallocated.

    keys, values: [L, B, S, Hkv, D]. Slot s holds the token at position s; slots at or beyond
    the current position are garbage and masked out by decode_step. In a right-padded batch
    each row has its own position (``lengths`` after the prefill): slots past it hold the
    padding's keys, masked the same way and overwritten as the row decodes.
    """

    keys: jax.Array
    values: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def write(self, layer_index, keys: jax.Array, values: jax.Array, position) -> KVCache:
        """The cache with one layer's new keys and values written (cast to the cache's dtype);
        the one place the cache is written.

        Cache [L, B, S, Hkv, D]; ``layer_index`` a scalar int (traced under the layer scan);
        keys, values [B, T, Hkv, D] (keys after RoPE). ``position``:

        - a scalar int (static or traced): every row's T new entries go to slots
          ``position … position+T-1`` (one ``dynamic_update_slice``: O(T) writes);
        - [B] int32, one position per row (a ragged batch; T must be 1): row b's entry goes to
          slot ``position[b]`` (a scatter).
        """
        if jnp.ndim(position) == 1:
            rows = jnp.arange(keys.shape[0])
            return KVCache(
                self.keys.at[layer_index, rows, position].set(keys[:, 0].astype(self.keys.dtype)),
                self.values.at[layer_index, rows, position].set(
                    values[:, 0].astype(self.values.dtype)
                ),
            )
        at = (layer_index, 0, position, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(self.keys, keys[None].astype(self.keys.dtype), at),
            jax.lax.dynamic_update_slice(self.values, values[None].astype(self.values.dtype), at),
        )


class PrefillAux(NamedTuple):
    """Extra prefill outputs: last-layer hidden [B,T,d] (before the final norm), and the
    per-layer block density [L] float32 (ones for dense attention)."""

    hidden: jax.Array
    density: jax.Array


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


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


class Llama(nnx.Module):
    """Llama decoder. Parameters (pure-dict paths, used by models.weights):

    embed.embedding [V,d]; layers.{attn_norm,mlp_norm}.scale [L,d];
    layers.attn.{q,k,v,o}_proj.kernel [L,in,out] (+ .bias [L,out] for q/k/v if qkv_bias);
    layers.mlp.{gate,up,down}_proj.kernel [L,in,out]; final_norm.scale [d];
    lm_head.kernel [d,V] unless tie_embeddings.
    """

    def __init__(
        self, config: LlamaConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None = None
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

        # One DecoderLayer whose parameters carry a leading layer axis, so the stack runs
        # under lax.scan (compile time independent of depth).
        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs):
            return DecoderLayer(config, dtype=dtype, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config.d_model, config.rms_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )
        )

    # -- pieces ---------------------------------------------------------------------------

    def output_logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm + output projection: last-layer hidden [..., d] -> logits [..., V] f32."""
        hidden = self.final_norm(hidden)
        if self.lm_head is None:
            return jnp.einsum(
                "...d,vd->...v",
                hidden,
                self.embed.embedding[...],
                preferred_element_type=jnp.float32,
            )
        return jnp.einsum(
            "...d,dv->...v", hidden, self.lm_head.kernel[...], preferred_element_type=jnp.float32
        )

    def _scan_layers(self, layer_step, carry):
        """Every decoder layer under one ``lax.scan``: the stacked parameters are split once and
        step i merges layer i, then ``layer_step(layer, index, carry) -> (carry, out)`` with
        ``index`` the int32 layer index. -> (final carry, outs stacked over layers [L, ...])."""
        layers_graphdef, layers_state = nnx.split(self.layers)

        def one_layer(carry, xs):
            layer_state, index = xs
            return layer_step(nnx.merge(layers_graphdef, layer_state), index, carry)

        layer_indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        return jax.lax.scan(one_layer, carry, (layers_state, layer_indices))

    def _prefill_layers(self, tokens, attention, collect_kv: bool, lengths=None):
        """tokens [B,T] -> (hidden [B,T,d], (keys, values) [L,B,T,Hkv,D] or None, density [L]);
        lengths [B] int32 for a right-padded batch (None: every row holds T)."""
        attention = resolve_attention(attention)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        layer_attention = _per_layer_attention(attention, self.config.num_layers)

        def layer_step(layer, index, hidden):
            hidden, kv, density = layer(hidden, positions, layer_attention(index), lengths)
            return hidden, (kv if collect_kv else None, density)

        hidden, (kv, densities) = self._scan_layers(layer_step, self.embed(tokens))
        return hidden, kv, densities

    def _prefill_chunked(self, tokens, attention, chunk_size: int, max_len: int, keep_hidden):
        """The prompt prefilled ``chunk_size`` tokens at a time into one preallocated cache.

        tokens [B,T] -> (hidden [B,T,d] if ``keep_hidden`` else the last chunk's [B,C,d],
        KVCache [L,B,max_len,Hkv,D], density [L]). Chunk c (positions start … end-1, the last
        one possibly shorter) runs every layer on its own tokens: its k/v go into the cache,
        its queries attend to keys 0 … end-1 (static shapes per chunk, a Python loop over
        chunks), so activations are bounded by one chunk. A chunk's density is weighted by its
        share of the prompt's causal blocks (:func:`chunk_density_weights`), so the density is
        the whole prompt's.
        """
        attention = resolve_attention(attention)
        c = self.config
        batch, length = tokens.shape
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        cache = KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
        layer_attention = _per_layer_attention(attention, c.num_layers)
        hiddens, densities = [], []
        bounds = chunk_bounds(length, chunk_size)
        for start, end in bounds:

            def layer_step(layer, index, carry, start=start):
                hidden, cache = carry
                hidden, cache, density = layer.prefill_chunk(
                    hidden, start, layer_attention(index), cache, index
                )
                return (hidden, cache), density

            (hidden, cache), density = self._scan_layers(
                layer_step, (self.embed(tokens[:, start:end]), cache)
            )
            hiddens = [*hiddens, hidden] if keep_hidden else [hidden]
            densities.append(density)
        weights = chunk_density_weights(bounds, attention)
        density = jax.tree.map(
            lambda *per_chunk: sum(w * d for w, d in zip(weights, per_chunk)), *densities
        )
        return jnp.concatenate(hiddens, axis=1), cache, density

    # -- public, traceable -----------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        return_aux: bool = False,
        lengths=None,
    ):
        """tokens [B,T] int -> logits [B,T,V] float32.

        With return_aux=True: (logits, density [L] float32), the fraction of causal blocks
        each layer's attention computed (all ones for "full"). ``lengths [B]``: a right-padded
        batch (see :meth:`prefill`); logits past a row's length are those of its padding.
        """
        lengths = validate_lengths(lengths, *tokens.shape)
        hidden, _, densities = self._prefill_layers(tokens, attention, False, lengths)
        logits = self.output_logits(hidden)
        return (logits, densities) if return_aux else logits

    def prefill(
        self,
        tokens: jax.Array,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        max_len: int | None = None,
        return_aux: bool = False,
        lengths=None,
        chunk_size: int | None = None,
    ):
        """tokens [B,T] -> (last-position logits [B,V] float32, KVCache with S = max_len).

        The cache holds keys after RoPE and values, in original token order, for positions
        [0, T); max_len (default T) must be >= T. With return_aux=True also a PrefillAux
        (last-layer hidden [B,T,d], per-layer density [L]): ``output_logits(aux.hidden)``
        gives every position's logits without a second forward.

        ``lengths [B]`` int (None: every row holds T): a right-padded batch, row b's prompt is
        ``tokens[b, :lengths[b]]``, the rest any valid token ids. Each row equals that row
        prefilled alone (PBS plans it on its own tokens; causality keeps padding out), its last
        logits are those at position ``lengths[b] - 1``, and decoding continues it from
        position ``lengths[b]`` (``decode_step`` with positions [B]).

        ``chunk_size`` (a multiple of every PBS segment_size of the spec; None: one pass, the
        whole prompt at once): prefill ``chunk_size`` tokens at a time into the one cache,
        each chunk's queries attending to the cache's keys up to the chunk's end, so activation
        memory is bounded by a chunk; the last chunk may be shorter. Dense attention gives the
        same result up to rounding; PBS orders each complete segment by the proxy of the chunk
        being prefilled (docs/design.md, "Chunked prefill"). Not with ``lengths`` (a chunked
        ragged batch raises ``NotImplementedError``).
        """
        length = tokens.shape[1]
        lengths = check_prefill_arguments(
            tokens.shape, attention, max_len=max_len, chunk_size=chunk_size, lengths=lengths
        )
        max_len = length if max_len is None else max_len
        if chunk_size is not None:
            hidden, cache, densities = self._prefill_chunked(
                tokens, attention, chunk_size, max_len, keep_hidden=return_aux
            )
        else:
            hidden, (keys, values), densities = self._prefill_layers(
                tokens, attention, True, lengths
            )
            if max_len > length:  # no copy of the whole cache when it is already full-size
                padding = ((0, 0), (0, 0), (0, max_len - length), (0, 0), (0, 0))
                keys, values = jnp.pad(keys, padding), jnp.pad(values, padding)
            cache = KVCache(keys, values)
        if lengths is None:
            last_logits = self.output_logits(hidden[:, -1])
        else:
            last_logits = self.output_logits(hidden[jnp.arange(tokens.shape[0]), lengths - 1])
        if return_aux:
            return last_logits, cache, PrefillAux(hidden, densities)
        return last_logits, cache

    def decode_step(self, token: jax.Array, cache: KVCache, position: jax.Array):
        """token [B] int at scalar position (< cache.max_len) -> (logits [B,V] f32, cache).

        Dense attention against cache slots [0, position] (this token's k/v included). A
        position [B] int puts each row at its own position (a ragged batch after a prefill
        with ``lengths``): row b writes slot position[b] and attends to slots <= position[b].
        """
        position = jnp.asarray(position, jnp.int32)

        def layer_step(layer, index, carry):
            hidden, cache = carry
            return layer.decode(hidden, position, cache, index), None

        (hidden, cache), _ = self._scan_layers(layer_step, (self.embed(token[:, None]), cache))
        return self.output_logits(hidden[:, 0]), cache


def check_prefill_arguments(
    shape: tuple[int, int],
    attention: AttentionSpec,
    *,
    max_len: int | None = None,
    chunk_size: int | None = None,
    lengths=None,
):
    """Every rule on a prefill's arguments, in one place: ``Llama.prefill`` applies it, and
    ``models.runner`` calls it too before tracing (a one-line error, and the lengths
    range-checked while they are still concrete).

    shape: the tokens' (B, T). ``max_len`` (None: T) must be >= T; ``lengths`` [B] ints in
    [1, T] (``pbs_jax.validate_lengths``); ``chunk_size`` as ``check_chunk_size`` allows; not
    both ``lengths`` and ``chunk_size`` (``NotImplementedError``). -> ``lengths`` as int32 [B]
    (None when None).
    """
    length = shape[1]
    if max_len is not None and max_len < length:
        raise ValueError(f"max_len ({max_len}) must be >= the prompt length ({length})")
    lengths = validate_lengths(lengths, *shape)
    check_chunk_size(chunk_size, attention)
    if chunk_size is not None and lengths is not None:
        raise NotImplementedError(
            "prefill with both lengths (a ragged batch) and chunk_size is not "
            "supported: prefill a ragged batch whole, or chunk its rows one by one"
        )
    return lengths


def _per_layer_attention(attention, num_layers: int):
    """``index -> spec`` for the layer scan: the resolved spec itself, or for a
    ``LayerAttention`` a ``lax.switch`` on the (traced) layer index over its distinct specs."""
    if not isinstance(attention, LayerAttention):
        return lambda index: attention
    specs, spec_of_layer = attention.branches(num_layers)
    branches = [
        lambda q, k, v, lengths, spec=spec: attend(q, k, v, spec, lengths) for spec in specs
    ]

    def layer_attention(index):
        return lambda q, k, v, lengths=None: jax.lax.switch(
            jnp.asarray(spec_of_layer)[index], branches, q, k, v, lengths
        )

    return layer_attention
