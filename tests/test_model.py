"""The Flax Llama against an independent numpy forward, PBS plug-in, prefill + decode."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import (
    PRESETS,
    JittedLlama,
    LayerAttention,
    Llama,
    Llama3RopeScaling,
    LlamaConfig,
    PBSAttention,
    load_safetensors,
)
from models.testing import random_hf_weights, write_safetensors_folder
from pbs_jax import PBSConfig
from tests.conftest import TINY, random_tokens


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    # GPUs run float32 matmuls in TF32 by default (~1e-3 relative error); these tests compare
    # at 1e-4. On CPU this changes nothing.
    with jax.default_matmul_precision("highest"):
        yield


# ----------------------------------------------------------------------------------------
# An independent numpy forward (float64), written from the HF LlamaForCausalLM definition.
# ----------------------------------------------------------------------------------------


def numpy_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, d, 2) / d)
    s = config.rope_scaling
    if s is None:
        return inv
    out = []
    for f in inv:  # HF _compute_llama3_parameters, element by element
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return np.asarray(out)


def numpy_forward(
    weights: dict[str, np.ndarray], config: LlamaConfig, tokens: np.ndarray
) -> np.ndarray:
    """tokens [B,T] -> logits [B,T,V], float64, causal, GQA by repeating K/V heads."""
    c = config
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    batch, length = tokens.shape
    group = c.num_heads // c.num_kv_heads

    def rms_norm(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_eps) * scale

    def rotate_half(x):
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], -1)

    angles = np.arange(length)[:, None] * numpy_inverse_frequencies(c)[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None, :]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None, :]
    causal = np.tril(np.ones((length, length), bool))

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."

        def proj(name, h, heads):
            y = h @ w[p + f"self_attn.{name}_proj.weight"].T
            if c.qkv_bias:
                y = y + w[p + f"self_attn.{name}_proj.bias"]
            return y.reshape(batch, length, heads, c.head_dim)

        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (
            proj("q", h, c.num_heads),
            proj("k", h, c.num_kv_heads),
            proj("v", h, c.num_kv_heads),
        )
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(c.head_dim)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhts,bshd->bthd", probs, v).reshape(batch, length, -1)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if c.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


def load_random(tmp_path, config, seed=0, dtype=jnp.float32):
    weights = random_hf_weights(config, seed)
    model, _ = load_safetensors(
        write_safetensors_folder(tmp_path / "ckpt", config, weights), dtype=dtype, progress=False
    )
    return model, weights


# ----------------------------------------------------------------------------------------
# Numerics against numpy
# ----------------------------------------------------------------------------------------

VARIANTS = {
    "gqa": TINY,
    "mha": TINY.replace(num_kv_heads=4),
    "mqa-untied": TINY.replace(num_kv_heads=1, tie_embeddings=False),
    "qkv-bias-tied": TINY.replace(qkv_bias=True, tie_embeddings=True),
    "llama3-rope": TINY.replace(
        rope_theta=500000.0, rope_scaling=Llama3RopeScaling(4.0, 1.0, 4.0, 64)
    ),
    "head-dim-not-d/h": TINY.replace(head_dim=24),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_numpy(tmp_path, variant):
    config = VARIANTS[variant]
    model, weights = load_random(tmp_path, config)
    tokens = random_tokens(config, (2, 40))
    logits = JittedLlama(model)(tokens)
    chex.assert_shape(logits, (2, 40, config.vocab_size))
    chex.assert_type(logits, jnp.float32)
    expected = numpy_forward(weights, config, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_chunked_mlp_matches_numpy(tmp_path):
    """Prefill's MLP over token chunks (40 tokens in chunks of 16: two full, one padded) is the
    same function as the unchunked one."""
    model, weights = load_random(tmp_path, TINY)
    chunked_graphdef, _ = nnx.split(Llama(TINY.replace(mlp_chunk=16), rngs=nnx.Rngs(0)))
    chunked = nnx.merge(chunked_graphdef, nnx.split(model)[1])
    assert chunked.layers.mlp_chunk == 16
    tokens = random_tokens(TINY, (2, 40))
    logits = JittedLlama(chunked)(tokens)
    np.testing.assert_allclose(
        np.asarray(logits), numpy_forward(weights, TINY, tokens), rtol=2e-4, atol=2e-4
    )


def test_bfloat16_close_to_numpy(tmp_path):
    model, weights = load_random(tmp_path, TINY, dtype=jnp.bfloat16)
    assert model.embed.embedding.dtype == jnp.bfloat16
    tokens = random_tokens(TINY, (1, 40))
    logits = np.asarray(JittedLlama(model)(tokens))
    assert logits.dtype == np.float32
    expected = numpy_forward(weights, TINY, tokens)
    rel = np.linalg.norm(logits - expected) / np.linalg.norm(expected)
    assert rel < 3e-2, rel
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.9


@pytest.mark.slow
def test_module_call_equals_jitted_and_rope_scaling_changes_long_positions():
    model = Llama(TINY, rngs=nnx.Rngs(1))
    tokens = random_tokens(TINY, (1, 24))
    np.testing.assert_allclose(
        model(jnp.asarray(tokens)), JittedLlama(model)(tokens), rtol=1e-5, atol=1e-5
    )
    scaled = Llama(
        TINY.replace(rope_scaling=Llama3RopeScaling(4.0, 1.0, 4.0, 16)), rngs=nnx.Rngs(1)
    )
    assert not np.allclose(model(jnp.asarray(tokens)), scaled(jnp.asarray(tokens)), atol=1e-3)


# ----------------------------------------------------------------------------------------
# KV cache: prefill + decode == one forward
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa", "qkv-bias-tied"])
def test_prefill_then_decode_equals_full_forward(tmp_path, variant):
    config = VARIANTS[variant]
    model, _ = load_random(tmp_path, config)
    runner = JittedLlama(model)
    tokens = random_tokens(config, (2, 30), seed=3)
    prompt_len, max_len = 20, 32
    full = np.asarray(runner(tokens))

    last, cache = runner.prefill(tokens[:, :prompt_len], max_len=max_len)
    chex.assert_shape(
        cache.keys, (config.num_layers, 2, max_len, config.num_kv_heads, config.head_dim)
    )
    np.testing.assert_allclose(last, full[:, prompt_len - 1], rtol=1e-4, atol=1e-4)
    for position in range(prompt_len, tokens.shape[1]):  # teacher-forced decode
        logits, cache = runner.decode_step(tokens[:, position], cache, position)
        np.testing.assert_allclose(logits, full[:, position], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_generate_is_greedy_over_full_forwards(tmp_path):
    model, _ = load_random(tmp_path, TINY)
    runner = JittedLlama(model)
    prompt = random_tokens(TINY, (2, 12), seed=5)
    new = np.asarray(runner.generate(prompt, 6))
    chex.assert_shape(new, (2, 6))
    # Greedy means: each new token is the argmax of a full forward over everything before it.
    logits = np.asarray(runner(np.concatenate([prompt, new], axis=1)))
    np.testing.assert_array_equal(new, logits[:, 11:17].argmax(-1))
    np.testing.assert_array_equal(runner.generate(prompt[0], 6), new[0])  # 1-D prompt


# ----------------------------------------------------------------------------------------
# PBS attention plugged in
# ----------------------------------------------------------------------------------------

# The default rule scaled to a tiny model: one dense tail block, a 2-block proxy.
SMALL_PBS = dict(block_size=16, segment_size=32, dense_tail=16, proxy_blocks=2)


@pytest.mark.parametrize("gqa", ["replicate", "shared"])
def test_pbs_threshold_one_equals_full(tmp_path, gqa):
    model, _ = load_random(tmp_path, TINY)
    runner = JittedLlama(model)
    tokens = random_tokens(TINY, (2, 100), seed=7)
    full = np.asarray(runner(tokens))
    spec = PBSAttention(PBSConfig(threshold=1.0, gqa=gqa, **SMALL_PBS), impl="reference")
    logits, density = runner(tokens, spec, return_aux=True)
    chex.assert_shape(density, (TINY.num_layers,))
    np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pbs_sparse_prefill_then_dense_decode(tmp_path):
    """A sparse prefill gives a density < 1 and a cache in original token order: layer 0
    (whose input does not depend on attention) caches exactly the dense prefill's K/V."""
    model, _ = load_random(tmp_path, TINY)
    runner = JittedLlama(model)
    tokens = random_tokens(TINY, (1, 128), seed=11)
    config = PBSConfig(threshold=0.3, **SMALL_PBS)  # bare PBSConfig: impl="auto"
    logits, density = runner(tokens, config, return_aux=True)
    assert np.all(np.isfinite(logits))
    assert 0.0 < float(density.mean()) < 1.0
    np.testing.assert_allclose(runner(tokens, "full", return_aux=True)[1], 1.0)

    _, sparse_cache = runner.prefill(tokens, config, max_len=130)
    _, dense_cache = runner.prefill(tokens, "full", max_len=130)
    np.testing.assert_allclose(sparse_cache.keys[0], dense_cache.keys[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sparse_cache.values[0], dense_cache.values[0], rtol=1e-5, atol=1e-5)
    chex.assert_shape(runner.generate(tokens, 2, attention=config), (1, 2))


@pytest.mark.slow
def test_prefill_aux_gives_every_logit_and_density(tmp_path):
    model, _ = load_random(tmp_path, TINY)
    runner = JittedLlama(model)
    tokens = random_tokens(TINY, (1, 96), seed=13)
    config = PBSConfig(threshold=0.5, **SMALL_PBS)
    last, _, aux = runner.prefill(tokens, config, return_aux=True)
    logits, density = runner(tokens, config, return_aux=True)
    chex.assert_shape(aux.hidden, (1, 96, TINY.d_model))
    np.testing.assert_allclose(runner.output_logits(aux.hidden), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, logits[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux.density, density, rtol=1e-6)


def test_lower_prefill_compiles_the_prefill_that_runs(tmp_path):
    """``lower_prefill`` is the runner's own prefill, ahead of time: its compiled form reports
    memory and gives the same outputs as ``prefill``; ``from_split`` wraps the same split."""
    model, _ = load_random(tmp_path, TINY)
    runner = JittedLlama(model)
    tokens = random_tokens(TINY, (1, 48), seed=17)
    compiled = runner.lower_prefill(tokens, max_len=50, return_aux=True).compile()
    assert compiled.memory_analysis() is not None
    last, cache, aux = compiled(runner.graphdef, runner.state, jnp.asarray(tokens))
    same = JittedLlama.from_split(runner.graphdef, runner.state)
    assert same.config == TINY
    want_last, want_cache, want_aux = same.prefill(tokens, max_len=50, return_aux=True)
    chex.assert_shape(cache.keys, want_cache.keys.shape)
    np.testing.assert_allclose(last, want_last, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux.hidden, want_aux.hidden, rtol=1e-6, atol=1e-6)


def test_attention_spec_validation():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="attention must be"):
        model(tokens, attention="flash")
    with pytest.raises(TypeError, match="attention must be"):
        model(tokens, attention=0.9)
    with pytest.raises(ValueError, match="impl"):
        PBSAttention(PBSConfig(), impl="cuda")
    with pytest.raises(ValueError, match="max_len"):
        model.prefill(tokens, max_len=4)


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def test_presets_and_validation():
    smol = LlamaConfig.preset("smollm2-135m")
    assert (
        smol.num_layers,
        smol.d_model,
        smol.num_heads,
        smol.num_kv_heads,
        smol.head_dim,
        smol.ffn_dim,
        smol.vocab_size,
        smol.rope_theta,
        smol.rms_eps,
        smol.tie_embeddings,
        smol.max_position_embeddings,
    ) == (30, 576, 9, 3, 64, 1536, 49152, 100000.0, 1e-5, True, 8192)
    assert 134e6 < smol.num_params < 135e6
    assert 1.2e9 < PRESETS["llama-3.2-1b"].num_params < 1.3e9
    assert 7.9e9 < PRESETS["llama-3.1-8b"].num_params < 8.1e9
    assert PRESETS["llama-3.1-8b"].rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert hash(smol) == hash(dataclasses.replace(smol))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.preset("gpt-5")


# ----------------------------------------------------------------------------------------
# Per-layer attention
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_layer_attention_switches_per_layer(tmp_path):
    """Layers overridden to "full" behave exactly as in a dense prefill, the others as sparse:
    per-layer densities, and the K/V cache of every layer up to the first sparse one equal to
    the dense prefill's (their inputs saw only dense attention), the next layer's not."""
    config = TINY.replace(num_layers=3)
    model, _ = load_random(tmp_path, config)
    runner = JittedLlama(model)
    tokens = random_tokens(config, (1, 128), seed=5)
    sparse = PBSAttention(PBSConfig(threshold=0.3, **SMALL_PBS), impl="reference")
    _, dense_cache = runner.prefill(tokens, "full", max_len=128)

    schedule = LayerAttention(sparse, ((0, "full"),))
    _, density = runner(tokens, schedule, return_aux=True)
    assert float(density[0]) == 1.0 and float(density[1]) < 1.0 and float(density[2]) < 1.0
    _, cache = runner.prefill(tokens, schedule, max_len=128)
    for layer in (0, 1):
        np.testing.assert_allclose(cache.keys[layer], dense_cache.keys[layer], rtol=1e-5, atol=1e-5)
    assert not np.allclose(cache.keys[2], dense_cache.keys[2], rtol=1e-3, atol=1e-3)

    everything_full = LayerAttention(sparse, tuple((i, "full") for i in range(3)))
    np.testing.assert_allclose(
        runner(tokens, everything_full), runner(tokens, "full"), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        runner(tokens, LayerAttention(sparse)), runner(tokens, sparse), rtol=1e-6, atol=1e-6
    )


def test_layer_attention_validation():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="distinct layer"):
        LayerAttention("full", ((0, "full"), (0, PBSConfig())))
    with pytest.raises(TypeError, match="LayerAttention takes"):
        LayerAttention("full", ((0, lambda q, k, v: (q, 1.0)),))
    with pytest.raises(ValueError, match="the model has"):
        model(tokens, attention=LayerAttention("full", ((TINY.num_layers, PBSConfig()),)))
