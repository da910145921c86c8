"""The pbs-prefill command line's inputs, checked before any weights load: the text file, the
checkpoint (its header or config.json only), the length against the model's trained positions,
the dense layers, the PBS settings. Every problem is a ValueError with a one-line message (the
command line turns it into ``parser.error``: exit status 2, no traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import typing

import jax
import jax.numpy as jnp

from models import (
    FULL_ATTENTION,
    LayerAttention,
    LlamaConfig,
    PBSAttention,
    config_from_gguf,
    config_from_hf,
    default_checkpoint_path,
)
from models.attention_spec import check_chunk_size
from pbs_jax import PBSConfig

# Defaults per backend. On a CPU the prefill runs the exact O(N²) reference, so the length is
# what two cores get through in about a minute (model load, two variants, decode) and one
# timed run is enough: a CPU time says nothing about sparsity. On a GPU the kernel runs, and the
# timings are the point.
DEFAULT_LENGTH = {"cpu": 2048, "gpu": 8192}
DEFAULT_REPEATS = {"cpu": 1, "gpu": 5}
DEFAULT_DTYPE = {"cpu": "float32", "gpu": "bfloat16"}


def backend() -> str:
    """ "gpu" or "cpu": which defaults apply (a TPU counts as neither; it gets the GPU ones)."""
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def default_text_path() -> str:
    """A long real text present wherever Python is: the source of the typing module (~30k
    tokens)."""
    return inspect.getsourcefile(typing)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before the model is loaded. Several texts run as one
    right-padded batch (one prefill, each row its own length)."""

    text_paths: tuple[str, ...]  # one per batch row, in the order given
    texts: tuple[str, ...]
    length: int  # tokens asked for per text; a text may hold fewer (checked after tokenizing)
    model_path: str
    model_name: str  # the checkpoint's file or folder name
    model_given: bool  # --model was passed (the summary then names its path, not its name)
    dtype: jnp.dtype
    repeats: int
    warmup: int
    new_tokens: int
    impl: str
    dense_layers: tuple[int, ...]  # sorted, without repeats
    pbs_config: PBSConfig
    attention: object  # PBSAttention, or LayerAttention over it with --dense-layers
    json_path: str | None
    chunk_size: int | None = None  # both prefills chunked (None: the whole prompt at once)

    @property
    def text_path(self) -> str:
        """The first (with one text, the only) text file."""
        return self.text_paths[0]

    def row(self, index: int) -> Plan:
        """This plan restricted to one text (row ``index`` of the batch): what its report says."""
        return dataclasses.replace(
            self, text_paths=(self.text_paths[index],), texts=(self.texts[index],)
        )


def read_text(path: str) -> str:
    """The file's text; ValueError (one line) when it is missing, binary, not UTF-8 or empty."""
    if not os.path.exists(path):
        raise ValueError(f"text file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"text file {path!r} is not a file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"text file {path!r} is not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None
    if "\x00" in text:
        raise ValueError(f"text file {path!r} looks binary (it holds NUL bytes), not text")
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty (or only whitespace): nothing to prefill")
    return text


def checkpoint_config(path: str | None) -> tuple[str, LlamaConfig]:
    """(path, LlamaConfig) of a checkpoint (None: the default one) from its GGUF header or
    config.json only (no weights); ValueError (one line) when there is none or it cannot be
    read."""
    try:
        path = path if path is not None else default_checkpoint_path()
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    if os.path.isdir(path):
        config_json = os.path.join(path, "config.json")
        if not os.path.isfile(config_json):
            raise ValueError(f"model folder {path!r} has no config.json")
        try:
            with open(config_json) as f:
                return path, config_from_hf(json.load(f))
        except (ValueError, KeyError, NotImplementedError) as error:
            raise ValueError(f"model folder {path!r}: cannot read config.json ({error})") from None
    if not os.path.isfile(path):
        raise ValueError(f"model {path!r} does not exist (a .gguf file or an HF folder)")
    import gguf  # only here: a folder checkpoint needs no GGUF reader

    try:
        return path, config_from_gguf(gguf.GGUFReader(path))
    except (ValueError, KeyError, NotImplementedError) as error:
        raise ValueError(f"model {path!r} is not a readable Llama GGUF file ({error})") from None


def checked_length(asked: int | None, context: int, default: int, allow_longer: bool) -> int:
    """The number of tokens to prefill: ``asked``, or ``default`` capped at the model's
    ``context`` trained positions (the default never asks for more); ValueError when an asked
    length exceeds them without ``allow_longer``."""
    length = asked or min(default, context)
    if length > context and not allow_longer:
        raise ValueError(
            f"--length {length} exceeds the model's {context} trained positions "
            "(pass --allow-longer to prefill beyond them anyway)"
        )
    return length


def checked_dense_layers(layers, num_layers: int) -> tuple[int, ...]:
    """``layers`` sorted without repeats; ValueError when one is not a layer of the model."""
    layers = tuple(sorted(set(layers)))
    bad_layers = [layer for layer in layers if layer >= num_layers]
    if bad_layers:
        raise ValueError(
            f"--dense-layers {bad_layers}: the model has layers 0 to {num_layers - 1} only"
        )
    return layers


def pbs_config_from_args(args: argparse.Namespace) -> PBSConfig:
    """The PBSConfig the flags describe; PBSConfig's own validation raises ValueError."""
    return PBSConfig(
        block_size=args.block_size,
        segment_size=args.segment_size,
        threshold=args.threshold,
        force_sink=not args.no_sink,
        permute=not args.no_permute,
        gqa=args.gqa,
        selector=args.selector,
        dense_tail=args.dense_tail,
        proxy_blocks=args.proxy_blocks,
    )


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Checks every argument of pbs-prefill against the text and the checkpoint's header;
    raises ValueError with a one-line message for the first problem. Loads no weights."""
    pbs_config = pbs_config_from_args(args)
    # Positional texts, then every --text, in order; none given: the default text.
    text_paths = tuple(args.text or ()) + tuple(args.more_texts or ()) or (default_text_path(),)
    texts = tuple(read_text(path) for path in text_paths)  # every file, before any weights
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json {args.json!r}: its folder does not exist")
    model_path, model_config = checkpoint_config(args.model)
    where = backend()
    length = checked_length(
        args.length, model_config.max_position_embeddings, DEFAULT_LENGTH[where], args.allow_longer
    )
    dense_layers = checked_dense_layers(args.dense_layers, model_config.num_layers)
    attention = PBSAttention(pbs_config, impl=args.impl)
    if dense_layers:
        attention = LayerAttention(
            attention, tuple((layer, FULL_ATTENTION) for layer in dense_layers)
        )
    chunk_size = getattr(args, "chunk_size", None)
    try:
        check_chunk_size(chunk_size, attention)
    except ValueError as error:
        raise ValueError(f"--chunk-size: {error}") from None
    if chunk_size is not None and len(text_paths) > 1:
        raise ValueError(
            f"--chunk-size takes one text: {len(text_paths)} texts are one ragged batch, which "
            "is prefilled whole (a chunked ragged prefill is not supported)"
        )
    return Plan(
        text_paths=text_paths,
        texts=texts,
        length=length,
        model_path=model_path,
        model_name=os.path.basename(model_path.rstrip("/")),
        model_given=args.model is not None,
        dtype=jnp.dtype(args.dtype or DEFAULT_DTYPE[where]),
        repeats=args.repeats or DEFAULT_REPEATS[where],
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        impl=args.impl,
        dense_layers=dense_layers,
        pbs_config=pbs_config,
        attention=attention,
        json_path=args.json,
        chunk_size=chunk_size,
    )
