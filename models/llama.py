"""A Flax NNX Llama whose prefill attention is one static switch: dense causal or PBS-Attn.

Covers Llama 2/3.x (with Llama-3 RoPE frequency scaling), SmolLM2 and Qwen2-style q/k/v bias.
Conventions (the Hugging Face ones, so checkpoints map one to one):

- RoPE in the rotate-half layout: a head's dims [0, D/2) pair with [D/2, D).
- Linear kernels are stored ``[in, out]`` (``nnx.Linear``); HF stores ``[out, in]``.
- The decoder layers are ONE module with stacked parameters (leading axis = layer) and run
  under ``lax.scan``: one layer is traced and compiled, not 30.

Shapes: B batch, T tokens, S cache length, L layers, Hq / Hkv query / key-value heads,
D head_dim, V vocabulary, d d_model.

Two ways to run it:

- the module itself (``model(tokens)``, ``model.prefill``, ``model.decode_step``): traceable,
  handy in tests and inside your own ``jax.jit``;
- ``JittedLlama(model)``: splits the module once (``nnx.split``) and calls pure ``jax.jit``
  functions that ``nnx.merge`` inside, so no NNX graph walking happens in timed paths
  (the Flax NNX performance guide's advice). ``attention`` is a static argument everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "FULL_ATTENTION",
    "PRESETS",
    "JittedLlama",
    "KVCache",
    "LayerAttention",
    "Llama",
    "Llama3RopeScaling",
    "LlamaConfig",
    "PBSAttention",
    "PrefillAux",
    "apply_rope",
    "attend",
    "decode_step",
    "dense_causal_attention",
    "forward",
    "generate",
    "greedy_decode",
    "inverse_frequencies",
    "output_logits",
    "prefill",
    "resolve_attention",
    "rope_inverse_frequencies",
]


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1+ RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type="llama3"``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are slowed
    down by ``factor``; shorter than ``.../high_freq_factor`` are kept; in between, a smooth
    interpolation.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor}, {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be positive")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (hashable: usable as a static jit arg)."""

    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on the q/k/v projections.
    max_position_embeddings: int = 8192
    # Prefill runs the MLP over chunks of this many tokens, so its [T, ffn_dim] intermediates
    # stay bounded at long T (3 x 11 GiB at 128K tokens for Llama-3.1-8B otherwise).
    mlp_chunk: int = 16384

    def __post_init__(self):
        for name in (
            "num_layers",
            "d_model",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "ffn_dim",
            "vocab_size",
            "max_position_embeddings",
            "mlp_chunk",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named preset (see ``PRESETS``), optionally with some fields replaced."""
        try:
            config = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
        return dataclasses.replace(config, **overrides)

    def replace(self, **overrides: Any) -> LlamaConfig:
        return dataclasses.replace(self, **overrides)

    @property
    def num_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        bias = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        layer = attn + bias + 3 * self.d_model * self.ffn_dim + 2 * self.d_model
        embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embeddings + self.d_model


PRESETS: dict[str, LlamaConfig] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": LlamaConfig(
        num_layers=30,
        d_model=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        vocab_size=49152,
        rope_theta=100000.0,
        rms_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
    ),
    # HuggingFaceTB/SmolLM2-360M(-Instruct)
    "smollm2-360m": LlamaConfig(
        num_layers=32,
        d_model=960,
        num_heads=15,
        num_kv_heads=5,
        head_dim=64,
        ffn_dim=2560,
        vocab_size=49152,
        rope_theta=100000.0,
        rms_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
    ),
    # meta-llama/Llama-3.2-1B(-Instruct)
    "llama-3.2-1b": LlamaConfig(
        num_layers=16,
        d_model=2048,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192),
        rms_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=131072,
    ),
    # meta-llama/Llama-3.1-8B(-Instruct)
    "llama-3.1-8b": LlamaConfig(
        num_layers=32,
        d_model=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192),
        rms_eps=1e-5,
        tie_embeddings=False,
        max_position_embeddings=131072,
    ),
    # Qwen/Qwen2.5-0.5B(-Instruct): the q/k/v-bias variant.
    "qwen2.5-0.5b": LlamaConfig(
        num_layers=24,
        d_model=896,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        ffn_dim=4864,
        vocab_size=151936,
        rope_theta=1000000.0,
        rms_eps=1e-6,
        tie_embeddings=True,
        qkv_bias=True,
        max_position_embeddings=32768,
    ),
}


# ----------------------------------------------------------------------------------------
# RoPE (one implementation, HF rotate-half convention)
# ----------------------------------------------------------------------------------------


@functools.cache
def inverse_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2] float32 (cached; arguments are static)."""
    # float32 exactly like HF: 1 / theta ** (arange(0, D, 2) / D).
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    # HF transformers `_compute_llama3_parameters`, in numpy.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies [D/2] float32 (with Llama-3 scaling when configured)."""
    return inverse_frequencies(config.head_dim, float(config.rope_theta), config.rope_scaling)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, H, D] by positions [T] (int) in the rotate-half layout; same dtype out.

    Computed in float32 (angles up to 1e5+ rad need it), then cast back.
    """
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :]  # [1, T, 1, D]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Attention dispatch (the one place that knows about dense vs PBS)
# ----------------------------------------------------------------------------------------

FULL_ATTENTION = "full"


@dataclasses.dataclass(frozen=True)
class PBSAttention:
    """PBS-Attn with an explicit ``pbs_attention`` implementation ("auto"|"reference"|"pallas").

    A bare ``PBSConfig`` passed as ``attention`` means ``PBSAttention(config, impl="auto")``.
    """

    config: Any  # pbs_jax.PBSConfig (imported lazily so the model works without pbs_jax)
    impl: str = "auto"

    def __post_init__(self):
        if self.impl not in ("auto", "reference", "pallas"):
            raise ValueError(f"PBSAttention.impl must be auto|reference|pallas, got {self.impl!r}")


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


AttentionSpec = str | PBSAttention | LayerAttention | Any  # … | PBSConfig | callable


def resolve_attention(attention: AttentionSpec) -> str | PBSAttention:
    """Normalises an attention spec to "full" or a PBSAttention; raises on anything else."""
    if isinstance(attention, str):
        if attention != FULL_ATTENTION:
            raise ValueError(f"attention must be 'full' or a PBSConfig, got {attention!r}")
        return attention
    if isinstance(attention, (PBSAttention, LayerAttention)):
        return attention
    from pbs_jax import PBSConfig  # lazy: models must import without the op being built

    if isinstance(attention, PBSConfig):
        return PBSAttention(attention)
    if callable(attention):
        # Any hashable callable (q, k, v) -> (out, density): a study's own attention (e.g. a
        # benchmark at a fixed block density) plugs in without touching the model.
        return attention
    raise TypeError(
        f"attention must be 'full', a pbs_jax.PBSConfig or a PBSAttention, got {type(attention)}"
    )


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention; q [B,T,Hq,D], k/v [B,T,Hkv,D] -> [B,T,Hq,D] (GQA native).

    pbs_jax's dense rule (cuDNN on GPU for 16-bit inputs, XLA otherwise), so "full" in the
    model and the op's own dense fallback are the same attention.
    """
    from pbs_jax.attention import dense_attention  # lazy, as for pbs_attention below

    return dense_attention(q, k, v)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, attention: str | PBSAttention
) -> tuple[jax.Array, jax.Array]:
    """Prefill attention by spec: q [B,T,Hq,D], k/v [B,T,Hkv,D] (after RoPE).

    Returns (out [B,T,Hq,D] in q.dtype, density: float32 scalar = computed / causal blocks;
    1.0 for dense). A study's callable may return any pytree of float32 per-layer statistics
    in place of the density (e.g. the layer's q and k); the model stacks it over layers.
    """
    if attention == FULL_ATTENTION:
        return dense_causal_attention(q, k, v), jnp.ones((), jnp.float32)
    if not isinstance(attention, PBSAttention):
        out, density = attention(q, k, v)
        return out, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), density)
    from pbs_jax import pbs_attention

    out, aux = pbs_attention(q, k, v, attention.config, impl=attention.impl, return_aux=True)
    return out, jnp.asarray(aux.density, jnp.float32)


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys (after RoPE) and values in original token order, preallocated.

    keys, values: [L, B, S, Hkv, D]. Slot s holds the token at position s; slots at or beyond
    the current position are garbage and masked out by decode_step.
    """

    keys: jax.Array
    values: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]


class PrefillAux(NamedTuple):
    """Extra prefill outputs: last-layer hidden [B,T,d] (before the final norm), and the
    per-layer block density [L] float32 (ones for dense attention)."""

    hidden: jax.Array
    density: jax.Array


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


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

        def linear(n_in, n_out, bias):
            return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)

        q_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = linear(config.d_model, q_dim, config.qkv_bias)
        self.k_proj = linear(config.d_model, kv_dim, config.qkv_bias)
        self.v_proj = linear(config.d_model, kv_dim, config.qkv_bias)
        self.o_proj = linear(q_dim, config.d_model, False)

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

    def __call__(self, x, positions, attention):
        """Prefill: x [B,T,d] -> (out [B,T,d], (k, v) [B,T,Hkv,D], density scalar)."""
        q, k, v = self._qkv(x, positions)
        out, density = attend(q, k, v, attention)
        return self._output(out), (k, v), density

    def decode(self, x, position, cache: KVCache, layer_index):
        """One token: x [B,1,d] at scalar position -> (out [B,1,d], cache with it written).

        Writes only this token's k/v (at [layer, :, position]) so the step costs O(S) reads
        and O(1) writes per layer, then attends densely to slots <= position.
        """
        q, k, v = self._qkv(x, jnp.reshape(position, (1,)))
        start = (layer_index, 0, position, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache.keys, k[None].astype(cache.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(
            cache.values, v[None].astype(cache.values.dtype), start
        )
        visible = (jnp.arange(cache.max_len) <= position)[None, None, None, :]  # [1,1,1,S]
        out = jax.nn.dot_product_attention(
            q, keys[layer_index], values[layer_index], mask=visible, implementation="xla"
        )
        return self._output(out), KVCache(keys, values)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        def linear(n_in, n_out):
            return nnx.Linear(
                n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs
            )

        self.gate_proj = linear(config.d_model, config.ffn_dim)
        self.up_proj = linear(config.d_model, config.ffn_dim)
        self.down_proj = linear(config.ffn_dim, config.d_model)

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

    def __call__(self, x, positions, attention):
        attn_out, kv, density = self.attn(self.attn_norm(x), positions, attention)
        return self._mlp_residual(x + attn_out), kv, density

    def decode(self, x, position, cache, layer_index):
        attn_out, cache = self.attn.decode(self.attn_norm(x), position, cache, layer_index)
        return self._mlp_residual(x + attn_out), cache


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

    def _prefill_layers(self, tokens, attention, collect_kv: bool):
        """tokens [B,T] -> (hidden [B,T,d], (keys, values) [L,B,T,Hkv,D] or None, density [L])."""
        attention = resolve_attention(attention)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        layers_graphdef, layers_state = nnx.split(self.layers)
        num_layers = self.config.num_layers
        if isinstance(attention, LayerAttention):
            specs, spec_of_layer = attention.branches(num_layers)
            branches = [functools.partial(attend, attention=spec) for spec in specs]

            def layer_attention(index):
                return lambda q, k, v: jax.lax.switch(
                    jnp.asarray(spec_of_layer)[index], branches, q, k, v
                )
        else:

            def layer_attention(index):
                del index
                return attention

        def one_layer(hidden, xs):
            layer_state, index = xs
            layer = nnx.merge(layers_graphdef, layer_state)
            hidden, kv, density = layer(hidden, positions, layer_attention(index))
            return hidden, (kv if collect_kv else None, density)

        hidden, (kv, densities) = jax.lax.scan(
            one_layer, self.embed(tokens), (layers_state, jnp.arange(num_layers))
        )
        return hidden, kv, densities

    # -- public, traceable -----------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        return_aux: bool = False,
    ):
        """tokens [B,T] int -> logits [B,T,V] float32.

        With return_aux=True: (logits, density [L] float32), the fraction of causal blocks
        each layer's attention computed (all ones for "full").
        """
        hidden, _, densities = self._prefill_layers(tokens, attention, collect_kv=False)
        logits = self.output_logits(hidden)
        return (logits, densities) if return_aux else logits

    def prefill(
        self,
        tokens: jax.Array,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        max_len: int | None = None,
        return_aux: bool = False,
    ):
        """tokens [B,T] -> (last-position logits [B,V] float32, KVCache with S = max_len).

        The cache holds keys after RoPE and values, in original token order, for positions
        [0, T); max_len (default T) must be >= T. With return_aux=True also a PrefillAux
        (last-layer hidden [B,T,d], per-layer density [L]): ``output_logits(aux.hidden)``
        gives every position's logits without a second forward.
        """
        length = tokens.shape[1]
        max_len = length if max_len is None else max_len
        if max_len < length:
            raise ValueError(f"max_len ({max_len}) must be >= the prompt length ({length})")
        hidden, (keys, values), densities = self._prefill_layers(tokens, attention, collect_kv=True)
        if max_len > length:  # no copy of the whole cache when it is already full-size
            padding = ((0, 0), (0, 0), (0, max_len - length), (0, 0), (0, 0))
            keys, values = jnp.pad(keys, padding), jnp.pad(values, padding)
        cache = KVCache(keys, values)
        last_logits = self.output_logits(hidden[:, -1])
        if return_aux:
            return last_logits, cache, PrefillAux(hidden, densities)
        return last_logits, cache

    def decode_step(self, token: jax.Array, cache: KVCache, position: jax.Array):
        """token [B] int at scalar position (< cache.max_len) -> (logits [B,V] f32, cache).

        Dense attention against cache slots [0, position] (this token's k/v included).
        """
        position = jnp.asarray(position, jnp.int32)
        layers_graphdef, layers_state = nnx.split(self.layers)

        def one_layer(carry, layer_inputs):
            hidden, cache = carry
            layer_state, layer_index = layer_inputs
            layer = nnx.merge(layers_graphdef, layer_state)
            return layer.decode(hidden, position, cache, layer_index), None

        layer_indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (hidden, cache), _ = jax.lax.scan(
            one_layer, (self.embed(token[:, None]), cache), (layers_state, layer_indices)
        )
        return self.output_logits(hidden[:, 0]), cache


# ----------------------------------------------------------------------------------------
# Pure jitted entry points: (graphdef, state) from ONE nnx.split, merged inside the jit.
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("attention", "return_aux"))
def forward(graphdef, state, tokens, attention=FULL_ATTENTION, return_aux=False):
    """Jitted ``Llama.__call__``: tokens [B,T] -> logits [B,T,V] (, density [L])."""
    return nnx.merge(graphdef, state)(tokens, attention, return_aux=return_aux)


@functools.partial(jax.jit, static_argnames=("attention", "max_len", "return_aux"))
def prefill(graphdef, state, tokens, attention=FULL_ATTENTION, max_len=None, return_aux=False):
    """Jitted ``Llama.prefill``: tokens [B,T] -> (last logits [B,V], KVCache [L,B,max_len,..]
    (, PrefillAux))."""
    return nnx.merge(graphdef, state).prefill(
        tokens, attention, max_len=max_len, return_aux=return_aux
    )


@jax.jit
def output_logits(graphdef, state, hidden):
    """Jitted ``Llama.output_logits``: hidden [..., d] -> logits [..., V] float32."""
    return nnx.merge(graphdef, state).output_logits(hidden)


@functools.partial(jax.jit, donate_argnames=("cache",))
def decode_step(graphdef, state, token, cache, position):
    """Jitted ``Llama.decode_step`` (the cache buffer is donated and updated in place)."""
    return nnx.merge(graphdef, state).decode_step(token, cache, position)


@functools.partial(jax.jit, static_argnames=("num_tokens",), donate_argnames=("cache",))
def greedy_decode(graphdef, state, last_logits, cache, start_position, num_tokens):
    """Greedy continuation after a prefill, under one lax.scan.

    last_logits [B,V] (the prefill's), start_position = prompt length -> (tokens
    [B,num_tokens] int32, cache). Token i is argmax of the logits at position start+i-1.
    """
    model = nnx.merge(graphdef, state)
    first = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
    if num_tokens <= 1:
        return first[:, None][:, :num_tokens], cache

    def step(carry, _):
        token, cache, position = carry
        logits, cache = model.decode_step(token, cache, position)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (next_token, cache, position + 1), next_token

    start = jnp.asarray(start_position, jnp.int32)
    (_, cache, _), rest = jax.lax.scan(step, (first, cache, start), None, length=num_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1), cache


def generate(
    graphdef, state, prompt_tokens, max_new_tokens: int, attention: AttentionSpec = FULL_ATTENTION
) -> jax.Array:
    """Greedy generation: prompt [B,T] -> new tokens [B,max_new_tokens] int32.

    Prefill with ``attention`` (dense or PBS), then dense decode against the cache. No early
    stop at EOS (fixed shapes); trim on the host.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt_tokens.ndim == 1:
        return generate(graphdef, state, prompt_tokens[None], max_new_tokens, attention)[0]
    attention = resolve_attention(attention)
    length = prompt_tokens.shape[1]
    last_logits, cache = prefill(
        graphdef, state, prompt_tokens, attention, max_len=length + max_new_tokens
    )
    tokens, _ = greedy_decode(graphdef, state, last_logits, cache, length, max_new_tokens)
    return tokens


class JittedLlama:
    """A Llama split once into (graphdef, state); every method is a pure jitted function.

    >>> runner = JittedLlama(model)
    >>> logits = runner(tokens, attention=PBSConfig())              # [B,T,V] f32
    >>> last, cache = runner.prefill(tokens, max_len=T + 32)
    >>> logits, cache = runner.decode_step(next_token, cache, T)
    >>> new_tokens = runner.generate(prompt, 32)
    """

    def __init__(self, model: Llama):
        self.config: LlamaConfig = model.config
        self.graphdef, self.state = nnx.split(model)

    def __call__(
        self, tokens, attention: AttentionSpec = FULL_ATTENTION, *, return_aux: bool = False
    ):
        return forward(
            self.graphdef,
            self.state,
            jnp.asarray(tokens, jnp.int32),
            resolve_attention(attention),
            return_aux,
        )

    def prefill(
        self,
        tokens,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        max_len: int | None = None,
        return_aux: bool = False,
    ):
        return prefill(
            self.graphdef,
            self.state,
            jnp.asarray(tokens, jnp.int32),
            resolve_attention(attention),
            max_len,
            return_aux,
        )

    def output_logits(self, hidden):
        return output_logits(self.graphdef, self.state, hidden)

    def decode_step(self, token, cache: KVCache, position):
        return decode_step(
            self.graphdef,
            self.state,
            jnp.asarray(token, jnp.int32),
            cache,
            jnp.asarray(position, jnp.int32),
        )

    def greedy_decode(self, last_logits, cache: KVCache, start_position, num_tokens: int):
        return greedy_decode(
            self.graphdef,
            self.state,
            last_logits,
            cache,
            jnp.asarray(start_position, jnp.int32),
            num_tokens,
        )

    def generate(
        self, prompt_tokens, max_new_tokens: int, attention: AttentionSpec = FULL_ATTENTION
    ) -> jax.Array:
        return generate(self.graphdef, self.state, prompt_tokens, max_new_tokens, attention)
