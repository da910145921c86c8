"""GGUF (llama.cpp) checkpoints → ``models.Llama``, through ``models.weights``' one name table.

- the config comes from the ``{arch}.*`` metadata keys (arch "llama" or "qwen2");
- quantized tensors (Q4_1, Q8_0, ..., anything ``gguf.quants.dequantize`` supports) are
  dequantized to float32 on the host;
- llama.cpp's converter permutes the rows of Q and K of arch "llama"; ``models.weights``' table
  inverts it (``gguf_unpermute_rows``);
- Llama-3 RoPE scaling is stored as a ``rope_freqs.weight`` tensor of per-frequency divisors;
  we recover the (factor, low, high, original length) parameters from it.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.config import Llama3RopeScaling, LlamaConfig
from models.llama import Llama
from models.rope import inverse_frequencies
from models.weights import model_from_tensors

# ----------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")


def gguf_field(reader, key: str, default: Any = KeyError) -> Any:
    """A GGUF metadata value as a Python value (str, int, float, bool, list)."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise KeyError(f"GGUF metadata key {key!r} missing")
        return default
    return field.contents()


def config_from_gguf(reader) -> LlamaConfig:
    """LlamaConfig from the metadata (and tensor list) of a ``gguf.GGUFReader``."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise NotImplementedError(
            f"GGUF architecture {arch!r} not supported (only {SUPPORTED_GGUF_ARCHITECTURES})"
        )
    tensors = {t.name: t for t in reader.tensors}

    def meta(key, default=KeyError):
        value = gguf_field(reader, f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer arrays: we only support uniform layers
            if len(set(value)) != 1:
                raise NotImplementedError(f"{arch}.{key} varies per layer: {value}")
            value = value[0]
        return value

    d_model = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    head_dim = int(
        meta("attention.key_length", None)
        or meta("rope.dimension_count", None)
        or d_model // num_heads
    )
    vocab_size = meta("vocab_size", None)
    if vocab_size is None:  # older files: count the tokenizer's tokens / embedding rows
        vocab_size = int(tensors["token_embd.weight"].shape[-1])
    rope_theta = _f32_to_float(meta("rope.freq_base", 10000.0))
    scaling_type = meta("rope.scaling.type", None)
    if scaling_type not in (None, "none"):
        raise NotImplementedError(f"GGUF RoPE scaling type {scaling_type!r} not supported")
    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        import gguf

        factors = gguf.quants.dequantize(
            tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type
        )
        rope_scaling = llama3_scaling_from_rope_freqs(
            np.asarray(factors, np.float32).reshape(-1),
            head_dim,
            rope_theta,
            original_context=meta("rope.scaling.original_context_length", None),
        )
    return LlamaConfig(
        num_layers=int(meta("block_count")),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        ffn_dim=int(meta("feed_forward_length")),
        vocab_size=int(vocab_size),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_eps=_f32_to_float(meta("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=int(meta("context_length", 8192)),
    )


def _f32_to_float(value) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. Take the shortest
    decimal that round-trips through float32, so configs compare equal to the presets."""
    return float(str(np.float32(value)))


def llama3_scaling_from_rope_freqs(
    factors: np.ndarray, head_dim: int, theta: float, original_context: int | None = None
) -> Llama3RopeScaling:
    """Recovers Llama-3 RoPE scaling from llama.cpp's per-frequency divisors [D/2].

    llama.cpp divides inverse frequency i by factors[i]. ``factor`` is the largest divisor.
    The divisors fix only the two wavelength thresholds (original / low_freq_factor and
    original / high_freq_factor), so (original, low, high) is known up to a common scale:
    we first try the values of every Llama 3.x release (1, 4, 8192), else solve the linear
    ramp of the in-between divisors with low_freq_factor = 1. Either way the result must
    reproduce every divisor.
    """
    factors = np.asarray(factors, np.float64)
    factor = float(np.max(factors))
    candidates = [Llama3RopeScaling(factor, 1.0, 4.0, int(original_context or 8192))]
    # In-between dims: 1/divisor = (1 - smooth)/factor + smooth with
    # smooth = (original / wavelen - low) / (high - low), linear in 1 / wavelen.
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    between = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if factor > 1 and between.sum() >= 2:
        smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_freq[between] / (2 * np.pi), smooth, 1)
        if intercept < 0:  # slope = original / (high - low), intercept = -low / (high - low)
            high = 1.0 - 1.0 / intercept
            candidates.append(
                Llama3RopeScaling(
                    factor, 1.0, float(np.round(high, 4)), int(round(-slope / intercept))
                )
            )
    for scaling in candidates:
        plain = inverse_frequencies(head_dim, float(theta), None)
        scaled = inverse_frequencies(head_dim, float(theta), scaling)
        if np.allclose(plain / scaled, factors, rtol=1e-4):
            return scaling
    raise NotImplementedError(f"rope_freqs.weight {factors} is not a Llama-3 RoPE scaling")


def load_gguf(
    path: str | os.PathLike, *, dtype=jnp.float32, progress: bool = True
) -> tuple[Llama, LlamaConfig, Any]:
    """GGUF file -> (model, config, gguf.GGUFReader). The reader also feeds the tokenizer."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    config = config_from_gguf(reader)
    arch = gguf_field(reader, "general.architecture")

    def lazy(tensor):
        return lambda: gguf.quants.dequantize(tensor.data, tensor.tensor_type)

    tensors = [(t.name, lazy(t)) for t in reader.tensors]
    model = model_from_tensors(
        config,
        tensors,
        "gguf",
        dtype=dtype,
        unpermute_qk=(arch == "llama"),
        num_tensors=len(tensors),
        description=f"loading {os.path.basename(path)}",
        progress=progress,
    )
    return model, config, reader
