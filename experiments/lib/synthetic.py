"""Synthetic attention inputs with the structure of real long-context heads.

Random Gaussian Q/K give nearly uniform attention (density ≈ 1 at any threshold), which says
nothing about a sparse method. Real heads mix a local band (recent tokens), a handful of
"heavy hitter" keys that every query attends (sinks, separators), and noise. These inputs
plant exactly that, with knobs, so benchmarks on long sequences (where the 8K-context test
model cannot go) see realistic block densities. Accuracy claims use the real model instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def structured_qkv(
    key: jax.Array,
    batch: int,
    seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.bfloat16,
    *,
    relevant_segments: int = 12,
    heavy_density: float = 0.25,
    heavy_logit: float = 10.0,
    local_logit: float = 10.0,
    local_width: float = 256.0,
    segment_size: int = 256,
    noise: float = 1.0,
    structure: float = 1.0,
):
    """``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]`` with local + heavy-hitter attention.

    Logits (after the 1/sqrt(D) scale) decompose as noise + a local kernel of width about
    ``local_width`` tokens peaking near ``local_logit`` + up to ``heavy_logit`` on heavy-hitter
    keys. Heavy hitters are scattered inside a fixed number of "relevant" segments (a few passages
    that matter, whatever the length), a quarter of whose tokens are heavy, plus token 0 (the
    sink). Scattered, they are what a within-segment permutation gathers into fewer blocks; a
    fixed count makes the important blocks a shrinking fraction as N grows, as in real models.
    The local kernel is a sum of rotary-like cosines, so q_i·k_j depends on i - j only.
    ``structure`` scales both planted logits (``local_logit`` and ``heavy_logit``) at once: 1 is
    the benchmarks' structured family, smaller values fade into the noise (plans grow denser).
    """
    local_logit, heavy_logit = structure * local_logit, structure * heavy_logit
    d = head_dim
    n_pos = d // 2 - 1  # feature pairs for position; the last feature carries the heavy direction
    kq, kk, kv, kh, ks = jax.random.split(key, 5)
    scale = np.sqrt(d)
    wavelengths = np.geomspace(4.0 * local_width, 32.0 * local_width, n_pos)
    omega = jnp.asarray(2 * np.pi / wavelengths, jnp.float32)
    pos = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * omega[None, :]  # [N, n_pos]
    amp = np.sqrt(local_logit * scale / n_pos)
    pos_feat = amp * jnp.concatenate([jnp.cos(pos), jnp.sin(pos)], axis=-1)  # [N, 2*n_pos]

    def with_noise(k_, heads):
        z = jax.random.normal(k_, (batch, seq_len, heads, d), jnp.float32) * np.sqrt(noise)
        return z.at[..., : 2 * n_pos].add(pos_feat[None, :, None, :])

    q = with_noise(kq, num_q_heads)
    k = with_noise(kk, num_kv_heads)
    num_segments = max(seq_len // segment_size, 1)
    chosen = jax.random.uniform(ks, (batch, num_segments, num_kv_heads)).argsort(axis=1)
    relevant = chosen < relevant_segments  # [B, G, Hkv]: a fixed number of segments
    relevant = jnp.repeat(relevant, segment_size, axis=1)[:, :seq_len]
    relevant = jnp.pad(relevant, ((0, 0), (0, seq_len - relevant.shape[1]), (0, 0)))
    heavy = relevant & (jax.random.uniform(kh, relevant.shape) < heavy_density)
    heavy = heavy.at[:, 0].set(True)  # the attention sink
    strength = jax.random.uniform(jax.random.fold_in(kh, 1), heavy.shape, minval=0.5, maxval=1.0)
    # Heavy direction: the last feature; every query carries sqrt(heavy_logit * scale) there.
    q = q.at[..., -1].set(np.sqrt(heavy_logit * scale))
    k = k.at[..., -1].set(jnp.where(heavy, strength * np.sqrt(heavy_logit * scale), 0.0))
    v = jax.random.normal(kv, (batch, seq_len, num_kv_heads, d), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
