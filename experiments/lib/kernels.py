"""The contenders of the kernel benchmarks, built one way for every script: cuDNN dense
attention, the Triton and Mosaic GPU block-sparse kernels on given index lists, the block lists
of every causal block, random inputs and the FLOP rates the tables report.

Shapes: q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]``; lists as :class:`pbs_jax.BlockLists`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pbs_jax
from pallas_kernels import TileConfig, block_sparse_attention, block_sparse_attention_mgpu
from pbs_jax import PBSConfig


def random_qkv(key: jax.Array, b: int, n: int, hq: int, hk: int, d: int, dtype=jnp.bfloat16):
    """Unstructured Gaussian q, k, v (nearly uniform attention: plans come out dense)."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, n, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, n, hk, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, n, hk, d), jnp.float32).astype(dtype)
    return q, k, v


def causal_tflops(b: int, h: int, n: int, d: int, ms: float) -> float:
    """Rate over causal attention's work, 4·B·H·N²·D / 2 FLOPs (the future half not counted)."""
    return 4.0 * b * h * n * n * d / 2 / (ms * 1e-3) / 1e12


def computed_tflops(d: int, block_size: int, computed_blocks: int, ms: float) -> float:
    """Rate over the work actually done: every listed block as a full block_size² tile."""
    return 4.0 * d * block_size * block_size * computed_blocks / (ms * 1e-3) / 1e12 if ms else 0.0


@jax.jit
def cudnn_attention(q, k, v):
    """cuDNN's causal flash attention (XLA off the GPU, so that a script's logic can be checked
    on a CPU)."""
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def all_causal_lists(b: int, h: int, n: int, cfg: PBSConfig) -> pbs_jax.BlockLists:
    """Index lists of 100 % density in the PBS layout: every block of earlier segments (full)
    and every block of the query's own segment (token-masked), ``[B, H, T(, T)]``."""
    t = pbs_jax.num_blocks(n, cfg.block_size)
    mask = pbs_jax.earlier_segment_blocks(t, cfg) | pbs_jax.own_segment_blocks(t, cfg)
    return pbs_jax.index_lists(jnp.broadcast_to(mask, (b, h, t, t)), cfg)


def triton_kernel(
    cfg: PBSConfig, gather_kv: bool = True, tiles: TileConfig | None = None, interpret=None
):
    """The Triton kernel alone, jitted: ``(q, k, v, key_pos, ids, full, total) -> out``; with
    ``gather_kv`` it gathers K/V rows by key position in-kernel (key_pos ``[B, Hq, N]``), else
    k/v are already in slot order (key_pos ``[B, Hkv, N]``)."""
    return jax.jit(
        functools.partial(
            block_sparse_attention,
            block_size=cfg.block_size,
            gather_kv=gather_kv,
            tiles=tiles,
            interpret=interpret,
        )
    )


def mosaic_kernel(cfg: PBSConfig, stages: int = 2, blocks_fastest: bool = True):
    """The Mosaic GPU kernel alone, jitted: ``(q, k_perm, v_perm, k, v, ids, off_counts)``
    (earlier-segment blocks from the permuted K/V, the own segment in original order)."""
    return jax.jit(
        functools.partial(
            block_sparse_attention_mgpu,
            block_size=cfg.block_size,
            segment_blocks=pbs_jax.segment_blocks(cfg),
            stages=stages,
            blocks_fastest=blocks_fastest,
        )
    )
