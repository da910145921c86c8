"""The user-path accuracy study (experiments/accuracy.py): probes, scoring, the kept count, and a
quick end-to-end run on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import accuracy
from experiments.lib import retrieval


class CharTokenizer:
    """One token per character: pieces tokenized apart concatenate exactly."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def _find(haystack: np.ndarray, needle: tuple[int, ...]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if tuple(haystack[i : i + n]) == needle]


@pytest.mark.parametrize("task", retrieval.TASKS)
@pytest.mark.parametrize("depth", retrieval.DEPTHS)
def test_probe_is_exactly_n_tokens_with_the_answer_in_its_needle(task, depth):
    text = CharTokenizer().encode("lorem ipsum dolor sit amet\n" * 200)
    rng = np.random.default_rng(0)
    p = retrieval.make_probe(CharTokenizer(), "prose", text, 1000, task, depth, rng)
    assert p.tokens.shape == (1000,) and p.tokens.dtype == np.int32
    hits = _find(p.tokens, p.answer)
    assert hits and all(h >= p.needle_start for h in hits)  # only in the needle
    # The needle sits at the asked depth of the text part (needle + question < 150 characters).
    assert abs(p.needle_start - depth * 1000) <= 150
    # The prompt ends with the question, so the answer is the continuation, not in the prompt
    # tail.
    assert _find(p.tokens[-20:], p.answer) == []


def test_probes_cover_every_task_and_depth():
    text = CharTokenizer().encode("abc def ghi\n" * 500)
    probes = retrieval.make_probes(CharTokenizer(), {"a": text, "b": text}, 800, per_cell=2)
    cells = [(p.task, p.depth) for p in probes]
    assert len(probes) == 2 * len(retrieval.TASKS) * len(retrieval.DEPTHS)
    assert all(cells.count(c) == 2 for c in set(cells))
    assert {p.text_name for p in probes} == {"a", "b"}


def test_exact_match_needs_the_whole_answer_as_prefix():
    text = CharTokenizer().encode("x y z\n" * 300)
    probe = retrieval.make_probe(
        CharTokenizer(), "t", text, 400, "passkey", 0.5, np.random.default_rng(1)
    )
    answer = list(probe.answer)
    generated = np.array(
        [answer + [1], [answer[0] + 1] + answer[1:] + [1], answer[:-1] + [0, 0]], np.int32
    )
    np.testing.assert_array_equal(
        retrieval.exact_matches(generated, [probe] * 3), [True, False, False]
    )


def test_summary_counts_kept_answers_among_full_attentions():
    """Kept = correct for the rule AND for full attention; ΔNLL against full at each N."""
    payload = {
        "rules": {"full": {"label": "full"}, "r": {"label": "rule"}},
        "results": [
            dict(
                rule="full",
                length=8,
                density=1.0,
                nll=2.0,
                correct=[True, True, False],
                tasks=["kv"] * 3,
                seconds=0.0,
            ),
            dict(
                rule="r",
                length=8,
                density=0.4,
                nll=2.5,
                correct=[True, False, True],
                tasks=["kv"] * 3,
                seconds=0.0,
            ),
        ],
    }
    full, rule = accuracy.summarize(payload)
    assert rule.kept == {8: (1, 2)} and rule.correct == {8: 2}
    assert rule.retained == 0.5 and full.retained == 1.0
    assert rule.delta_nll == {8: 0.5} and rule.mean_density == 0.4


@pytest.mark.pretrained
@pytest.mark.slow
def test_quick_run_on_the_real_model(tmp_path, smollm2, monkeypatch):
    """The CPU smoke run: three rules on short prompts through prefill + dense decode; full
    attention keeps all of its own answers, and the report re-renders from its JSON.

    Probes at one depth (one per task: 3 prompts per rule instead of 9): the other depths take
    the same path, and the probe tests above place needles at every depth."""
    monkeypatch.setattr(retrieval, "DEPTHS", (0.5,))
    summaries = accuracy.main(["--quick", "--out", str(tmp_path)], model=smollm2)
    by_rule = {s.rule: s for s in summaries}
    assert set(by_rule) == set(accuracy.QUICK_RULES)
    assert by_rule["full"].retained == 1.0 and by_rule["full"].mean_density == 1.0
    for s in summaries:
        assert 0 < s.mean_density <= 1.0 and np.isfinite(s.mean_delta_nll)
    first = (tmp_path / "accuracy.md").read_text()
    payload = json.loads((tmp_path / "accuracy.json").read_text())
    assert payload["impl"] == "reference"
    accuracy.main(["--report", str(tmp_path / "accuracy.json"), "--out", str(tmp_path)])
    assert (tmp_path / "accuracy.md").read_text() == first
