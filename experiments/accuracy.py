"""pbs-accuracy: PBS-Attn against block-sparse baselines on a real model (SmolLM2-135M, CPU).

For each length (2K, 4K, 8K) and each evaluation sequence (a real long text with retrieval
needles planted in its first 60 % and the retrieval questions after it):

1. one full-attention prefill that also captures every layer's q and k (after RoPE): the
   reference perplexity, retrieval answers and greedy continuation, and the exact attention
   probabilities for the **coverage pass**: for every method and threshold, the block mask of
   every layer and head, its density, and the fraction of each (sampled) query's true attention
   mass inside the selected blocks;
2. sparse prefills (``impl="reference"``) of the same sequence for chosen methods and
   thresholds: perplexity of the text's last quarter against full, KL(full ‖ method),
   next-token agreement, retrieval answers (teacher-forced) and the first greedy tokens.

Methods (all through ``pbs_jax``, the same reference attention and forced blocks):
PBS (mean-pool selector, permuted keys), MeanPooling (same selector, no permutation),
Antidiagonal (XAttention-style stride-8 anti-diagonal scoring, no permutation), PBS+
(anti-diagonal scoring on permuted keys), and the static sink + local window at matched density.

    python -m experiments.accuracy              # the full study (about 25 min on 2 CPU cores)
    python -m experiments.accuracy --quick      # a 1K-token smoke run (about 1 min; CI)

Results: ``<out>/accuracy.{json,md}`` and ``<out>/accuracy_*.png`` (``accuracy_quick*`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import re
import sys
import sysconfig
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import pbs_jax
from experiments.benchutil import stamp
from experiments.prefill import compare_logits
from models import JittedLlama, PBSAttention, load_pretrained
from pbs_jax import PBSConfig
from pbs_jax.selection import num_blocks

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
COVERAGE_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0)
SWEEP_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
ERROR_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)  # coverage-pass thresholds with output error
HEADLINE_THRESHOLD = 0.9
EQUAL_COVERAGE = 0.95
MIN_FULL_ACCURACY = 0.5  # a retrieval task is kept at a length if full attention solves this much
NEEDLE_DEPTHS = (0.05, 0.6)  # needles live in this fraction of the text; the last quarter is clean


# ----------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A thresholded block-sparse method: a pbs_jax selector, with or without permutation."""

    key: str
    label: str
    selector: str
    permute: bool

    def config(self, threshold: float) -> PBSConfig:
        return PBSConfig(threshold=threshold, permute=self.permute, selector=self.selector)


METHODS = (
    Method("pbs", "PBS (mean-pool, permuted)", "meanpool", True),
    Method("meanpool", "MeanPooling (no permutation)", "meanpool", False),
    Method("antidiagonal", "Antidiagonal (XAttention-style)", "antidiagonal", False),
    Method("pbs_plus", "PBS+ (antidiagonal, permuted)", "antidiagonal", True),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}
SINK_LOCAL = "sink_local"
LABELS = {
    **{m.key: m.label for m in METHODS},
    SINK_LOCAL: "Sink + local window",
    "full": "Full attention",
}
COLORS = {"pbs": "C3", "meanpool": "C0", "antidiagonal": "C2", "pbs_plus": "C1", SINK_LOCAL: "C7"}


@dataclasses.dataclass(frozen=True)
class SinkLocalAttention:
    """Callable attention ``(q, k, v) -> (out, density)``: the static sink + local window.

    q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]``; the block mask is
    :func:`pbs_jax.sink_local_mask` over unpermuted keys, run by the same reference attention.
    """

    window: int
    block_size: int = PBSConfig.block_size

    def __call__(self, q, k, v):
        b, n, hq, _ = q.shape
        mask = pbs_jax.sink_local_mask((b, hq, num_blocks(n, self.block_size)), self.window)
        perm = pbs_jax.identity_permutation(b, k.shape[2], n)
        out = pbs_jax.permuted_block_sparse_attention(q, k, v, perm, mask, self.block_size)
        return out, jnp.mean(pbs_jax.density(mask))


@dataclasses.dataclass(frozen=True)
class CaptureAttention:
    """Callable attention: the model's own dense causal attention, handing back the layer's
    q ``[B, N, Hq, D]`` and k, v ``[B, N, Hkv, D]`` (the model stacks them over layers)."""

    def __call__(self, q, k, v):
        return pbs_jax.dense_attention(q, k, v), {"q": q, "k": k, "v": v}


# ----------------------------------------------------------------------------------------
# Texts and retrieval sequences
# ----------------------------------------------------------------------------------------

LICENSE_FILES = ("GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-1.1", "Apache-2.0", "GPL-2")
STDLIB_MODULES = ("textwrap", "dataclasses", "functools", "fractions", "argparse", "typing")


def load_texts(min_chars: int = 60_000) -> dict[str, tuple[str, str]]:
    """``{name: (source description, text)}``: one prose text and one code text.

    Prose: the licenses in /usr/share/common-licenses when present (concatenated), else the
    Python reference documentation shipped with the standard library (pydoc_data/topics.py).
    Code: several standard-library modules concatenated.
    """
    texts = {}
    license_paths = [os.path.join("/usr/share/common-licenses", f) for f in LICENSE_FILES]
    license_paths = [p for p in license_paths if os.path.isfile(p)]
    prose = "\n\n".join(
        pathlib.Path(p).read_text(encoding="utf-8", errors="replace") for p in license_paths
    )
    if len(prose) >= min_chars:
        texts["licenses"] = (
            "/usr/share/common-licenses/{"
            + ",".join(os.path.basename(p) for p in license_paths)
            + "}",
            prose,
        )
    else:
        from pydoc_data.topics import topics  # the Python reference manual's prose

        texts["python-docs"] = (
            "stdlib pydoc_data/topics.py (Python reference docs)",
            "\n\n".join(topics[k] for k in sorted(topics)),
        )
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = [os.path.join(stdlib, f"{m}.py") for m in STDLIB_MODULES]
    code = "\n\n".join(
        f"# ---- {os.path.basename(p)}\n" + pathlib.Path(p).read_text("utf-8")
        for p in paths
        if os.path.isfile(p)
    )
    texts["stdlib"] = ("stdlib {" + ",".join(f"{m}.py" for m in STDLIB_MODULES) + "}", code)
    return texts


@dataclasses.dataclass(frozen=True)
class Probe:
    """One retrieval question: answer tokens ``tokens[start : start + length]``."""

    task: str  # "passkey" | "kv" | "copy"
    start: int
    length: int


@dataclasses.dataclass
class EvalSequence:
    """A real text with planted needles, then the questions: ``tokens [N]`` int32.

    ``text_end``: first position of the question part; the perplexity region is the last
    quarter of ``[0, text_end)`` (needle-free by construction).
    """

    text: str
    tokens: np.ndarray
    text_end: int
    probes: list[Probe]

    @property
    def ppl_start(self) -> int:
        return self.text_end - self.text_end // 4


_COLORS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "silver",
    "golden",
    "black",
    "white",
    "brown",
    "pink",
    "grey",
    "violet",
    "amber",
    "crimson",
)
_THINGS = (
    "door",
    "box",
    "gate",
    "chest",
    "locker",
    "vault",
    "cabinet",
    "drawer",
    "safe",
    "trunk",
    "crate",
    "closet",
    "shed",
    "cellar",
    "attic",
    "garage",
)
_NAMES = (
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Emeka",
    "Fatima",
    "Goran",
    "Hiro",
    "Ingrid",
    "Jamal",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quinn",
    "Rosa",
)
_ADJECTIVES = (
    "quiet",
    "ancient",
    "clever",
    "tiny",
    "restless",
    "silver",
    "patient",
    "brave",
    "hollow",
    "curious",
    "gentle",
    "frozen",
)
_NOUNS = (
    "fox",
    "lantern",
    "violin",
    "sailor",
    "orchard",
    "kettle",
    "comet",
    "library",
    "bicycle",
    "harbor",
    "pigeon",
    "meadow",
)
_VERBS = (
    "carried",
    "painted",
    "followed",
    "repaired",
    "borrowed",
    "guarded",
    "counted",
    "forgot",
    "polished",
    "hid",
)


