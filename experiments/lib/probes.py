"""Evaluation inputs on real text: the texts, the retrieval needles and questions, and the
evaluation sequences built from them (exactly N tokens, needles planted, questions after).

A sequence is ``text with needles | questions``; the perplexity region is the needle-free last
quarter of the text, and every question's answer tokens (teacher-forced) are one :class:`Probe`.
The needles and questions also stand alone (:func:`retrieval_items`) for studies that ask the
questions as prompts and generate the answers.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
from typing import NamedTuple

import numpy as np

TASKS = ("passkey", "kv", "copy")
NEEDLE_DEPTHS = (0.05, 0.6)  # needles live in this fraction of the text; the last quarter is clean
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


class Question(NamedTuple):
    """One retrieval question: ``prefix`` asks, ``answer`` is what the needle said, ``suffix``
    closes the line (``prefix + answer + suffix`` is the full question line)."""

    task: str  # one of TASKS
    prefix: str
    answer: str
    suffix: str


@dataclasses.dataclass(frozen=True)
class Probe:
    """One question inside a sequence: its answer is ``tokens[start : start + length]``."""

    task: str  # one of TASKS
    start: int
    length: int


@dataclasses.dataclass(frozen=True)
class EvalSequence:
    """A real text with planted needles, then the questions: ``tokens [N]`` int32.

    ``text``: the text's name; ``text_end``: first position of the question part; the
    perplexity region is the last quarter of ``[0, text_end)`` (needle-free by construction).
    """

    text: str
    tokens: np.ndarray
    text_end: int
    probes: tuple[Probe, ...]

    @property
    def ppl_start(self) -> int:
        return self.text_end - self.text_end // 4

    def answer_tokens(self, probe: Probe) -> np.ndarray:
        """``[probe.length]`` int32: the tokens the probe's answer must reproduce."""
        return self.tokens[probe.start : probe.start + probe.length]


def evaluated_positions(seq: EvalSequence) -> tuple[np.ndarray, slice]:
    """Positions whose logits are scored: the perplexity region, then every answer token.

    Returns (positions ``[P]`` predicting ``tokens[positions + 1]``, the perplexity rows).
    """
    ppl = np.arange(seq.ppl_start - 1, seq.text_end - 1)
    answers = [np.arange(p.start - 1, p.start + p.length - 1) for p in seq.probes]
    return np.concatenate([ppl] + answers), slice(0, len(ppl))


_COLORS = tuple(
    "red blue green yellow purple orange silver golden black white brown pink grey violet amber "
    "crimson".split()
)
_THINGS = tuple(
    "door box gate chest locker vault cabinet drawer safe trunk crate closet shed cellar attic "
    "garage".split()
)
_NAMES = tuple(
    "Alice Bruno Chen Dara Emeka Fatima Goran Hiro Ingrid Jamal Kofi Lena Mateo Nadia Oskar "
    "Priya Quinn Rosa".split()
)
_ADJECTIVES = tuple(
    "quiet ancient clever tiny restless silver patient brave hollow curious gentle frozen".split()
)
_NOUNS = tuple(
    "fox lantern violin sailor orchard kettle comet library bicycle harbor pigeon meadow".split()
)
_VERBS = tuple(
    "carried painted followed repaired borrowed guarded counted forgot polished hid".split()
)


def retrieval_items(
    rng: np.random.Generator, per_task: int
) -> tuple[list[list[str]], list[Question]]:
    """``per_task`` questions of each task (shuffled) and the needles that answer them.

    A needle is a list of string pieces, tokenized piece by piece so that an answer has the
    same tokens in its needle and in its question: pass keys (one needle per question), one
    JSON key-value store (three pairs per question: two distractors each), and sentences to
    copy verbatim (one needle per question).
    """
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
        questions.append(Question("passkey", f"The pass key of {label} is", key, ".\n"))
    hexchars = np.array(list("0123456789abcdef"))
    pairs = ["".join(rng.choice(hexchars, 6)) for _ in range(6 * per_task)]
    pairs = list(zip(pairs[::2], pairs[1::2]))  # 3 pairs per question: 2 distractors each
    store = ["\nA key-value store in JSON: {"]
    for i, (key, value) in enumerate(pairs):
        store += [f'{", " if i else ""}"{key}": "', value, '"']
    needles.append(store + ["}\n"])
    for i in rng.choice(len(pairs), per_task, replace=False):
        key, value = pairs[i]
        questions.append(
            Question("kv", f'In the JSON store, the value of "{key}" is "', value, '".\n')
        )
    for name in rng.permutation(_NAMES)[:per_task]:
        adj1, adj2 = rng.choice(_ADJECTIVES, 2, replace=False)
        noun1, noun2 = rng.choice(_NOUNS, 2, replace=False)
        sentence = f"the {adj1} {noun1} {rng.choice(_VERBS)} the {adj2} {noun2}"
        needles.append([f'\n{name} wrote in the margin: "', sentence, '".\n'])
        questions.append(Question("copy", f'{name} wrote in the margin: "', sentence, '".\n'))
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
    needles, questions = retrieval_items(rng, per_task)
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
        text_name, tokens, len(body), tuple(Probe(t, len(body) + s, n) for t, s, n in probes_rel)
    )
    assert last_needle_end <= sequence.ppl_start, "needles must stay out of the perplexity region"
    return sequence
