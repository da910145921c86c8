"""Hugging Face safetensors folders → ``models.Llama``, through ``models.weights``' one name
table."""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from models.config import Llama3RopeScaling, LlamaConfig
from models.llama import Llama
from models.weights import model_from_tensors

# ----------------------------------------------------------------------------------------
# Hugging Face safetensors folder
# ----------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict (model_type llama or qwen2)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in ("llama", "qwen2"):
        raise NotImplementedError(f"model_type {model_type!r} not supported (llama, qwen2)")
    if model_type == "llama" and hf_config.get("attention_bias", False):
        raise NotImplementedError("Llama with attention_bias (o_proj bias) is not supported")
    if hf_config.get("mlp_bias", False):
        raise NotImplementedError("mlp_bias is not supported")
    num_heads = hf_config["num_attention_heads"]
    scaling = hf_config.get("rope_scaling") or None
    rope_scaling = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "llama3":
            rope_scaling = Llama3RopeScaling(
                float(scaling["factor"]),
                float(scaling.get("low_freq_factor", 1.0)),
                float(scaling.get("high_freq_factor", 4.0)),
                int(scaling.get("original_max_position_embeddings", 8192)),
            )
        elif rope_type != "default":
            raise NotImplementedError(f"rope_scaling type {rope_type!r} not supported")
    return LlamaConfig(
        num_layers=hf_config["num_hidden_layers"],
        d_model=hf_config["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads", num_heads),
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
        ffn_dim=hf_config["intermediate_size"],
        vocab_size=hf_config["vocab_size"],
        rope_theta=float(hf_config.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        rms_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        max_position_embeddings=hf_config.get("max_position_embeddings", 8192),
    )


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(name, lazy memory-mapped array) for each tensor of one .safetensors file.

    Our own 15-line reader rather than ``safetensors.safe_open(framework="numpy")``: the
    latter cannot return bfloat16 (numpy has no such dtype), the usual dtype of HF weights.
    Layout: u64 little-endian header size, JSON header {name: {dtype, shape, data_offsets}},
    then the raw little-endian data.
    """
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)

    def lazy(info):
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        return lambda: data[start:end].view(dtype).reshape(info["shape"])

    return [(name, lazy(info)) for name, info in header.items()]


def load_safetensors(
    folder: str | os.PathLike, *, dtype=jnp.float32, progress: bool = True
) -> tuple[Llama, LlamaConfig]:
    """HF folder (config.json + *.safetensors shards) -> (model, config)."""
    folder = os.fspath(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = config_from_hf(json.load(f))
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    tensors = [item for shard in shards for item in read_safetensors(shard)]
    model = model_from_tensors(
        config,
        tensors,
        "hf",
        dtype=dtype,
        num_tensors=len(tensors),
        description=f"loading {os.path.basename(folder.rstrip('/'))}",
        progress=progress,
    )
    return model, config
