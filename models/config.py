"""Static configuration of a Llama-family decoder: ``LlamaConfig``, Llama-3 RoPE scaling and
named presets of real checkpoints' shapes.

Frozen dataclasses: hashable, so a config is a static ``jax.jit`` argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

__all__ = ["PRESETS", "LinearShape", "Llama3RopeScaling", "LlamaConfig"]


class LinearShape(NamedTuple):
    """One weight matrix of a decoder layer: kernel ``[n_in, n_out]`` (the ``nnx.Linear``
    layout), plus a bias ``[n_out]`` when ``bias``."""

    n_in: int
    n_out: int
    bias: bool


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
    def layer_linears(self) -> dict[str, LinearShape]:
        """Every weight matrix of one decoder layer by module name: the attention's q/k/v/o
        projections (q/k/v biased when ``qkv_bias``) and the SwiGLU MLP's gate/up/down.

        The one enumeration of the layer's matmuls: the modules build their ``nnx.Linear`` from
        it, ``num_params`` counts it, FLOP estimates (``layer_matmul_params``) sum it.
        """
        d, ffn = self.d_model, self.ffn_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": LinearShape(d, q_dim, self.qkv_bias),
            "k_proj": LinearShape(d, kv_dim, self.qkv_bias),
            "v_proj": LinearShape(d, kv_dim, self.qkv_bias),
            "o_proj": LinearShape(q_dim, d, False),
            "gate_proj": LinearShape(d, ffn, False),
            "up_proj": LinearShape(d, ffn, False),
            "down_proj": LinearShape(ffn, d, False),
        }

    @property
    def layer_matmul_params(self) -> int:
        """Weights in one layer's matmuls (biases and norms aside): a token's matmul FLOPs
        through one layer are twice this."""
        return sum(linear.n_in * linear.n_out for linear in self.layer_linears.values())

    @property
    def num_params(self) -> int:
        biases = sum(linear.n_out for linear in self.layer_linears.values() if linear.bias)
        layer = self.layer_matmul_params + biases + 2 * self.d_model  # + the two RMSNorm scales
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
