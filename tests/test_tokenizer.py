"""Tokenizer from GGUF metadata (real SmolLM2 and a tiny synthetic one) and from tokenizer.json."""

from __future__ import annotations

import inspect
import json
import json.decoder
import os

import numpy as np
import pytest

from models import JittedLlama, Tokenizer, default_checkpoint_path, load_pretrained
from models.testing import random_hf_weights, write_gguf, write_safetensors_folder
from models.tokenizer import render_chatml
from tests.conftest import MERGES, TINY_WITH_VOCAB, TOKENS

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import gguf

    return Tokenizer.from_gguf(gguf.GGUFReader(default_checkpoint_path()))


SAMPLES = [
    "The capital of France is",
    "  def f(x):\n\treturn x**2  # 12345 ünïcödé 日本語 🙂\r\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.mark.pretrained
def test_smollm2_tokenizer_round_trips(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    source = open(inspect.getsourcefile(json.decoder)).read()
    for text in SAMPLES + [source]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    # Control tokens are matched whole, and digits are split one by one (StarCoder style).
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert len(tok.encode("12345")) == 5
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id


@pytest.mark.pretrained
def test_smollm2_chat_template(smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert smollm2_tokenizer.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert render_chatml([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )


def test_tiny_gguf_and_folder_load_pretrained(tmp_path):
    weights = random_hf_weights(TINY_WITH_VOCAB, seed=9)
    path = write_gguf(
        tmp_path / "tiny.gguf",
        TINY_WITH_VOCAB,
        weights,
        tokens=TOKENS,
        merges=MERGES,
        token_types=[3] * 3 + [1] * (len(TOKENS) - 3),
        chat_template=CHATML_TEMPLATE,
    )
    model, tok = load_pretrained(path, progress=False)
    assert model.config == TINY_WITH_VOCAB
    the_cat = tok.encode("the cat")
    assert the_cat == [TOKENS.index("the"), TOKENS.index("Ġcat")]
    assert tok.encode("<|im_end|>the") == [2, TOKENS.index("the")]
    assert tok.decode(tok.encode("a théorème, 42!")) == "a théorème, 42!"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\nx"
    )

    # The same model as an HF folder: tokenizer.json + tokenizer_config.json.
    folder = write_safetensors_folder(tmp_path / "hf", TINY_WITH_VOCAB, weights)
    tok.backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "chat_template": CHATML_TEMPLATE,
            },
            f,
        )
    folder_model, folder_tok = load_pretrained(folder, progress=False)
    assert (folder_tok.bos_id, folder_tok.eos_id) == (1, 2)
    for text in ["the cat", "<|im_start|>the cat<|im_end|>", "naïve 123"]:
        assert folder_tok.encode(text) == tok.encode(text)
    tokens = np.asarray([the_cat * 4], np.int32)
    np.testing.assert_allclose(
        JittedLlama(folder_model)(tokens), JittedLlama(model)(tokens), rtol=1e-5, atol=1e-5
    )


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pretrained(tmp_path / "nope.gguf")
