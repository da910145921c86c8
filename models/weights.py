"""Checkpoint loading, the part both formats share: the name table and the model builder.

The format readers are ``models.gguf_loader`` (GGUF, llama.cpp) and ``models.hf_loader``
(Hugging Face safetensors folders).

Both formats go through ONE table, ``PARAM_RULES``: for every model parameter, the regex of
its HF name, the regex of its GGUF name, its path in the NNX pure state dict and the transform
to apply. Loading is abstract init (``nnx.eval_shape``, no random weights materialised), then
filling preallocated numpy buffers tensor by tensor (stacked over layers), then ``nnx.merge``.
Every problem (unknown tensor, wrong shape, missing parameter) is collected and raised once.

GGUF specifics live in ``models.gguf_loader``; the Q/K row permutation of llama.cpp is a
transform of the table (``gguf_unpermute_rows``).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models.config import LlamaConfig
from models.llama import Llama

__all__ = [
    "PARAM_RULES",
    "ParamRule",
    "Transform",
    "gguf_permute_rows",
    "gguf_unpermute_rows",
    "model_from_tensors",
]


class Transform(enum.Enum):
    """How a checkpoint tensor becomes a model parameter."""

    IDENTITY = "identity"  # norms, embeddings, biases
    LINEAR = "linear"  # torch/GGUF [out, in] -> nnx.Linear kernel [in, out]


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """One parameter: its names in both formats, where it goes, how it is transformed.

    ``(\\d+)`` in a name is the layer index (the parameter then has a leading layer axis).
    ``rope_rows`` ("q" or "k") marks rows that llama.cpp permuted for its RoPE layout.
    """

    hf: str
    gguf: str
    path: tuple[str, ...]
    transform: Transform = Transform.IDENTITY
    rope_rows: str | None = None


_LAYER_HF = r"model\.layers\.(\d+)\."
_LAYER_GGUF = r"blk\.(\d+)\."
_I, _L = Transform.IDENTITY, Transform.LINEAR

PARAM_RULES: tuple[ParamRule, ...] = (
    ParamRule(r"model\.embed_tokens\.weight", r"token_embd\.weight", ("embed", "embedding")),
    ParamRule(r"model\.norm\.weight", r"output_norm\.weight", ("final_norm", "scale")),
    ParamRule(r"lm_head\.weight", r"output\.weight", ("lm_head", "kernel"), _L),
    ParamRule(
        _LAYER_HF + r"input_layernorm\.weight",
        _LAYER_GGUF + r"attn_norm\.weight",
        ("layers", "attn_norm", "scale"),
    ),
    ParamRule(
        _LAYER_HF + r"post_attention_layernorm\.weight",
        _LAYER_GGUF + r"ffn_norm\.weight",
        ("layers", "mlp_norm", "scale"),
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.q_proj\.weight",
        _LAYER_GGUF + r"attn_q\.weight",
        ("layers", "attn", "q_proj", "kernel"),
        _L,
        rope_rows="q",
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.q_proj\.bias",
        _LAYER_GGUF + r"attn_q\.bias",
        ("layers", "attn", "q_proj", "bias"),
        _I,
        rope_rows="q",
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.k_proj\.weight",
        _LAYER_GGUF + r"attn_k\.weight",
        ("layers", "attn", "k_proj", "kernel"),
        _L,
        rope_rows="k",
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.k_proj\.bias",
        _LAYER_GGUF + r"attn_k\.bias",
        ("layers", "attn", "k_proj", "bias"),
        _I,
        rope_rows="k",
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.v_proj\.weight",
        _LAYER_GGUF + r"attn_v\.weight",
        ("layers", "attn", "v_proj", "kernel"),
        _L,
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.v_proj\.bias",
        _LAYER_GGUF + r"attn_v\.bias",
        ("layers", "attn", "v_proj", "bias"),
    ),
    ParamRule(
        _LAYER_HF + r"self_attn\.o_proj\.weight",
        _LAYER_GGUF + r"attn_output\.weight",
        ("layers", "attn", "o_proj", "kernel"),
        _L,
    ),
    ParamRule(
        _LAYER_HF + r"mlp\.gate_proj\.weight",
        _LAYER_GGUF + r"ffn_gate\.weight",
        ("layers", "mlp", "gate_proj", "kernel"),
        _L,
    ),
    ParamRule(
        _LAYER_HF + r"mlp\.up_proj\.weight",
        _LAYER_GGUF + r"ffn_up\.weight",
        ("layers", "mlp", "up_proj", "kernel"),
        _L,
    ),
    ParamRule(
        _LAYER_HF + r"mlp\.down_proj\.weight",
        _LAYER_GGUF + r"ffn_down\.weight",
        ("layers", "mlp", "down_proj", "kernel"),
        _L,
    ),
)

# Tensors that carry no parameter: HF's cached RoPE table; GGUF's Llama-3 RoPE divisors
# (read into the config by config_from_gguf).
_IGNORED = {"hf": re.compile(r".*rotary_emb\.inv_freq"), "gguf": re.compile(r"rope_freqs\.weight")}
_COMPILED_RULES = {
    fmt: [(re.compile(getattr(rule, fmt)), rule) for rule in PARAM_RULES] for fmt in ("hf", "gguf")
}


# ----------------------------------------------------------------------------------------
# llama.cpp's Q/K row permutation
# ----------------------------------------------------------------------------------------


def gguf_permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py, same logic): HF rotate-half
    rows -> GGUF interleaved pairs.

    w: [num_heads * head_dim, ...] (a weight [out, in] or a bias [out]). ``models.testing``
    writes GGUFs with it, the way the converter does.
    """
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of ``gguf_permute_rows``: GGUF interleaved-pair rows -> HF rotate-half rows."""
    return (
        w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------------------
# The one filler both formats use
# ----------------------------------------------------------------------------------------


def model_from_tensors(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
    name_format: str,
    *,
    dtype=jnp.float32,
    unpermute_qk: bool = False,
    num_tensors: int | None = None,
    description: str = "loading",
    progress: bool = True,
) -> Llama:
    """Builds a Llama from (checkpoint name, lazy array) pairs through ``PARAM_RULES``.

    name_format: "hf" or "gguf" (which regex column to match). Arrays are in the checkpoint's
    [out, in] layout; ``unpermute_qk`` undoes llama.cpp's Q/K row permutation.
    """
    abstract_model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    shapes = nnx.to_pure_dict(abstract_state)
    np_dtype = jnp.dtype(dtype)  # ml_dtypes gives numpy bfloat16
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], set[int]] = {}
    errors: list[str] = []
    heads = {"q": config.num_heads, "k": config.num_kv_heads}

    for name, read in tqdm(
        tensors, total=num_tensors, desc=description, unit="tensor", disable=not progress
    ):
        if _IGNORED[name_format].fullmatch(name):
            continue
        if name_format == "hf" and name == "lm_head.weight" and config.tie_embeddings:
            continue  # some tied checkpoints still store a copy of the embedding
        match = next(
            (
                (m, rule)
                for pattern, rule in _COMPILED_RULES[name_format]
                if (m := pattern.fullmatch(name))
            ),
            None,
        )
        if match is None:
            errors.append(f"unexpected tensor {name!r}")
            continue
        found, rule = match
        target = _get_path(shapes, rule.path)
        if target is None:
            errors.append(f"tensor {name!r} has no parameter {'.'.join(rule.path)} in {config}")
            continue
        layer = int(found.group(1)) if found.groups() else None
        shape = tuple(target.shape[1:] if layer is not None else target.shape)
        if layer is not None and not 0 <= layer < config.num_layers:
            errors.append(f"tensor {name!r}: layer {layer} out of range")
            continue

        array = np.asarray(read())
        if unpermute_qk and rule.rope_rows is not None:
            array = gguf_unpermute_rows(array, heads[rule.rope_rows])
        if rule.transform is Transform.LINEAR:
            array = array.T
        if array.shape != shape:
            errors.append(
                f"tensor {name!r}: shape {array.shape} (after transform), "
                f"expected {shape} for {'.'.join(rule.path)}"
            )
            continue
        buffer = buffers.setdefault(rule.path, np.empty(target.shape, np_dtype))
        if layer is None:
            buffer[...] = array
            filled[rule.path] = {-1}
        else:
            buffer[layer] = array
            filled.setdefault(rule.path, set()).add(layer)

    for path, _leaf in _flatten(shapes):
        expected = {-1} if path[0] != "layers" else set(range(config.num_layers))
        missing = expected - filled.get(path, set())
        if missing:
            where = "" if missing == {-1} else f" (layers {sorted(missing)})"
            errors.append(f"missing parameter {'.'.join(path)}{where}")
    if errors:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(errors))

    _set_leaves(shapes, {path: jnp.asarray(buf) for path, buf in buffers.items()})
    nnx.replace_by_pure_dict(abstract_state, shapes)
    return nnx.merge(graphdef, abstract_state)


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set_leaves(tree: dict, values: dict[tuple[str, ...], Any]) -> None:
    for path, value in values.items():
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
