"""Checkpoint loading: GGUF (llama.cpp) and Hugging Face safetensors folders -> models.Llama.

Both formats go through ONE table, ``PARAM_RULES``: for every model parameter, the regex of
its HF name, the regex of its GGUF name, its path in the NNX pure state dict and the transform
to apply. Loading is abstract init (``nnx.eval_shape``, no random weights materialised), then
filling preallocated numpy buffers tensor by tensor (stacked over layers), then ``nnx.merge``.
Every problem (unknown tensor, wrong shape, missing parameter) is collected and raised once.

GGUF specifics:
- the config comes from the ``{arch}.*`` metadata keys (arch "llama" or "qwen2");
- quantized tensors (Q4_1, Q8_0, ..., anything ``gguf.quants.dequantize`` supports) are
  dequantized to float32 on the host;
- llama.cpp's converter permutes the rows of Q and K (and their biases) of arch "llama"
  (``LlamaModel.permute`` in convert_hf_to_gguf.py: interleaved-pair RoPE layout). We invert
  it so the weights match the HF rotate-half RoPE used by the model. Qwen2 GGUFs are not
  permuted (llama.cpp runs them with NEOX RoPE, which is rotate-half).
- Llama-3 RoPE scaling is stored as a ``rope_freqs.weight`` tensor of per-frequency divisors;
  we recover the (factor, low, high, original length) parameters from it.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models.config import Llama3RopeScaling, LlamaConfig
from models.modules import Llama
from models.rope import inverse_frequencies

__all__ = [
    "PARAM_RULES",
    "ParamRule",
    "Transform",
    "config_from_gguf",
    "config_from_hf",
    "gguf_permute_rows",
    "gguf_unpermute_rows",
    "load_gguf",
    "load_safetensors",
    "model_from_tensors",
    "read_safetensors",
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
    """llama.cpp's ``LlamaModel.permute`` (HF rotate-half rows -> GGUF interleaved pairs).

    w: [num_heads * head_dim, ...] (a weight [out, in] or a bias [out]). Used by tests to
    write GGUFs the way the converter does.
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
