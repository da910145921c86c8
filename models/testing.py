"""Tiny random checkpoints written the way the real tools write them (for tests and examples).

- ``random_hf_weights``: HF-named float32 numpy weights ([out, in] linears) of a config;
- ``write_safetensors_folder``: config.json + model.safetensors, as transformers saves;
- ``write_gguf``: a GGUF as llama.cpp's convert_hf_to_gguf.py writes it for arch "llama"
  (Q/K rows permuted by its ``LlamaModel.permute``, 2-D weights quantized, 1-D kept F32,
  Llama-3 RoPE scaling as a ``rope_freqs.weight`` tensor of per-frequency divisors).

Names are spelled out here on purpose instead of reusing ``weights.PARAM_RULES``, so a test
that writes with this module and reads with ``models.weights`` checks that table. The Q/K row
permutation is the converter's one formula, ``weights.gguf_permute_rows`` (pinned on a
worked example by tests/test_weights.py), not a copy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

from models.config import LlamaConfig
from models.weights import gguf_permute_rows

__all__ = [
    "HF_TO_GGUF_LAYER_NAMES",
    "config_to_hf",
    "quantize_roundtrip",
    "random_hf_weights",
    "write_gguf",
    "write_safetensors_folder",
]

HF_TO_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def random_hf_weights(
    config: LlamaConfig, seed: int = 0, scale: float = 0.5
) -> dict[str, np.ndarray]:
    """HF-named random float32 weights; linears [out, in] ~ N(0, scale^2 / in)."""
    rng = np.random.default_rng(seed)
    c = config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def linear(n_out, n_in):
        return (rng.standard_normal((n_out, n_in)) * scale / math.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": rng.standard_normal((c.vocab_size, c.d_model)).astype(
            np.float32
        ),
        "model.norm.weight": norm(c.d_model),
    }
    if not c.tie_embeddings:
        weights["lm_head.weight"] = linear(c.vocab_size, c.d_model)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": norm(c.d_model),
                p + "post_attention_layernorm.weight": norm(c.d_model),
                p + "self_attn.q_proj.weight": linear(q_dim, c.d_model),
                p + "self_attn.k_proj.weight": linear(kv_dim, c.d_model),
                p + "self_attn.v_proj.weight": linear(kv_dim, c.d_model),
                p + "self_attn.o_proj.weight": linear(c.d_model, q_dim),
                p + "mlp.gate_proj.weight": linear(c.ffn_dim, c.d_model),
                p + "mlp.up_proj.weight": linear(c.ffn_dim, c.d_model),
                p + "mlp.down_proj.weight": linear(c.d_model, c.ffn_dim),
            }
        )
        if c.qkv_bias:
            for name, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                weights[p + f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(
                    np.float32
                )
    return weights


def config_to_hf(config: LlamaConfig) -> dict:
    """The config.json transformers writes for this config."""
    c = config
    hf = {
        "architectures": ["Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if c.qkv_bias else "llama",
        "hidden_size": c.d_model,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.ffn_dim,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": "silu",
        "rope_scaling": None,
    }
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return hf


def write_safetensors_folder(
    folder: str | os.PathLike,
    config: LlamaConfig,
    weights: dict[str, np.ndarray],
    *,
    dtype=np.float32,
    num_shards: int = 1,
) -> str:
    """config.json + model(-0000i-of-0000n).safetensors; returns the folder."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=1)
    names = sorted(weights)
    for shard in range(num_shards):
        part = {n: np.ascontiguousarray(weights[n].astype(dtype)) for n in names[shard::num_shards]}
        filename = (
            "model.safetensors"
            if num_shards == 1
            else f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        )
        save_file(part, os.path.join(folder, filename))
    return folder


def _llama3_rope_divisors(config: LlamaConfig) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors (loop as written there).
    s = config.rope_scaling
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(factors, np.float32)


def quantize_roundtrip(w: np.ndarray, qtype_name: str) -> np.ndarray:
    """What a GGUF of type qtype_name stores for w, dequantized (row-wise, so it commutes
    with the Q/K row permutation)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def write_gguf(
    path: str | os.PathLike,
    config: LlamaConfig,
    weights: dict[str, np.ndarray],
    *,
    qtype: str = "F32",
    tokens: Sequence[str] | None = None,
    merges: Sequence[str] | None = None,
    token_types: Sequence[int] | None = None,
    pre: str = "smollm",
    chat_template: str | None = None,
    bos_id: int = 1,
    eos_id: int = 2,
) -> str:
    """A llama-arch GGUF of HF-named weights, as convert_hf_to_gguf.py writes it.

    qtype: GGML type of the 2-D weights ("F32", "F16", "Q8_0", "Q4_1", ...); 1-D stays F32.
    """
    import gguf

    c = config
    if c.qkv_bias:
        raise NotImplementedError("write_gguf writes arch 'llama' (no q/k/v bias)")
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_heads != c.d_model:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(list(tokens))
        writer.add_token_merges(list(merges or []))
        writer.add_token_types(list(token_types or [1] * len(tokens)))
        writer.add_bos_token_id(bos_id)
        writer.add_eos_token_id(eos_id)
        writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    ggml_type = gguf.GGMLQuantizationType[qtype]

    def add(name, w):
        w = np.ascontiguousarray(w, np.float32)
        if w.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, w)
        elif qtype == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, ggml_type), raw_dtype=ggml_type)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    if c.rope_scaling is not None:
        add("rope_freqs.weight", _llama3_rope_divisors(c))
    for i in range(c.num_layers):
        for hf_suffix, gguf_suffix in HF_TO_GGUF_LAYER_NAMES.items():
            w = weights.get(f"model.layers.{i}.{hf_suffix}")
            if w is None:
                continue
            if hf_suffix.startswith("self_attn.q_proj"):
                w = gguf_permute_rows(w, c.num_heads)
            elif hf_suffix.startswith("self_attn.k_proj"):
                w = gguf_permute_rows(w, c.num_kv_heads)
            add(f"blk.{i}.{gguf_suffix}", w)
    add("output_norm.weight", weights["model.norm.weight"])
    if not c.tie_embeddings:
        add("output.weight", weights["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)
