"""Flax NNX Llama with pluggable prefill attention (dense or PBS-Attn), checkpoint loaders
(GGUF, HF safetensors), tokenizer, KV cache and greedy decoding."""

from models.llama import (
    FULL_ATTENTION,
    PRESETS,
    JittedLlama,
    KVCache,
    LayerAttention,
    Llama,
    Llama3RopeScaling,
    LlamaConfig,
    PBSAttention,
    PrefillAux,
)
from models.pretrained import (
    CHECKPOINT_PRESETS,
    default_checkpoint_path,
    load_pretrained,
    preset_for_checkpoint,
)
from models.tokenizer import Tokenizer
from models.weights import load_gguf, load_safetensors

__all__ = [
    "CHECKPOINT_PRESETS",
    "FULL_ATTENTION",
    "PRESETS",
    "JittedLlama",
    "KVCache",
    "LayerAttention",
    "Llama",
    "Llama3RopeScaling",
    "LlamaConfig",
    "PBSAttention",
    "PrefillAux",
    "Tokenizer",
    "default_checkpoint_path",
    "load_gguf",
    "load_pretrained",
    "load_safetensors",
    "preset_for_checkpoint",
]
