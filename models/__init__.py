"""Flax NNX Llama with pluggable prefill attention (dense or PBS-Attn), checkpoint loaders
(GGUF, HF safetensors), tokenizer, KV cache and greedy decoding.

One module per seam: ``config`` (LlamaConfig, presets), ``rope``, ``attention_spec`` (the
boundary with the op), ``cache`` (KVCache, PrefillAux), ``layers`` (the decoder layer's
modules), ``llama`` (the model), ``runner`` (jitted entry points and JittedLlama), then
``weights``, ``pretrained``, ``tokenizer``, ``sharding``.
"""

from models import runner
from models.attention_spec import (
    FULL_ATTENTION,
    AttentionSpec,
    LayerAttention,
    PBSAttention,
    chunk_bounds,
)
from models.cache import KVCache, PrefillAux
from models.config import PRESETS, Llama3RopeScaling, LlamaConfig
from models.gguf_loader import config_from_gguf, load_gguf
from models.hf_loader import config_from_hf, load_safetensors
from models.llama import Llama
from models.pretrained import (
    CHECKPOINT_PRESETS,
    default_checkpoint_path,
    load_pretrained,
    preset_for_checkpoint,
)
from models.runner import JittedLlama
from models.tokenizer import Tokenizer

__all__ = [
    "AttentionSpec",
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
    "chunk_bounds",
    "Tokenizer",
    "config_from_gguf",
    "config_from_hf",
    "default_checkpoint_path",
    "load_gguf",
    "load_pretrained",
    "load_safetensors",
    "preset_for_checkpoint",
    "runner",
]
