"""Real attention inputs for the kernel benchmark: post-RoPE q/k/v of a few layers of the real
model on real text, saved to a small ``.npz`` and loaded back as a batch of heads.

The model's dense prefill runs with :class:`~experiments.lib.specs.CaptureAttention`, which hands
back every layer's q ``[B, N, Hq, D]`` and k, v ``[B, N, Hkv, D]``; a few layers spread over
depth are kept in bfloat16 (stored as their uint16 bits: ``.npz`` has no bfloat16).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from experiments.lib.probes import load_texts
from experiments.lib.specs import CaptureAttention

FIELDS = ("q", "k", "v")


def spread_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer indices evenly spread over ``[0, num_layers)``, first and last included."""
    count = min(count, num_layers)
    return tuple(int(round(x)) for x in np.linspace(0, num_layers - 1, count))


def text_tokens(tokenizer, seq_len: int) -> tuple[str, np.ndarray]:
    """(source, ``[seq_len]`` int32): the first tokens of the real prose text of
    :func:`~experiments.lib.probes.load_texts`, else of its code text."""
    texts = load_texts()
    for name in sorted(texts, key=lambda n: n == "stdlib"):  # prose first
        source, text = texts[name]
        ids = tokenizer.encode(text)
        if len(ids) >= seq_len:
            return source, np.asarray(ids[:seq_len], np.int32)
    raise ValueError(f"no real text has {seq_len} tokens")


def capture_qkv(runner, tokens: np.ndarray, layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Dense prefill of ``tokens [N]``; ``{"q": [L, N, Hq, D], "k", "v": [L, N, Hkv, D]}``
    bfloat16 (host) for the chosen layers."""
    n = len(tokens)
    _, _, aux = runner.prefill(
        jnp.asarray(tokens)[None], CaptureAttention(), max_len=n, return_aux=True
    )
    picked = jnp.asarray(layers)
    return {f: np.asarray(aux.density[f][picked, 0].astype(jnp.bfloat16)) for f in FIELDS}


def save(path: pathlib.Path, captured: dict[str, np.ndarray], **meta) -> None:
    """Write the captured arrays (bfloat16 as uint16 bits) and string metadata to ``path``."""
    arrays = {f: captured[f].view(np.uint16) for f in FIELDS}
    # Compressed: 4 layers at 8K take 47 MiB (60 raw), under the device tool's 64 MiB carry.
    np.savez_compressed(
        path, **arrays, **{f"meta_{k}": np.asarray(str(v)) for k, v in meta.items()}
    )


def load(path) -> tuple[tuple[jnp.ndarray, ...], dict[str, str]]:
    """((q ``[L, N, Hq, D]``, k, v ``[L, N, Hkv, D]``) bfloat16, metadata): the layers become
    the batch, so one call of the op runs them all."""
    with np.load(path) as data:
        arrays = tuple(jnp.asarray(data[f]).view(jnp.bfloat16) for f in FIELDS)
        meta = {k[len("meta_") :]: str(data[k]) for k in data.files if k.startswith("meta_")}
    return arrays, meta