def _retrieval_items(rng: np.random.Generator, per_task: int):
    """Needles (strings, in the text) and questions ``(task, prefix, answer, suffix)``."""
    needles, questions = [], []
    labels = rng.permutation([f"the {c} {t}" for c in _COLORS for t in _THINGS])[:per_task]
    for label in labels:
        key = f" {rng.integers(10_000, 100_000)}"
        needles.append(
            [
                f"\nThe pass key of {label} is",
                key,
                f". Remember it. The pass key of {label} is{key}.\n",
            ]
        )
        questions.append(("passkey", f"The pass key of {label} is", key, ".\n"))
    hexchars = np.array(list("0123456789abcdef"))
    pairs = ["".join(rng.choice(hexchars, 6)) for _ in range(6 * per_task)]
    pairs = list(zip(pairs[::2], pairs[1::2]))  # 3 pairs per question: 2 distractors each
    store = ["\nA key-value store in JSON: {"]
    for i, (key, value) in enumerate(pairs):
        store += [f'{", " if i else ""}"{key}": "', value, '"']
    needles.append(store + ["}\n"])
    for i in rng.choice(len(pairs), per_task, replace=False):
        key, value = pairs[i]
        questions.append(("kv", f'In the JSON store, the value of "{key}" is "', value, '".\n'))
    for name in rng.permutation(_NAMES)[:per_task]:
        adj1, adj2 = rng.choice(_ADJECTIVES, 2, replace=False)
        noun1, noun2 = rng.choice(_NOUNS, 2, replace=False)
        sentence = f"the {adj1} {noun1} {rng.choice(_VERBS)} the {adj2} {noun2}"
        needles.append([f'\n{name} wrote in the margin: "', sentence, '".\n'])
        questions.append(("copy", f'{name} wrote in the margin: "', sentence, '".\n'))
    return needles, [questions[i] for i in rng.permutation(len(questions))]


def build_sequence(
    tokenizer, text_name: str, text: str, length: int, per_task: int, seed: int
) -> EvalSequence:
    """Exactly ``length`` tokens: the text with needles at depths in ``NEEDLE_DEPTHS`` (at line
    starts), then a question part whose answers (teacher-forced) are the probes.

    Pieces are tokenized separately, so an answer has the same tokens in its needle and in
    its question.
    """
    rng = np.random.default_rng(seed)
    needles, questions = _retrieval_items(rng, per_task)
    needle_ids = [sum((tokenizer.encode(p) for p in needle), []) for needle in needles]
    question_ids, probes_rel = tokenizer.encode("\n\nAnswers about the text above:\n"), []
    for task, prefix, answer, suffix in questions:
        question_ids += tokenizer.encode(prefix)
        answer_ids = tokenizer.encode(answer)
        probes_rel.append((task, len(question_ids), len(answer_ids)))
        question_ids += answer_ids + tokenizer.encode(suffix)
    text_budget = length - len(question_ids) - sum(map(len, needle_ids))
    text_ids = tokenizer.encode(text)[:text_budget]
    if len(text_ids) < text_budget or text_budget < length // 2:
        raise ValueError(f"{text_name}: too short for {length} tokens with {per_task} probes")
    newline_starts = np.array(
        [i for i in range(1, len(text_ids)) if "\n" in tokenizer.decode([text_ids[i - 1]])]
    )
    depths = np.sort(rng.uniform(*NEEDLE_DEPTHS, len(needle_ids))) * len(text_ids)
    cuts = [int(newline_starts[np.argmin(np.abs(newline_starts - d))]) for d in depths]
    order = rng.permutation(len(needle_ids))
    pieces, previous = [], 0
    for cut, i in zip(cuts, order):
        pieces += [text_ids[previous:cut], needle_ids[i]]
        previous = cut
    pieces.append(text_ids[previous:])
    body = sum(pieces, [])
    tokens = np.asarray(body + question_ids, np.int32)
    assert len(tokens) == length
    last_needle_end = sum(map(len, pieces[:-1]))
    sequence = EvalSequence(
        text_name, tokens, len(body), [Probe(t, len(body) + s, n) for t, s, n in probes_rel]
    )
    assert last_needle_end <= sequence.ppl_start, "needles must stay out of the perplexity region"
    return sequence


# ----------------------------------------------------------------------------------------
# Coverage pass: exact attention mass inside each method's blocks, from full-attention q/k
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoveragePlan:
    """Static description of one coverage pass (a jit static argument).

    rows: sampled query positions (whole query blocks); methods × thresholds are the
    thresholded configurations, windows the sink + local ones; the attention-output error
    is computed for the methods at ``error_thresholds`` (a subset of ``thresholds``).
    """

    rows: tuple[int, ...]
    methods: tuple[Method, ...]
    thresholds: tuple[float, ...]
    windows: tuple[int, ...]
    error_thresholds: tuple[float, ...] = ()
    block_size: int = PBSConfig.block_size


