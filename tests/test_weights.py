"""Checkpoint loaders on tiny random checkpoints written by the tests (no downloads)."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import PRESETS, JittedLlama, Llama3RopeScaling
from models.gguf_loader import config_from_gguf, llama3_scaling_from_rope_freqs, load_gguf
from models.hf_loader import config_from_hf, load_safetensors
from models.testing import (
    _llama3_rope_divisors,
    config_to_hf,
    quantize_roundtrip,
    random_hf_weights,
    write_gguf,
    write_safetensors_folder,
)
from models.weights import gguf_permute_rows, gguf_unpermute_rows
from tests.conftest import TINY, random_tokens

VARIANTS = {
    "gqa": TINY,
    "mha-untied": TINY.replace(num_kv_heads=4, tie_embeddings=False),
    # Thresholds 32 and 256 tokens: two of the 8 frequencies fall on the ramp between them.
    "llama3-rope": TINY.replace(
        rope_theta=500000.0, rope_scaling=Llama3RopeScaling(4.0, 1.0, 8.0, 256)
    ),
    "head-dim-not-d/h": TINY.replace(head_dim=32),
}


def pure_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def assert_same_params(a, b, **tolerance):
    flat_a, flat_b = (
        jax.tree_util.tree_flatten_with_path(pure_params(a)),
        jax.tree.leaves(pure_params(b)),
    )
    assert len(flat_a[0]) == len(flat_b)
    for (path, x), y in zip(flat_a[0], flat_b):
        np.testing.assert_allclose(
            np.asarray(x, np.float32),
            np.asarray(y, np.float32),
            err_msg=jax.tree_util.keystr(path),
            **tolerance,
        )


# ----------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 3])
def test_safetensors_maps_every_tensor(tmp_path, num_shards):
    config = TINY.replace(tie_embeddings=False, qkv_bias=True)
    weights = random_hf_weights(config, seed=1)
    folder = write_safetensors_folder(tmp_path, config, weights, num_shards=num_shards)
    model, loaded_config = load_safetensors(folder, progress=False)
    assert loaded_config == config
    params = pure_params(model)
    np.testing.assert_array_equal(
        params["embed"]["embedding"], weights["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(params["lm_head"]["kernel"], weights["lm_head.weight"].T)
    np.testing.assert_array_equal(params["final_norm"]["scale"], weights["model.norm.weight"])
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
        np.testing.assert_array_equal(
            attn["q_proj"]["kernel"][layer], weights[p + "self_attn.q_proj.weight"].T
        )
        np.testing.assert_array_equal(
            attn["k_proj"]["bias"][layer], weights[p + "self_attn.k_proj.bias"]
        )
        np.testing.assert_array_equal(
            mlp["down_proj"]["kernel"][layer], weights[p + "mlp.down_proj.weight"].T
        )
        np.testing.assert_array_equal(
            params["layers"]["mlp_norm"]["scale"][layer],
            weights[p + "post_attention_layernorm.weight"],
        )


def test_safetensors_bfloat16_file(tmp_path):
    weights = random_hf_weights(TINY, seed=2)
    folder = write_safetensors_folder(tmp_path, TINY, weights, dtype=jnp.bfloat16)
    model, _ = load_safetensors(folder, dtype=jnp.bfloat16, progress=False)
    embedding = pure_params(model)["embed"]["embedding"]
    assert embedding.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(embedding, np.float32),
        weights["model.embed_tokens.weight"].astype(jnp.bfloat16).astype(np.float32),
    )


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        VARIANTS["llama3-rope"],
        TINY.replace(qkv_bias=True),
        PRESETS["llama-3.1-8b"],
        PRESETS["llama-3.2-1b"],
    ],
    ids=["tiny", "llama3-rope", "qwen2", "llama-3.1-8b", "llama-3.2-1b"],
)
def test_config_json_roundtrip(config):
    assert config_from_hf(config_to_hf(config)) == config


def test_loader_reports_every_problem_at_once(tmp_path):
    weights = random_hf_weights(TINY, seed=3)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # ignored
    weights["model.layers.0.mlp.extra.weight"] = np.ones((2, 2), np.float32)
    weights["model.layers.0.mlp.gate_proj.weight"] = weights["model.layers.0.mlp.gate_proj.weight"][
        :5
    ]
    folder = write_safetensors_folder(tmp_path, TINY, weights)
    with pytest.raises(ValueError) as error:
        load_safetensors(folder, progress=False)
    message = str(error.value)
    assert "missing parameter layers.mlp.up_proj.kernel (layers [1])" in message
    assert "unexpected tensor 'model.layers.0.mlp.extra.weight'" in message
    assert "model.layers.0.mlp.gate_proj.weight" in message and "shape" in message
    assert "inv_freq" not in message


# ----------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------


def test_gguf_row_permutation_is_inverted():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    permuted = gguf_permute_rows(w, num_heads=4)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_unpermute_rows(permuted, num_heads=4), w)
    # The converter interleaves the two rotate-half halves of each head: (0, 8, 1, 9, ...).
    np.testing.assert_array_equal(permuted[:4, 0] / 3, [0, 8, 1, 9])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gguf_f32_equals_safetensors(tmp_path, variant):
    """Same weights, both formats: identical parameters and logits (the Q/K row permutation
    written by the converter is undone, and the config read from GGUF metadata)."""
    config = VARIANTS[variant]
    weights = random_hf_weights(config, seed=4)
    from_gguf, gguf_config, _ = load_gguf(
        write_gguf(tmp_path / "m.gguf", config, weights), progress=False
    )
    from_hf, _ = load_safetensors(
        write_safetensors_folder(tmp_path / "hf", config, weights), progress=False
    )
    assert gguf_config == config
    assert_same_params(from_gguf, from_hf, rtol=0, atol=0)
    tokens = random_tokens(config, (1, 48))
    np.testing.assert_array_equal(JittedLlama(from_gguf)(tokens), JittedLlama(from_hf)(tokens))


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1"])
def test_gguf_quantized_equals_safetensors_of_dequantized(tmp_path, qtype):
    """Quantization is per row, so it commutes with the row permutation: the GGUF must load
    to exactly the dequantized HF weights."""
    config = TINY.replace(tie_embeddings=False)
    weights = random_hf_weights(config, seed=5)
    stored = {
        name: (quantize_roundtrip(w, qtype) if w.ndim == 2 else w) for name, w in weights.items()
    }
    from_gguf, _, reader = load_gguf(
        write_gguf(tmp_path / "m.gguf", config, weights, qtype=qtype), progress=False
    )
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", qtype}
    from_hf, _ = load_safetensors(
        write_safetensors_folder(tmp_path / "hf", config, stored), progress=False
    )
    assert_same_params(from_gguf, from_hf, rtol=0, atol=0)
    tokens = random_tokens(config, (1, 32))
    logits = JittedLlama(from_gguf)(tokens)
    np.testing.assert_allclose(logits, JittedLlama(from_hf)(tokens), rtol=1e-5, atol=1e-5)
    exact, _ = load_safetensors(
        write_safetensors_folder(tmp_path / "exact", config, weights), progress=False
    )
    relative = np.linalg.norm(logits - JittedLlama(exact)(tokens)) / np.linalg.norm(logits)
    assert relative < {"F16": 1e-3, "Q8_0": 2e-2, "Q4_1": 0.3}[qtype]


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_scaling_recovered_from_rope_freqs(preset):
    config = PRESETS[preset]
    divisors = _llama3_rope_divisors(config)
    assert divisors.max() == config.rope_scaling.factor and divisors.min() == 1.0
    assert (
        llama3_scaling_from_rope_freqs(divisors, config.head_dim, config.rope_theta)
        == config.rope_scaling
    )
    with pytest.raises(NotImplementedError):
        llama3_scaling_from_rope_freqs(divisors[::-1].copy(), config.head_dim, config.rope_theta)


def test_gguf_config_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", TINY, random_hf_weights(TINY))
    assert config_from_gguf(gguf.GGUFReader(path)) == TINY
