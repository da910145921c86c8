"""Forward passes through the real model for the studies: one prefill that yields the logits at
the scored positions, a dense greedy continuation of the text, and the per-layer aux.

Only ``models``' public names and ``JittedLlama`` methods are used.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib.probes import EvalSequence, evaluated_positions
from models import JittedLlama, Tokenizer, load_pretrained


class ForwardOutput(NamedTuple):
    """logits ``[P, V]`` float32 at the sequence's evaluated positions; continuation
    ``[new tokens]`` int (host); aux: the attention's per-layer aux stacked over layers
    (density ``[L]``, or e.g. CaptureAttention's q/k/v)."""

    logits: jax.Array
    continuation: np.ndarray
    aux: Any


def load_runner(checkpoint: str | None = None) -> tuple[JittedLlama, Tokenizer]:
    """The real model (default: the SmolLM2-135M-Instruct checkpoint) split once for jitted
    calls, and its tokenizer."""
    model, tokenizer = load_pretrained(checkpoint, progress=False)
    return JittedLlama(model), tokenizer


def run_forward(
    runner: JittedLlama, seq: EvalSequence, attention, new_tokens: int
) -> ForwardOutput:
    """Prefill ``seq`` with ``attention``; score its evaluated positions and continue its text.

    The continuation carries on the real text, not the questions: dense greedy decoding from
    position ``text_end`` over the prefill's cache, where slots at or after the decoded
    position are masked until the decode overwrites them, so no question token is attended
    (the sparse plan, drawn by PBS from the last queries, did see them).
    """
    tokens = jnp.asarray(seq.tokens)[None]
    n = len(seq.tokens)
    if seq.text_end + new_tokens > n:
        raise ValueError(f"{new_tokens} continuation tokens do not fit before position {n}")
    _, cache, aux = runner.prefill(tokens, attention, max_len=n, return_aux=True)
    positions, _ = evaluated_positions(seq)
    logits = runner.output_logits(aux.hidden[0, positions])
    text_logits = runner.output_logits(aux.hidden[:, seq.text_end - 1])  # [1, V]
    continuation, _ = runner.greedy_decode(text_logits, cache, seq.text_end, new_tokens)
    return ForwardOutput(logits, np.asarray(continuation[0]), aux.density)


def compile_prefill(graphdef, state, tokens, attention, chunk_size: int | None = None):
    """The whole prefill (cache, last logits and aux) compiled ahead of time, for XLA's memory
    analysis: ``compiled(graphdef, state, tokens) -> (last logits, KVCache, PrefillAux)``.

    graphdef, state: ``nnx.split`` of a model (sharded or not); tokens ``[B, N]`` int32;
    ``chunk_size``: a chunked prefill (``Llama.prefill``), None: the whole prompt at once.
    """
    runner = JittedLlama.from_split(graphdef, state)
    lowered = runner.lower_prefill(tokens, attention, return_aux=True, chunk_size=chunk_size)
    return lowered.compile()
