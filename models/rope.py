"""Rotary position embeddings, one implementation in the Hugging Face rotate-half convention
(a head's dims [0, D/2) pair with [D/2, D)), with Llama-3 frequency scaling.

Shapes: B batch, T tokens, H heads, D head_dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import Llama3RopeScaling, LlamaConfig

__all__ = ["apply_rope", "inverse_frequencies", "rope_inverse_frequencies"]


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
