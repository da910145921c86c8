"""Retrieval probes answered the way users run the model: one needle in a real text, a question
at the end, the answer *generated* (sparse prefill, dense greedy decode), scored by exact match.

Three tasks, each planted at depths of 10%, 50% and 90% of the text:

- ``passkey``: "The pass key of the red door is 48213." — asked "The pass key of the red door is";
- ``kv``: a JSON store of four ``"hex": "hex"`` pairs — asked for the value of one key;
- ``copy``: a sentence quoted in "the margin" — asked to repeat it.

Every prompt is exactly ``length`` tokens (the text is cut to fit), so one compiled prefill
serves every probe of a length. Pieces are tokenized separately, so the answer has the same
tokens in the needle and after the question.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TASKS = ("passkey", "kv", "copy")
DEPTHS = (0.1, 0.5, 0.9)
_COLORS = ("red", "blue", "green", "amber", "violet", "silver", "golden", "crimson", "grey")
_THINGS = ("door", "box", "gate", "chest", "vault", "cabinet", "drawer", "trunk", "cellar")
_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima", "Hiro", "Ingrid", "Lena", "Oskar")
_ADJECTIVES = ("quiet", "ancient", "clever", "tiny", "restless", "patient", "hollow", "gentle")
_NOUNS = ("fox", "lantern", "violin", "sailor", "orchard", "kettle", "comet", "harbor", "pigeon")
_VERBS = ("carried", "painted", "followed", "repaired", "borrowed", "guarded", "polished")


@dataclasses.dataclass(frozen=True)
class RetrievalProbe:
    """One prompt ``tokens [length]`` int32 whose greedy continuation should start with
    ``answer``; the needle starts at token ``needle_start`` (``depth`` of the text)."""

    task: str
    depth: float
    text_name: str
    tokens: np.ndarray
    answer: tuple[int, ...]
    needle_start: int


def _needle_and_question(task: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(needle pieces, question pieces); the answer is the last question piece and also a
    piece of the needle."""
    if task == "passkey":
        label = f"the {rng.choice(_COLORS)} {rng.choice(_THINGS)}"
        key = f" {rng.integers(10_000, 100_000)}"
        needle = [f"\nThe pass key of {label} is", key, f". Remember it: the pass key of {label}."]
        return needle + ["\n"], [f"\nThe pass key of {label} is", key]
    if task == "kv":
        hexchars = np.array(list("0123456789abcdef"))
        pairs = [
            ("".join(rng.choice(hexchars, 6)), "".join(rng.choice(hexchars, 6))) for _ in "abcd"
        ]
        needle = ["\nA key-value store in JSON: {"]
        for i, (key, value) in enumerate(pairs):
            needle += [f'{", " if i else ""}"{key}": "', value, '"']
        key, value = pairs[rng.integers(len(pairs))]
        return needle + ["}\n"], [f'\nIn the JSON store, the value of "{key}" is "', value]
    if task == "copy":
        name = rng.choice(_NAMES)
        adjectives, nouns = (
            rng.choice(_ADJECTIVES, 2, replace=False),
            rng.choice(_NOUNS, 2, replace=False),
        )
        sentence = (
            f"the {adjectives[0]} {nouns[0]} {rng.choice(_VERBS)} the {adjectives[1]} {nouns[1]}"
        )
        needle = [f'\n{name} wrote in the margin: "', sentence, '".\n']
        return needle, [f'\nQuestion: what did {name} write in the margin?\nAnswer: "', sentence]
    raise ValueError(f"unknown retrieval task {task!r}; expected one of {TASKS}")


def make_probe(
    tokenizer,
    text_name: str,
    text_ids: list[int],
    length: int,
    task: str,
    depth: float,
    rng: np.random.Generator,
) -> RetrievalProbe:
    """One probe of exactly ``length`` tokens from a tokenized real text."""
    needle, question = _needle_and_question(task, rng)
    needle_ids = sum((tokenizer.encode(p) for p in needle), [])
    *prefix, answer = question
    question_ids = sum((tokenizer.encode(p) for p in prefix), [])
    answer_ids = tokenizer.encode(answer)
    budget = length - len(needle_ids) - len(question_ids)
    if budget < length // 2 or len(text_ids) < budget:
        raise ValueError(f"{text_name}: too short for a {length}-token probe")
    offset = int(rng.integers(0, len(text_ids) - budget + 1))  # a different window each probe
    body = text_ids[offset : offset + budget]
    cut = int(depth * len(body))
    tokens = np.asarray(body[:cut] + needle_ids + body[cut:] + question_ids, np.int32)
    assert len(tokens) == length
    return RetrievalProbe(task, depth, text_name, tokens, tuple(answer_ids), cut)


def make_probes(
    tokenizer, texts: dict[str, list[int]], length: int, per_cell: int, seed: int = 0
) -> list[RetrievalProbe]:
    """``per_cell`` probes for every (task, depth) pair, texts taken in turn."""
    rng = np.random.default_rng([seed, length])
    names = sorted(texts)
    probes = []
    for i, (task, depth, _) in enumerate(
        (t, d, r) for t in TASKS for d in DEPTHS for r in range(per_cell)
    ):
        name = names[i % len(names)]
        probes.append(make_probe(tokenizer, name, texts[name], length, task, depth, rng))
    return probes


def exact_matches(generated: np.ndarray, probes: list[RetrievalProbe]) -> np.ndarray:
    """``generated [P, M]`` greedy tokens → ``[P]`` bool: the continuation starts with the
    answer."""
    return np.array(
        [tuple(row[: len(p.answer)].tolist()) == p.answer for row, p in zip(generated, probes)]
    )