def sampled_query_rows(seq_len: int, block_size: int, max_blocks: int) -> tuple[int, ...]:
    """Positions of every ``stride``-th query block counted back from the last one, so at most
    ``max_blocks`` blocks: an unbiased sample of queries over the whole sequence."""
    t = num_blocks(seq_len, block_size)
    stride = max(1, -(-t // max_blocks))
    chosen = sorted(range(t - 1, -1, -stride))
    return tuple(
        p for b in chosen for p in range(b * block_size, min((b + 1) * block_size, seq_len))
    )


def exact_attention_rows(q: jax.Array, k: jax.Array, rows: jax.Array) -> jax.Array:
    """Causal softmax attention probabilities of some query rows.

    q ``[N, Hq, D]``, k ``[N, Hkv, D]``, rows ``[S]`` int → ``[Hq, S, N]`` float32.
    """
    n, hq, d = q.shape
    k_per_q_head = jnp.repeat(k, hq // k.shape[1], axis=1)  # [N, Hq, D]
    logits = jnp.einsum(
        "shd,nhd->hsn", q[rows], k_per_q_head, precision=jax.lax.Precision.HIGHEST
    ) / jnp.sqrt(jnp.float32(d))
    causal = jnp.arange(n)[None, :] <= rows[:, None]
    return jax.nn.softmax(jnp.where(causal[None], logits, -jnp.inf), axis=-1)


def slot_block_of_position(perm: jax.Array, num_q_heads: int, block_size: int) -> jax.Array:
    """perm ``[Hp, N]`` (slot → position) → ``[Hq, N]`` int: the slot block of each key."""
    slot_of_position = pbs_jax.inverse_permutation(perm)
    return jnp.repeat(slot_of_position // block_size, num_q_heads // perm.shape[0], axis=0)


def slot_block_mass(probs: jax.Array, perm: jax.Array, block_size: int) -> jax.Array:
    """Attention mass per key-slot block: probs ``[Hq, S, N]`` over original key positions,
    perm ``[Hp, N]`` (slot → position) → ``[Hq, S, T]``."""
    hq, _, n = probs.shape
    one_hot = jax.nn.one_hot(
        slot_block_of_position(perm, hq, block_size), num_blocks(n, block_size), dtype=jnp.float32
    )
    return jnp.einsum("hsn,hnt->hst", probs, one_hot, precision=jax.lax.Precision.HIGHEST)


def mask_output_error(
    mask: jax.Array,
    probs: jax.Array,
    perm: jax.Array,
    v: jax.Array,
    rows: jax.Array,
    block_size: int,
) -> jax.Array:
    """Relative error of the attention output when only the mask's blocks are computed.

    mask ``[Hq, T, T]``, probs ``[Hq, S, N]`` (exact, sampled rows), perm ``[Hp, N]``,
    v ``[N, Hkv, D]`` → ``[Hq]``: ‖out_sparse − out‖ / ‖out‖ over the sampled rows, where
    out_sparse renormalises the probabilities over the selected keys (what the kernel computes).
    """
    hq = probs.shape[0]
    key_block = slot_block_of_position(perm, hq, block_size)  # [Hq, N]
    selected = jnp.take_along_axis(
        mask[:, rows // block_size, :], key_block[:, None, :], axis=2
    )  # [Hq, S, N]
    kept = jnp.where(selected, probs, 0.0)
    kept = kept / jnp.maximum(kept.sum(axis=-1, keepdims=True), 1e-30)
    v_per_q_head = jnp.repeat(v, hq // v.shape[1], axis=1)  # [N, Hq, D]

    def attend(p):
        return jnp.einsum("hsn,nhd->hsd", p, v_per_q_head, precision=jax.lax.Precision.HIGHEST)

    exact = attend(probs)
    return jnp.linalg.norm(attend(kept) - exact, axis=(1, 2)) / jnp.maximum(
        jnp.linalg.norm(exact, axis=(1, 2)), 1e-30
    )


def mask_coverage(mask: jax.Array, mass: jax.Array, rows: jax.Array, block_size: int) -> jax.Array:
    """Mean over sampled queries of the attention mass in their selected blocks.

    mask ``[Hq, T, T]`` bool, mass ``[Hq, S, T]`` from :func:`slot_block_mass` → ``[Hq]``.
    """
    selected = mask[:, rows // block_size, :]  # [Hq, S, T]
    return jnp.sum(jnp.where(selected, mass, 0.0), axis=-1).mean(axis=-1)


@functools.partial(jax.jit, static_argnames=("plan",))
def layer_coverage(q: jax.Array, k: jax.Array, v: jax.Array, plan: CoveragePlan):
    """One layer's coverage, density and output error for every configuration of ``plan``.

    q ``[1, N, Hq, D]``, k, v ``[1, N, Hkv, D]`` (the full forward's, after RoPE) →
    (coverage, density), each float32 ``[M·τ + W, Hq]``: methods × thresholds in order, then
    the sink + local windows; and output error ``[M·τ_err, Hq]``, methods × error thresholds.
    """
    n, hq = q.shape[1], q.shape[2]
    bs = plan.block_size
    rows = jnp.asarray(plan.rows)
    probs = exact_attention_rows(q[0], k[0], rows)
    identity = pbs_jax.identity_permutation(1, k.shape[2], n)
    mass_by_perm = {}
    coverage, density, error = [], [], []
    for method in plan.methods:
        cfg = method.config(1.0)
        perm = pbs_jax.compute_permutation(q, k, cfg)
        if method.permute not in mass_by_perm:
            mass_by_perm[method.permute] = slot_block_mass(probs, perm[0], bs)
        block_probs = pbs_jax.block_probabilities(q, k, perm, cfg)
        for threshold in plan.thresholds:
            mask = pbs_jax.select_from_probabilities(
                block_probs, perm, dataclasses.replace(cfg, threshold=threshold)
            )
            coverage.append(mask_coverage(mask[0], mass_by_perm[method.permute], rows, bs))
            density.append(pbs_jax.density(mask)[0])
            if threshold in plan.error_thresholds:
                error.append(mask_output_error(mask[0], probs, perm[0], v[0], rows, bs))
    identity_mass = slot_block_mass(probs, identity[0], bs)
    for window in plan.windows:
        mask = pbs_jax.sink_local_mask((1, hq, num_blocks(n, bs)), window)
        coverage.append(mask_coverage(mask[0], identity_mass, rows, bs))
        density.append(pbs_jax.density(mask)[0])
    return jnp.stack(coverage), jnp.stack(density), jnp.stack(error)


@functools.partial(jax.jit, static_argnames=("head", "block_size"))
def block_attention_map(
    q: jax.Array, k: jax.Array, perm: jax.Array, head: int, block_size: int
) -> jax.Array:
    """Exact attention mass of one head summed per (query block, key-slot block).

    q ``[N, Hq, D]``, k ``[N, Hkv, D]``, perm ``[N]`` (slot → position) → ``[T, T]`` float32;
    divided by N, so the entries of a mask's blocks sum to its coverage of all queries.
    """
    n = q.shape[0]
    t = num_blocks(n, block_size)
    rows = jnp.arange(n)
    probs = exact_attention_rows(
        q[:, head : head + 1], k[:, head // (q.shape[1] // k.shape[1])][:, None], rows
    )  # [1, N, N]
    mass = slot_block_mass(probs, perm[None], block_size)[0]  # [N, T]
    padded = jnp.pad(mass, ((0, t * block_size - n), (0, 0)))
    return padded.reshape(t, block_size, t).sum(axis=1) / n


# ----------------------------------------------------------------------------------------
# Sparse and full forwards: perplexity, KL, agreement, retrieval, greedy continuation
# ----------------------------------------------------------------------------------------


@jax.jit
def _token_metrics(logits: jax.Array, full_logits: jax.Array, targets: jax.Array):
    """logits, full_logits ``[P, V]``, targets ``[P]`` → (nll, KL(full ‖ this), argmax),
    each ``[P]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    full_logp = jax.nn.log_softmax(full_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    kl = jnp.sum(jnp.exp(full_logp) * (full_logp - logp), axis=-1)
    return nll, kl, jnp.argmax(logits, axis=-1)


def evaluated_positions(seq: EvalSequence) -> tuple[np.ndarray, slice]:
    """Positions whose logits are scored: the perplexity region, then every answer token.

    Returns (positions ``[P]`` predicting ``tokens[positions + 1]``, the perplexity rows).
    """
    ppl = np.arange(seq.ppl_start - 1, seq.text_end - 1)
    answers = [np.arange(p.start - 1, p.start + p.length - 1) for p in seq.probes]
    return np.concatenate([ppl] + answers), slice(0, len(ppl))


def run_forward(runner: JittedLlama, seq: EvalSequence, attention, new_tokens: int):
    """Prefill ``seq`` with ``attention``; return (logits ``[P, V]`` at the evaluated positions,
    greedy continuation ids ``[new_tokens]`` of the text, per-layer aux (density ``[L]``, or
    the captured q/k)).

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
    return logits, np.asarray(continuation[0]), aux.density


def forward_metrics(
    seq: EvalSequence, logits, full_logits, continuation, full_continuation
) -> dict[str, Any]:
    """Everything one forward is judged by, against the full-attention forward."""
    positions, ppl_rows = evaluated_positions(seq)
    nll, kl, argmax = (
        np.asarray(x)
        for x in _token_metrics(logits, full_logits, jnp.asarray(seq.tokens[positions + 1]))
    )
    _, rel_error, agreement = compare_logits(logits[ppl_rows], full_logits[ppl_rows])
    answers, offset = {}, ppl_rows.stop
    for probe in seq.probes:
        want = seq.tokens[probe.start : probe.start + probe.length]
        answers.setdefault(probe.task, []).append(
            bool(np.all(argmax[offset : offset + probe.length] == want))
        )
        offset += probe.length
    return dict(
        ppl=float(np.exp(nll[ppl_rows].mean())),
        kl=float(kl[ppl_rows].mean()),
        agreement=float(agreement),
        rel_logit_error=float(rel_error),
        answers=answers,
        continuation=continuation.tolist(),
        greedy_match=float(np.mean(continuation == full_continuation)),
    )


# ----------------------------------------------------------------------------------------
# Curves, interpolation and the summary
# ----------------------------------------------------------------------------------------


def interpolate(xs, ys, x0: float, tolerance: float = 1e-9) -> float | None:
    """Piecewise-linear ``y(x0)`` through the points sorted by x (ties averaged); outside
    their range the nearest end's y if within ``tolerance`` of x0, else None."""
    points = sorted(
        (float(x), float(y))
        for x, y in zip(xs, ys)
        if x is not None and y is not None and np.isfinite(y)
    )
    if not points or not points[0][0] - tolerance <= x0 <= points[-1][0] + tolerance:
        return None
    x, y = map(np.array, zip(*points))
    return float(np.interp(x0, x, y))


def retained(answers: dict, full_answers: dict, tasks) -> float | None:
    """Fraction of the probes full attention answers (in the kept tasks) still answered."""
    pairs = [(a, f) for t in tasks for a, f in zip(answers.get(t, []), full_answers.get(t, []))]
    solved = [a for a, f in pairs if f]
    return float(np.mean(solved)) if solved else None


def summarize_length(result: dict) -> dict:
    """Matched-density and equal-coverage numbers of one length (adds to ``result``)."""
    cov = result["coverage"]
    target = (
        cov["pbs"]["density"][cov["thresholds"].index(HEADLINE_THRESHOLD)]
        if HEADLINE_THRESHOLD in cov["thresholds"]
        else None
    )
    forwards = result["forwards"]
    # A sparse prefill counts as "at" a density within one sink + local window step of it
    # (about 2/(T+1): the window cannot land closer).
    step = 2.0 / (len(cov["windows"]) + 1)
    pbs_headline = [
        f for f in forwards if f["method"] == "pbs" and f["threshold"] == HEADLINE_THRESHOLD
    ]
    if pbs_headline:  # the density PBS really ran at (its q/k differ slightly from full's)
        target = float(np.mean([f["density"] for f in pbs_headline]))
    matched = {}
    for key in [m.key for m in METHODS] + [SINK_LOCAL]:
        curve = cov[key]
        xs = curve["density"]
        points = _runs_by_method(forwards).get(key, [])
        row = dict(
            coverage=interpolate(xs, curve["coverage"], target) if target else None,
            output_error=interpolate(
                curve.get("output_error_density", []), curve.get("output_error", []), target
            )
            if target
            else None,
        )
        for i, name in ((1, "ppl_delta_pct"), (2, "kl"), (3, "retrieval")):
            row[name] = (
                interpolate([p[0] for p in points], [p[i] for p in points], target, tolerance=step)
                if target
                else None
            )
        matched[key] = row
    equal = {}
    for key in [m.key for m in METHODS] + [SINK_LOCAL]:
        equal[key] = interpolate(cov[key]["coverage"], cov[key]["density"], EQUAL_COVERAGE)
    result["matched_density"] = dict(density=target, methods=matched)
    result["equal_coverage"] = dict(
        coverage=EQUAL_COVERAGE,
        density=equal,
        pbs_vs_meanpool=_reduction(equal["meanpool"], equal["pbs"]),
        pbs_plus_vs_antidiagonal=_reduction(equal["antidiagonal"], equal["pbs_plus"]),
    )
    if HEADLINE_THRESHOLD in cov["thresholds"]:
        i = cov["thresholds"].index(HEADLINE_THRESHOLD)
        e = (
            cov["error_thresholds"].index(HEADLINE_THRESHOLD)
            if HEADLINE_THRESHOLD in cov["error_thresholds"]
            else None
        )
        result["at_headline_threshold"] = {
            key: dict(
                density=cov[key]["density"][i],
                coverage=cov[key]["coverage"][i],
                output_error=None if e is None else cov[key]["output_error"][e],
            )
            for key in METHOD_BY_KEY
        }
        result["at_headline_threshold"]["pbs_vs_meanpool_block_reduction"] = _reduction(
            cov["meanpool"]["density"][i], cov["pbs"]["density"][i]
        )
    return result


def _runs_by_method(forwards: list[dict]) -> dict[str, list[tuple]]:
    """``{method: [(density, ppl Δ %, KL, retrieval retained) per threshold or window]}``,
    each averaged over the texts run with that setting."""
    groups = {}
    for f in forwards:
        groups.setdefault((f["method"], f["threshold"], f["window"]), []).append(f)
    points = {}
    for (method, _, _), fs in groups.items():
        points.setdefault(method, []).append(
            (
                float(np.mean([f["density"] for f in fs])),
                float(np.mean([f["ppl_delta_pct"] for f in fs])),
                float(np.mean([f["kl"] for f in fs])),
                _mean_or_none([f["retrieval"] for f in fs]),
            )
        )
    return points


def matched_output_error_by_layer(result: dict) -> dict[str, list]:
    """Each method's per-layer attention-output error interpolated at the matched density
    (PBS's at τ=0.9): ``{method: [error or None per coverage layer]}``."""
    cov, target = result["coverage"], result["matched_density"]["density"]
    out = {}
    for m in METHODS:
        by_layer = np.array(cov[m.key]["output_error_by_layer"])  # [error thresholds, layers]
        out[m.key] = [
            interpolate(cov[m.key]["output_error_density"], column, target) if target else None
            for column in by_layer.T
        ]
    return out


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _reduction(baseline, value):
    """Relative block saving of ``value`` against ``baseline`` (positive: fewer blocks)."""
    if baseline is None or value is None or baseline <= 0:
        return None
    return 1.0 - value / baseline


# ----------------------------------------------------------------------------------------
# Report: markdown and plots
# ----------------------------------------------------------------------------------------


def _fmt(x, spec=".3f", none="—"):
    return none if x is None else format(x, spec)


def write_markdown(summary: dict, path: pathlib.Path) -> None:
    s = summary
    lines = (
        [
            "# Accuracy on a real model: PBS vs block-sparse baselines",
            "",
            f"Made by `python -m experiments.accuracy{' --quick' if s['quick'] else ''}` "
            f"({s['runtime_s'] / 60:.1f} min) on {s['device']}, jax {s['jax']}, {s['date']}. "
            f"Model: {s['model']} ({s['model_shape']}), float32. PBSConfig defaults: block "
            f"{s['block_size']}, segment {s['segment_size']}, GQA replicate; sparse prefills use "
            '`impl="reference"`; decoding is dense.',
            "",
            "Sequences: a real text with retrieval needles planted at 5–60 % depth, then the "
            "questions (teacher-forced answers). Texts: "
            + "; ".join(f"`{k}` = {v}" for k, v in s["texts"].items())
            + ".",
            f"Coverage = fraction of a query's exact attention mass (full-attention forward, every "
            f"layer{'' if s['coverage_layers'] == 'all' else ' in ' + str(s['coverage_layers'])}) "
            f"inside its computed blocks, averaged over heads and over queries sampled as whole "
            f"query blocks (at most {s['coverage_query_blocks']} blocks, evenly spaced, ending at "
            "the last); density = computed blocks / causal blocks; output error = relative error "
            "‖o_sparse − o‖/‖o‖ of those queries' attention outputs when only the selected blocks "
            "are computed (same q/k/v, one layer at a time). Perplexity (ppl) on the last "
            "quarter of the text, KL(full ‖ method) and next-token agreement over the same "
            "positions; retrieval = share of the probes full attention answers that the method "
            "still answers (kept tasks only).",
            "",
            "## Headline",
            "",
        ]
        + [f"- {line}" for line in _headline_text(s).splitlines()[1:]]
        + [
            "",
            f"## Retrieval tasks kept (full-attention accuracy ≥ {MIN_FULL_ACCURACY:.0%})",
            "",
            "| length | passkey | kv | copy | kept |",
            "|---|---|---|---|---|",
        ]
    )
    for n, r in s["lengths"].items():
        acc = r["retrieval_full"]
        lines.append(
            f"| {n} | "
            + " | ".join(
                f"{acc[t]['accuracy']:.0%} ({acc[t]['probes']})" if t in acc else "—"
                for t in ("passkey", "kv", "copy")
            )
            + f" | {', '.join(r['kept_tasks']) or 'none'} |"
        )
    lines += [
        "",
        "## Matched density (each method's curve interpolated at PBS's density at "
        f"τ={HEADLINE_THRESHOLD})",
        "",
        "| length | method | density | coverage | output error | ppl Δ vs full | KL | retrieval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in s["lengths"].items():
        md = r["matched_density"]
        for key, row in md["methods"].items():
            ppl = row["ppl_delta_pct"]
            lines.append(
                f"| {n} | {LABELS[key]} | {_fmt(md['density'])} | "
                f"{_fmt(row['coverage'], '.4f')} | "
                f"{_fmt(row.get('output_error'), '.4f')} | "
                f"{_fmt(ppl, '+.2f')}{'' if ppl is None else ' %'} | "
                f"{_fmt(row['kl'], '.4f')} | {_fmt(row['retrieval'], '.0%')} |"
            )
    lines += [
        "",
        "— : the method's runs do not reach that density (no interpolation outside "
        "the measured range).",
        "",
        "Layers where PBS's attention-output error at the matched density exceeds "
        "MeanPooling's (PBS / MeanPooling / Antidiagonal, heads averaged):",
        "",
    ]
    for n, r in s["lengths"].items():
        matched = matched_output_error_by_layer(r)
        worse = [
            (layer, p, b, a)
            for layer, p, b, a in zip(
                r["coverage"]["layers"],
                matched["pbs"],
                matched["meanpool"],
                matched["antidiagonal"],
            )
            if None not in (p, b) and p > b
        ]
        lines.append(
            f"- {n}: "
            + (
                ", ".join(
                    f"layer {layer} ({p:.3f} / {b:.3f} / {_fmt(a)})" for layer, p, b, a in worse
                )
                or "none"
            )
        )
    lines += [
        "",
        f"## At threshold τ={HEADLINE_THRESHOLD} (coverage pass, full-attention q/k)",
        "",
        "| length | method | density | coverage | output error |",
        "|---|---|---|---|---|",
    ]
    for n, r in s["lengths"].items():
        h = r.get("at_headline_threshold")
        for m in METHODS if h else ():
            lines.append(
                f"| {n} | {LABELS[m.key]} | {h[m.key]['density']:.3f} | "
                f"{h[m.key]['coverage']:.4f} | "
                f"{_fmt(h[m.key].get('output_error'), '.4f')} |"
            )
    lines += [
        "",
        "Blocks PBS saves against MeanPooling at the same threshold: "
        + ", ".join(
            f"{n}: {_fmt(r['at_headline_threshold']['pbs_vs_meanpool_block_reduction'], '+.1%')}"
            for n, r in s["lengths"].items()
            if r.get("at_headline_threshold")
        )
        + " (negative: PBS selects more). The two selectors' softmax domains differ (PBS: "
        "blocks of earlier segments only; MeanPooling: every causal block, the diagonal "
        "included), so one threshold is not one budget.",
    ]
    lines += [
        "",
        f"## Equal coverage ({EQUAL_COVERAGE:.0%}): density each method needs",
        "",
        "| length | "
        + " | ".join(LABELS[k] for k in [m.key for m in METHODS] + [SINK_LOCAL])
        + " | PBS vs MeanPooling | PBS+ vs Antidiagonal |",
        "|---|" + "---|" * (len(METHODS) + 3),
    ]
    for n, r in s["lengths"].items():
        e = r["equal_coverage"]
        lines.append(
            f"| {n} | "
            + " | ".join(_fmt(e["density"][k]) for k in e["density"])
            + f" | {_fmt(e['pbs_vs_meanpool'], '+.1%')} fewer blocks | "
            f"{_fmt(e['pbs_plus_vs_antidiagonal'], '+.1%')} fewer blocks |"
        )
    lines += [
        "",
        "(Paper, Llama-3.1-8B, τ=0.9: 10.7 % fewer blocks at 8K, 14.4 % at 128K.)",
        "",
        f"## PBS at τ={HEADLINE_THRESHOLD} against full attention",
        "",
        "| length | text | density | ppl full | ppl PBS | ppl Δ | KL | next-token "
        "agreement | retrieval (full → PBS) | first greedy tokens identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in s["lengths"].items():
        for f in r["forwards"]:
            if f["method"] == "pbs" and f["threshold"] == HEADLINE_THRESHOLD:
                full = r["full"][f["text"]]
                lines.append(
                    f"| {n} | {f['text']} | {f['density']:.3f} | {full['ppl']:.3f} | "
                    f"{f['ppl']:.3f} | {f['ppl_delta_pct']:+.2f} % | {f['kl']:.4f} | "
                    f"{f['agreement']:.3f} | {_score(full['answers'])} → "
                    f"{_score(f['answers'])} | {f['greedy_match']:.0%} |"
                )
    lines += [
        "",
        "## All sparse prefills",
        "",
        "| length | text | method | τ / window | density | ppl Δ | KL | agreement | "
        "retrieval retained | answers (all tasks; full) | greedy identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in s["lengths"].items():
        for f in r["forwards"]:
            setting = f"W={f['window']}" if f["window"] else f"{f['threshold']}"
            lines.append(
                f"| {n} | {f['text']} | {LABELS[f['method']]} | {setting} | "
                f"{f['density']:.3f} | {f['ppl_delta_pct']:+.2f} % | {f['kl']:.4f} | "
                f"{f['agreement']:.3f} | {_fmt(f['retrieval'], '.0%')} | "
                f"{_score(f['answers'])}; {_score(r['full'][f['text']]['answers'])} | "
                f"{f['greedy_match']:.0%} |"
            )
    if s.get("block_map"):
        b = s["block_map"]
        lines += [
            "",
            "## Block map example",
            "",
            f"Length {b['length']}, text `{b['text']}`, layer {b['layer']}, head "
            f"{b['head']} (the head with the largest density saving of PBS over "
            f"MeanPooling at τ={HEADLINE_THRESHOLD} without losing coverage): "
            f"MeanPooling density {b['meanpool']['density']:.3f} / coverage "
            f"{b['meanpool']['coverage']:.3f}; PBS density {b['pbs']['density']:.3f} / "
            f"coverage {b['pbs']['coverage']:.3f}. (Paper Fig. 3, Llama-3.1-8B at 8K: "
            "82.5 % → 32.3 % density, 91.7 % → 96.4 % coverage.)",
        ]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in s["plots"]), ""]
    path.write_text("\n".join(lines))


def _score(answers: dict) -> str:
    flat = [a for v in answers.values() for a in v]
    return f"{sum(flat)}/{len(flat)}"


def make_plots(summary: dict, out: pathlib.Path, prefix: str) -> list[str]:
    """The four figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(summary["lengths"])
    written = []

    width = max(5.2 * len(lengths), 8.0)
    fig, axes = plt.subplots(2, len(lengths), figsize=(width, 8.2), squeeze=False)
    for col, n in enumerate(lengths):
        cov = summary["lengths"][n]["coverage"]
        ax = axes[0][col]
        for key in [m.key for m in METHODS] + [SINK_LOCAL]:
            ax.plot(
                cov[key]["density"],
                cov[key]["coverage"],
                marker="." if key == SINK_LOCAL else "o",
                ms=3 if key == SINK_LOCAL else 4,
                color=COLORS[key],
                label=LABELS[key],
                lw=1.3,
            )
        ax.axhline(EQUAL_COVERAGE, color="k", lw=0.5, ls=":")
        ax.set(
            title=f"{n} tokens",
            xlabel="block density (computed / causal)",
            ylabel="attention coverage",
            ylim=(max(0.5, ax.get_ylim()[0]), 1.005),
        )
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        for m in METHODS:
            ax.plot(
                cov[m.key]["output_error_density"],
                cov[m.key]["output_error"],
                marker="o",
                ms=4,
                color=COLORS[m.key],
                label=LABELS[m.key],
                lw=1.3,
            )
        ax.set(
            xlabel="block density (computed / causal)",
            yscale="log",
            ylabel="attention output error ‖o′−o‖/‖o‖",
        )
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Coverage (top) and attention-output error (bottom) vs density, thresholds "
        "swept (SmolLM2-135M, mean of layers × heads)"
    )
    fig.tight_layout()
    written.append(_save(fig, out / f"{prefix}_coverage_density.png"))

    fig, axes = plt.subplots(4, len(lengths), figsize=(width, 13.5), squeeze=False, sharex=True)
    for col, n in enumerate(lengths):
        cov = summary["lengths"][n]["coverage"]
        i = (
            cov["thresholds"].index(HEADLINE_THRESHOLD)
            if HEADLINE_THRESHOLD in cov["thresholds"]
            else -1
        )
        e = (
            cov["error_thresholds"].index(cov["thresholds"][i])
            if cov["thresholds"][i] in cov["error_thresholds"]
            else None
        )
        for m in METHODS:
            style = dict(marker="o", ms=3, color=COLORS[m.key], label=LABELS[m.key])
            axes[0][col].plot(cov["layers"], cov[m.key]["density_by_layer"][i], **style)
            axes[1][col].plot(cov["layers"], cov[m.key]["coverage_by_layer"][i], **style)
            if e is not None:
                axes[2][col].plot(cov["layers"], cov[m.key]["output_error_by_layer"][e], **style)
        matched = matched_output_error_by_layer(summary["lengths"][n])
        for m in METHODS:
            axes[3][col].plot(
                cov["layers"],
                [np.nan if x is None else x for x in matched[m.key]],
                marker="o",
                ms=3,
                color=COLORS[m.key],
            )
        target = summary["lengths"][n]["matched_density"]["density"]
        axes[0][col].set(title=f"{n} tokens, τ={cov['thresholds'][i]}", ylabel="block density")
        axes[1][col].set(ylabel="attention coverage")
        axes[2][col].set(ylabel="attention output error", yscale="log")
        axes[3][col].set(
            xlabel="layer", yscale="log", ylabel=f"output error at density {_fmt(target, '.2f')}"
        )
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "Per layer (heads averaged): density, coverage and output error at τ=0.9; "
        "bottom: output error at matched density (PBS's at τ=0.9)"
    )
    fig.tight_layout()
    written.append(_save(fig, out / f"{prefix}_density_by_layer.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    markers = dict(zip(lengths, "os^Dv"))
    for n in lengths:
        for key, points in _runs_by_method(summary["lengths"][n]["forwards"]).items():
            points = sorted(points)
            for ax, column in zip(axes, (1, 2, 3)):
                xs = [p[0] for p in points if p[column] is not None]
                ys = [p[column] for p in points if p[column] is not None]
                ax.plot(xs, ys, color=COLORS[key], marker=markers[n], ms=4, lw=0.9, alpha=0.85)
    for ax, label in zip(
        axes,
        (
            "perplexity Δ vs full (%)",
            "KL(full ‖ method), nats/token",
            "retrieval retained (kept tasks)",
        ),
    ):
        ax.set(xlabel="block density", ylabel=label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[1].set_yscale("log")
    axes[0].axhline(0, color="k", lw=0.5)
    handles = [
        plt.Line2D([], [], color=COLORS[k], marker="o", ls="", label=LABELS[k]) for k in COLORS
    ] + [
        plt.Line2D([], [], color="k", marker=markers[n], ls="", label=f"{n} tokens")
        for n in lengths
    ]
    axes[2].legend(handles=handles, fontsize=7)
    fig.suptitle(
        "Accuracy vs density: sparse prefills against the full-attention prefill "
        "(texts averaged; one line per method and length)"
    )
    fig.tight_layout()
    written.append(_save(fig, out / f"{prefix}_vs_density.png"))

    if summary.get("block_map"):
        info = summary["block_map"]
        masses = {key: np.asarray(info[key]["mass"], np.float64) for key in ("meanpool", "pbs")}
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        vmax = max(float(m.max()) for m in masses.values())
        for ax, key in zip(axes, ("meanpool", "pbs")):
            mass = masses[key]
            masked = np.ma.masked_where(mass <= 0, mass)
            image = ax.imshow(
                masked,
                cmap="magma_r",
                norm=matplotlib.colors.LogNorm(vmin=vmax * 1e-4, vmax=vmax),
                interpolation="nearest",
            )
            skipped = ~np.asarray(info[key]["mask"], bool) & (mass > 0)
            ax.imshow(
                np.ma.masked_where(~skipped, np.ones_like(mass)),
                alpha=0.8,
                cmap=matplotlib.colors.ListedColormap(["white"]),
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            title = "unpermuted keys, MeanPooling" if key == "meanpool" else "permuted keys (PBS)"
            ax.set(
                title=f"{title}\ndensity {info[key]['density']:.1%}, coverage "
                f"{info[key]['coverage']:.1%}",
                xlabel="key block (slot order)",
                ylabel="query block",
            )
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention mass per block (log)")
        fig.suptitle(
            f"Layer {info['layer']}, head {info['head']}, {info['length']} tokens "
            f"({info['text']}): exact attention mass per block; blocks not selected "
            f"at τ={HEADLINE_THRESHOLD} faded"
        )
        written.append(_save(fig, out / f"{prefix}_block_map.png"))
    return written


def _save(fig, path: pathlib.Path) -> str:
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbs-accuracy",
        description=(
            "Accuracy of PBS-Attn against block-sparse baselines (MeanPooling, XAttention-style "
            "anti-diagonal scoring, PBS+ = anti-diagonal on permuted keys, static sink + local "
            "window) on SmolLM2-135M: coverage-density curves from the exact attention of a "
            "full-attention prefill, and perplexity / KL / next-token agreement / retrieval / "
            "greedy continuations of sparse prefills, with plots, a markdown table and JSON."
        ),
        epilog="Thresholded methods get a sparse prefill at every --sweep-thresholds value on "
        "the --sweep-lengths; on the --bracket-lengths at τ=0.9 and at the two "
        "coverage-grid thresholds whose density brackets PBS's τ=0.9 density (so every "
        "method can be interpolated at PBS's density); elsewhere at τ=0.9 only. Sink + "
        "local runs with the window matching PBS's density at each PBS threshold run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1024 tokens, one text, coverage thresholds "
        "0.5/0.9/1.0, every 3rd layer for coverage, 2 probes per task, "
        "PBS swept at 0.5/0.9 and the other methods at 0.9 (under a "
        "minute)",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR", help=f"output folder (default: {RESULTS_DIR})"
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths in tokens (default: 2048 4096 8192)",
    )
    parser.add_argument(
        "--texts-at",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="texts evaluated at each length, in --lengths order (default: "
        "2 2 1: both texts at 2K and 4K, the prose text at 8K)",
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=None,
        help=f"coverage-pass thresholds (default: {' '.join(map(str, COVERAGE_THRESHOLDS))})",
    )
    parser.add_argument(
        "--sweep-lengths",
        type=int,
        nargs="*",
        default=None,
        help="lengths with a sparse prefill at every sweep threshold (default: 2048)",
    )
    parser.add_argument(
        "--sweep-thresholds",
        type=float,
        nargs="+",
        default=None,
        help=f"default: {' '.join(map(str, SWEEP_THRESHOLDS))}",
    )
    parser.add_argument(
        "--sweep-methods",
        nargs="+",
        default=None,
        choices=[m.key for m in METHODS],
        help="methods swept on the --sweep-lengths (default: all); the others run at τ=0.9 there",
    )
    parser.add_argument(
        "--bracket-lengths",
        type=int,
        nargs="*",
        default=None,
        help="lengths with sparse prefills bracketing PBS's τ=0.9 density (default: 4096)",
    )
    parser.add_argument(
        "--coverage-query-blocks",
        type=int,
        default=8,
        help="query blocks sampled per sequence for coverage (default: 8)",
    )
    parser.add_argument(
        "--coverage-layer-stride",
        type=int,
        default=None,
        help="coverage on every k-th layer (default: 1; 3 with --quick)",
    )
    parser.add_argument(
        "--probes-per-task",
        type=int,
        default=None,
        help="retrieval probes per task and sequence (default: length/1024, "
        "at least 3; 2 with --quick)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=32,
        help="greedy tokens decoded after each prefill (default: 32)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="checkpoint (.gguf or HF folder); default: SmolLM2-135M-Instruct",
    )
    parser.add_argument("--seed", type=int, default=0, help="needle placement seed")
    parser.add_argument(
        "--report-only",
        default=None,
        metavar="JSON",
        help="re-render the tables, plots and markdown from the results "
        "JSON of an earlier run (into --out), running no model",
    )
    return parser


def _settings(args) -> dict:
    quick = args.quick
    lengths = args.lengths or ([1024] if quick else [2048, 4096, 8192])
    texts_at = args.texts_at or (
        [1] * len(lengths) if quick else [2 if n <= 4096 else 1 for n in lengths]
    )
    if len(texts_at) != len(lengths):
        raise SystemExit("--texts-at needs one count per length")
    return dict(
        lengths=lengths,
        texts_at=dict(zip(lengths, texts_at)),
        thresholds=tuple(args.thresholds or ((0.5, 0.9, 1.0) if quick else COVERAGE_THRESHOLDS)),
        sweep_lengths=set(
            args.sweep_lengths if args.sweep_lengths is not None else (lengths if quick else [2048])
        ),
        sweep_methods=set(args.sweep_methods or (["pbs"] if quick else [m.key for m in METHODS])),
        sweep_thresholds=tuple(
            args.sweep_thresholds or ((0.5, 0.9) if quick else SWEEP_THRESHOLDS)
        ),
        bracket_lengths=set(
            args.bracket_lengths if args.bracket_lengths is not None else ([] if quick else [4096])
        ),
        layer_stride=args.coverage_layer_stride or (3 if quick else 1),
        out=pathlib.Path(args.out) if args.out else RESULTS_DIR,
        prefix="accuracy_quick" if quick else "accuracy",
    )


def coverage_for_sequence(captured, plan: CoveragePlan, layers) -> tuple[np.ndarray, ...]:
    """(coverage, density, output error), each ``[layers, configs, Hq]``, of one sequence."""
    per_layer = [
        [
            np.asarray(x)
            for x in layer_coverage(
                captured["q"][layer], captured["k"][layer], captured["v"][layer], plan
            )
        ]
        for layer in layers
    ]
    return tuple(np.stack(arrays) for arrays in zip(*per_layer))


def choose_forwards(n: int, settings: dict, coverage: dict) -> list[tuple[str, float, int]]:
    """(method, threshold, window) sparse prefills at length n, from the coverage curves."""
    thresholds = coverage["thresholds"]
    t = num_blocks(n, PBSConfig.block_size)
    pbs_density = dict(zip(thresholds, coverage["pbs"]["density"]))
    headline = HEADLINE_THRESHOLD if HEADLINE_THRESHOLD in pbs_density else thresholds[0]
    runs = [(m.key, headline, 0) for m in METHODS]
    targets = [pbs_density[headline]]
    if n in settings["sweep_lengths"]:
        for m in METHODS:
            if m.key in settings["sweep_methods"]:
                runs += [(m.key, tau, 0) for tau in settings["sweep_thresholds"]]
        targets += [
            pbs_density[tau]
            for tau in settings["sweep_thresholds"]
            if tau in pbs_density and "pbs" in settings["sweep_methods"]
        ]
    elif n in settings["bracket_lengths"]:
        for m in METHODS[1:]:  # the grid thresholds just below and just above the target
            dens = np.array(coverage[m.key]["density"])
            below, above = dens <= targets[0], dens > targets[0]
            if below.any():
                runs.append((m.key, thresholds[int(np.argmax(np.where(below, dens, -1)))], 0))
            if above.any():
                runs.append((m.key, thresholds[int(np.argmin(np.where(above, dens, 9)))], 0))
    windows = sorted({pbs_jax.sink_local_window(t, d) for d in targets})
    runs += [(SINK_LOCAL, None, w) for w in windows]
    return list(dict.fromkeys(runs))  # unique, in order


def attention_for(method: str, threshold: float | None, window: int):
    if method == SINK_LOCAL:
        return SinkLocalAttention(window)
    return PBSAttention(METHOD_BY_KEY[method].config(threshold), impl="reference")


def run(argv: list[str] | None = None) -> dict:
    """Run the study; write ``<out>/<prefix>.{json,md}`` and the plots; return the summary."""
    args = build_parser().parse_args(argv)
    if args.report_only:
        summary = json.loads(pathlib.Path(args.report_only).read_text())
        for n, result in summary["lengths"].items():  # the derived tables, recomputed
            summary["lengths"][n] = summarize_length(result)
        summary["headline"] = _headline(summary)
        out = pathlib.Path(args.out) if args.out else RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        write_report(summary, out, pathlib.Path(args.report_only).stem)
        return summary
    settings = _settings(args)
    out, prefix = settings["out"], settings["prefix"]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model, tokenizer = load_pretrained(args.model, progress=False)
    runner = JittedLlama(model)
    config = model.config
    del model
    texts = load_texts()
    layers = list(range(0, config.num_layers, settings["layer_stride"]))

    # One progress step per prefill (full or sparse) and per coverage pass; the sparse
    # prefills of a length are only known after its coverage pass, so the total is refined.
    progress = tqdm(
        total=sum(2 * settings["texts_at"][n] for n in settings["lengths"]),
        desc="accuracy",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    summary = dict(
        **stamp(),
        quick=args.quick,
        model=args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        model_shape=f"{config.num_layers} layers, {config.num_heads} query / "
        f"{config.num_kv_heads} KV heads, head dim {config.head_dim}",
        block_size=PBSConfig.block_size,
        segment_size=PBSConfig.segment_size,
        texts={k: v[0] for k, v in texts.items()},
        coverage_layers="all" if settings["layer_stride"] == 1 else layers,
        coverage_query_blocks=args.coverage_query_blocks,
        lengths={},
    )
    summary["device"] = (
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        if jax.default_backend() == "cpu"
        else summary["device"]
    )

    for n in settings["lengths"]:
        result, captured_last = evaluate_length(
            runner, tokenizer, texts, n, settings, layers, progress, args
        )
        summary["lengths"][str(n)] = result
        if n == settings["lengths"][-1]:
            summary["block_map"] = _block_map(captured_last, result["coverage"])
        del captured_last
    progress.close()

    summary["runtime_s"] = time.perf_counter() - started
    summary["headline"] = _headline(summary)
    write_report(summary, out, prefix)
    return summary


def write_report(summary: dict, out: pathlib.Path, prefix: str) -> None:
    """Plots, ``<prefix>.json`` and ``<prefix>.md`` from a summary; prints the headline."""
    summary["plots"] = make_plots(summary, out, prefix)
    (out / f"{prefix}.json").write_text(_json_text(_rounded(summary)))
    write_markdown(summary, out / f"{prefix}.md")
    print(_headline_text(summary))


def evaluate_length(
    runner, tokenizer, texts: dict, n: int, settings: dict, layers: list, progress, args
) -> tuple[dict, tuple]:
    """Everything measured at one length: the full prefills with the coverage pass, then the
    sparse prefills chosen from the coverage curves. Returns (the length's summary, the last
    sequence and its captured q/k/v, for the block map)."""
    per_task = args.probes_per_task or (2 if args.quick else max(3, n // 1024))
    sequences = [
        build_sequence(tokenizer, name, texts[name][1], n, per_task, seed=args.seed + 1000 * i + n)
        for i, name in enumerate(list(texts)[: settings["texts_at"][n]])
    ]
    windows = tuple(range(1, num_blocks(n, PBSConfig.block_size) + 1))
    plan = CoveragePlan(
        sampled_query_rows(n, PBSConfig.block_size, args.coverage_query_blocks),
        METHODS,
        settings["thresholds"],
        windows,
        tuple(t for t in settings["thresholds"] if t in ERROR_THRESHOLDS),
    )
    full, coverage_runs, captured_last = {}, [], None
    for seq in sequences:
        progress.set_postfix_str(f"{n} tokens, {seq.text}: full prefill + capture")
        logits, continuation, captured = run_forward(
            runner, seq, CaptureAttention(), args.new_tokens
        )
        full[seq.text] = dict(
            logits=logits, **forward_metrics(seq, logits, logits, continuation, continuation)
        )
        progress.update()
        progress.set_postfix_str(f"{n} tokens, {seq.text}: coverage of {len(layers)} layers")
        coverage_runs.append(coverage_for_sequence(captured, plan, layers))
        captured_last = (seq, captured)
        progress.update()
    coverage = _coverage_curves(
        *(np.mean(runs, axis=0) for runs in zip(*coverage_runs)), plan, layers
    )

    runs = choose_forwards(n, settings, coverage)
    progress.total += len(runs) * len(sequences)
    progress.refresh()
    forwards = []
    for seq in sequences:
        reference = full[seq.text]
        for method, threshold, window in runs:
            setting = f"W={window}" if window else f"τ={threshold}"
            progress.set_postfix_str(f"{n} tokens, {seq.text}: {method} {setting}")
            logits, continuation, density = run_forward(
                runner, seq, attention_for(method, threshold, window), args.new_tokens
            )
            metrics = forward_metrics(
                seq,
                logits,
                reference["logits"],
                continuation,
                np.asarray(reference["continuation"]),
            )
            density = np.asarray(density)
            forwards.append(
                dict(
                    method=method,
                    threshold=threshold,
                    window=window,
                    text=seq.text,
                    density=float(density.mean()),
                    density_by_layer=density.tolist(),
                    **metrics,
                )
            )
            progress.update()

    retrieval_full, kept = {}, []
    for task in ("passkey", "kv", "copy"):
        answers = [a for f in full.values() for a in f["answers"].get(task, [])]
        retrieval_full[task] = dict(accuracy=float(np.mean(answers)), probes=len(answers))
        if retrieval_full[task]["accuracy"] >= MIN_FULL_ACCURACY:
            kept.append(task)
    for f in forwards:
        reference = full[f["text"]]
        f["ppl_delta_pct"] = 100.0 * (f["ppl"] / reference["ppl"] - 1.0)
        f["retrieval"] = retained(f["answers"], reference["answers"], kept)
    result = dict(
        sequences=[
            dict(
                text=s.text,
                tokens=len(s.tokens),
                text_end=s.text_end,
                ppl_positions=[s.ppl_start, s.text_end],
                probes=[dataclasses.asdict(p) for p in s.probes],
            )
            for s in sequences
        ],
        full={name: {k: v for k, v in f.items() if k != "logits"} for name, f in full.items()},
        retrieval_full=retrieval_full,
        kept_tasks=kept,
        coverage=coverage,
        forwards=forwards,
        runs=[list(r) for r in runs],
    )
    return summarize_length(result), captured_last


def _coverage_curves(
    coverage: np.ndarray, density: np.ndarray, error: np.ndarray, plan: CoveragePlan, layers
) -> dict:
    """Per-method curves from ``[layers, configs, Hq]`` arrays (as :func:`layer_coverage`
    orders configs): means over layers and heads, per-layer means, per (layer, head) values;
    the output error at ``plan.error_thresholds`` with the densities it goes with."""
    curves = dict(
        thresholds=list(plan.thresholds),
        windows=list(plan.windows),
        error_thresholds=list(plan.error_thresholds),
        layers=list(layers),
    )
    nt, ne = len(plan.thresholds), len(plan.error_thresholds)
    for i, m in enumerate(plan.methods):
        c, d = coverage[:, i * nt : (i + 1) * nt], density[:, i * nt : (i + 1) * nt]
        e = error[:, i * ne : (i + 1) * ne]
        at_error = [plan.thresholds.index(t) for t in plan.error_thresholds]
        curves[m.key] = dict(
            coverage=c.mean(axis=(0, 2)).tolist(),
            density=d.mean(axis=(0, 2)).tolist(),
            coverage_by_layer=c.mean(axis=2).T.tolist(),
            density_by_layer=d.mean(axis=2).T.tolist(),
            coverage_by_layer_head=c.tolist(),
            density_by_layer_head=d.tolist(),
            output_error=e.mean(axis=(0, 2)).tolist(),
            output_error_density=d[:, at_error].mean(axis=(0, 2)).tolist(),
            output_error_by_layer=e.mean(axis=2).T.tolist(),
        )
    c, d = coverage[:, len(plan.methods) * nt :], density[:, len(plan.methods) * nt :]
    curves[SINK_LOCAL] = dict(
        coverage=c.mean(axis=(0, 2)).tolist(), density=d.mean(axis=(0, 2)).tolist()
    )
    return curves


def _block_map(captured_last, coverage: dict) -> dict | None:
    """The paper's Fig. 3 for one layer and head of the last sequence: block attention mass
    with unpermuted keys (MeanPooling's blocks) and with PBS's permutation (PBS's blocks).

    The head: the largest MeanPooling − PBS density gap at τ=0.9 among (layer, head) pairs
    where PBS keeps at least MeanPooling's coverage (coverage-pass numbers).
    """
    seq, captured = captured_last
    thresholds = coverage["thresholds"]
    if HEADLINE_THRESHOLD not in thresholds:
        return None
    i = thresholds.index(HEADLINE_THRESHOLD)
    gap = (
        np.array(coverage["meanpool"]["density_by_layer_head"])[:, i]
        - np.array(coverage["pbs"]["density_by_layer_head"])[:, i]
    )  # [layers, Hq]
    ok = (
        np.array(coverage["pbs"]["coverage_by_layer_head"])[:, i]
        >= np.array(coverage["meanpool"]["coverage_by_layer_head"])[:, i] - 1e-3
    )
    gap = np.where(ok, gap, -np.inf)
    layer_index, head = np.unravel_index(np.argmax(gap), gap.shape)
    layer = coverage["layers"][layer_index]
    q, k = captured["q"][layer], captured["k"][layer]  # [1, N, H, D]
    info = dict(length=len(seq.tokens), text=seq.text, layer=int(layer), head=int(head))
    for key in ("meanpool", "pbs"):
        cfg = METHOD_BY_KEY[key].config(HEADLINE_THRESHOLD)
        perm, mask = pbs_jax.pbs_plan(q, k, cfg)
        hp = perm.shape[1]
        head_perm = perm[0, head // (q.shape[2] // hp)]
        mass = np.asarray(block_attention_map(q[0], k[0], head_perm, int(head), cfg.block_size))
        head_mask = np.asarray(mask[0, head])
        info[key] = dict(
            density=float(pbs_jax.density(mask[:, head : head + 1])[0, 0]),
            coverage=float(mass[head_mask].sum()),
            mass=mass.tolist(),
            mask=head_mask.astype(int).tolist(),
        )
    return info


def _json_text(tree) -> str:
    """Indented JSON with every list of plain values (no strings or nesting) on one line."""
    return re.sub(
        r'\[[^\[\]{}"]*\]', lambda m: re.sub(r"\s+", " ", m.group(0)), json.dumps(tree, indent=1)
    )


def _rounded(tree, digits: int = 6):
    """The summary with floats rounded to ``digits`` significant digits (a readable JSON)."""
    if isinstance(tree, float):
        return float(f"{tree:.{digits}g}")
    if isinstance(tree, dict):
        return {k: _rounded(v, digits) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_rounded(v, digits) for v in tree]
    return tree


def _headline(summary: dict) -> dict:
    head = {}
    for n, r in summary["lengths"].items():
        pbs = [
            f
            for f in r["forwards"]
            if f["method"] == "pbs" and f["threshold"] == HEADLINE_THRESHOLD
        ]
        head[n] = dict(
            equal_coverage_block_saving_pbs_vs_meanpool=r["equal_coverage"]["pbs_vs_meanpool"],
            tau09_block_saving_pbs_vs_meanpool=r.get("at_headline_threshold", {}).get(
                "pbs_vs_meanpool_block_reduction"
            ),
            pbs_tau09_density=_mean_or_none([f["density"] for f in pbs]),
            pbs_tau09_ppl_delta_pct=_mean_or_none([f["ppl_delta_pct"] for f in pbs]),
            pbs_tau09_retrieval_retained=_mean_or_none([f["retrieval"] for f in pbs]),
            pbs_tau09_greedy_match=_mean_or_none([f["greedy_match"] for f in pbs]),
            kept_tasks=r["kept_tasks"],
        )
    return head


def _headline_text(summary: dict) -> str:
    lines = [f"accuracy study done in {summary['runtime_s'] / 60:.1f} min"]
    for n, h in summary["headline"].items():
        lines.append(
            f"{n} tokens: PBS τ=0.9 density {_fmt(h['pbs_tau09_density'])}, ppl Δ "
            f"{_fmt(h['pbs_tau09_ppl_delta_pct'], '+.2f')} %, retrieval retained "
            f"{_fmt(h['pbs_tau09_retrieval_retained'], '.0%')}, greedy identical "
            f"{_fmt(h['pbs_tau09_greedy_match'], '.0%')}; blocks saved vs MeanPooling: "
            f"{_fmt(h['equal_coverage_block_saving_pbs_vs_meanpool'], '+.1%')} at "
            f"{EQUAL_COVERAGE:.0%} coverage, "
            f"{_fmt(h['tau09_block_saving_pbs_vs_meanpool'], '+.1%')} at τ=0.9; "
            f"kept tasks: {', '.join(h['kept_tasks']) or 'none'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Console entry point; returns the summary (also written to JSON)."""
    return run(argv)


if __name__ == "__main__":
    main()
