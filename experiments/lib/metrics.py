"""How outputs are judged: the one relative error of the repository, next-token metrics of a
forward against a reference forward (perplexity, KL, agreement, retrieval answers, greedy
continuation), and the small arithmetic the studies summarise with (interpolation at a density,
relative block savings, retrieval retained)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib.probes import TASKS, EvalSequence, evaluated_positions


def rel_err(x, ref) -> float:
    """Relative L2 error ‖x − ref‖ / ‖ref‖ over all elements, in float32 on the arrays' device
    (no host copy of a large GPU output); 0 / 0 counts as 0.

    The correctness check of every benchmark and test: any shapes that broadcast, any dtypes.
    """
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


@jax.jit
def token_metrics(logits: jax.Array, reference_logits: jax.Array, targets: jax.Array):
    """logits, reference_logits ``[P, V]``, targets ``[P]`` int → (NLL of the targets,
    KL(reference ‖ this), argmax), each ``[P]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    ref_logp = jax.nn.log_softmax(reference_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return nll, kl, jnp.argmax(logits, axis=-1)


def argmax_agreement(logits, reference_logits) -> float:
    """Share of positions whose argmax token matches the reference's: logits ``[P, V]``."""
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference_logits, -1)))


def answers_correct(seq: EvalSequence, predicted: np.ndarray) -> dict[str, list[bool]]:
    """``{task: [probe answered exactly, per probe in sequence order]}``.

    ``predicted [Σ probe lengths]``: the predicted tokens of every probe's answer, probes
    concatenated in ``seq.probes`` order (teacher-forced argmax, or generated tokens).
    """
    answers, offset = {}, 0
    for probe in seq.probes:
        got = predicted[offset : offset + probe.length]
        answers.setdefault(probe.task, []).append(bool(np.all(got == seq.answer_tokens(probe))))
        offset += probe.length
    return answers


@dataclasses.dataclass(frozen=True)
class ForwardMetrics:
    """One forward judged against a reference forward of the same sequence.

    ppl: perplexity over the perplexity region; kl: mean KL(reference ‖ this) there;
    agreement: next-token argmax agreement there; rel_logit_error: relative L2 error of the
    logits there; answers: ``{task: [correct per probe]}`` (teacher-forced argmax);
    continuation: greedy tokens after the text; greedy_match: share equal to the reference's.
    """

    ppl: float
    kl: float
    agreement: float
    rel_logit_error: float
    answers: dict[str, list[bool]]
    continuation: list[int]
    greedy_match: float


def forward_metrics(
    seq: EvalSequence, logits, reference_logits, continuation, reference_continuation
) -> ForwardMetrics:
    """Everything one forward is judged by. logits, reference_logits ``[P, V]`` at
    :func:`~experiments.lib.probes.evaluated_positions`; continuations ``[new tokens]`` int."""
    positions, ppl_rows = evaluated_positions(seq)
    nll, kl, argmax = (
        np.asarray(x)
        for x in token_metrics(logits, reference_logits, jnp.asarray(seq.tokens[positions + 1]))
    )
    continuation = np.asarray(continuation)
    return ForwardMetrics(
        ppl=float(np.exp(nll[ppl_rows].mean())),
        kl=float(kl[ppl_rows].mean()),
        agreement=argmax_agreement(logits[ppl_rows], reference_logits[ppl_rows]),
        rel_logit_error=rel_err(logits[ppl_rows], reference_logits[ppl_rows]),
        answers=answers_correct(seq, argmax[ppl_rows.stop :]),
        continuation=continuation.tolist(),
        greedy_match=float(np.mean(continuation == np.asarray(reference_continuation))),
    )


@dataclasses.dataclass(frozen=True)
class TaskAccuracy:
    """Share of one task's probes answered, over how many probes."""

    accuracy: float
    probes: int


def task_accuracy(answers: list[dict[str, list[bool]]]) -> dict[str, TaskAccuracy]:
    """``{task: accuracy}`` over several sequences' answers (every task of :data:`TASKS`)."""
    out = {}
    for task in TASKS:
        flat = [a for answer in answers for a in answer.get(task, [])]
        out[task] = TaskAccuracy(float(np.mean(flat)), len(flat))
    return out


def retained(answers: dict, reference_answers: dict, tasks) -> float | None:
    """Share of the probes the reference answers (in ``tasks``) that are still answered."""
    pairs = [
        (a, f) for t in tasks for a, f in zip(answers.get(t, []), reference_answers.get(t, []))
    ]
    solved = [a for a, f in pairs if f]
    return float(np.mean(solved)) if solved else None


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


def mean_or_none(values) -> float | None:
    """Mean of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def reduction(baseline, value) -> float | None:
    """Relative block saving of ``value`` against ``baseline`` (positive: fewer blocks)."""
    if baseline is None or value is None or baseline <= 0:
        return None
    return 1.0 - value / baseline
