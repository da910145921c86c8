"""The Flax NNX Llama: embedding, the decoder layers (one module with stacked parameters under
``lax.scan``), final norm and output projection; prefill (whole or chunked, dense or PBS, ragged
batches) and one decode step; and the rules on a prefill's arguments.

Covers Llama 2/3.x (with Llama-3 RoPE frequency scaling), SmolLM2 and Qwen2-style q/k/v bias.
The decoder layers are ONE module with stacked parameters (leading axis = layer) and run under
``lax.scan``: one layer is traced and compiled, not 30. The building blocks are in
``models.layers``, the KV cache in ``models.cache``.

The module is traceable (``model(tokens)``, ``model.prefill``, ``model.decode_step``): handy
in tests and inside your own ``jax.jit``. For timed paths use ``models.runner.JittedLlama``.

Shapes: B batch, T tokens, S cache length, L layers, Hq / Hkv query / key-value heads,
D head_dim, V vocabulary, d d_model.
"""

from __future__ import annotations

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
from models.cache import KVCache, PrefillAux
from models.config import LlamaConfig
from models.layers import DecoderLayer, RMSNorm
from pbs_jax import validate_lengths

__all__ = ["Llama", "check_prefill_arguments"]


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
