"""Smoke test of the pbs-prefill CLI (experiments/prefill.py) on a tiny random GGUF."""

from __future__ import annotations

import json

import pytest

from experiments import prefill
from models.testing import random_hf_weights, write_gguf
from tests.conftest import MERGES, TINY_WITH_VOCAB, TOKENS


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        prefill.main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--length",
        "--model",
        "--threshold",
        "--block-size",
        "--segment-size",
        "--gqa",
        "--no-permute",
        "--dense-layers",
        "--new-tokens",
        "--impl",
        "--repeats",
        "--warmup",
    ):
        assert option in text


@pytest.fixture
def tiny_model_and_text(tmp_path):
    """(GGUF of a tiny random model with a real BPE vocabulary, a text file) as paths."""
    model_path = write_gguf(
        tmp_path / "tiny.gguf",
        TINY_WITH_VOCAB,
        random_hf_weights(TINY_WITH_VOCAB, seed=1),
        tokens=TOKENS,
        merges=MERGES,
        token_types=[3] * 3 + [1] * (len(TOKENS) - 3),
    )
    text_path = tmp_path / "text.txt"
    text_path.write_text("the cat sat on the mat, then the cat ate 42 fish.\n" * 20)
    return model_path, text_path


def test_cli_compares_full_and_pbs(tiny_model_and_text, tmp_path, capsys):
    model_path, text_path = tiny_model_and_text
    summary = prefill.run(
        [
            str(text_path),
            "--model",
            model_path,
            "--length",
            "96",
            "--block-size",
            "16",
            "--segment-size",
            "32",
            "--threshold",
            "0.5",
            "--gqa",
            "shared",
            "--impl",
            "reference",
            "--new-tokens",
            "4",
            "--warmup",
            "0",
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "next-token agreement" in out and "per-layer density (PBS)" in out
    assert summary["tokens"] == 96 and summary["pbs"]["gqa"] == "shared"
    assert 0 < summary["density_mean"] < 1
    assert len(summary["density_per_layer"]) == TINY_WITH_VOCAB.num_layers
    assert 0 <= summary["next_token_agreement"] <= 1 and summary["rel_logit_error_all"] > 0
    assert len(summary["full_new_tokens"]) == len(summary["pbs_new_tokens"]) == 4
    assert json.loads((tmp_path / "out.json").read_text())["tokens"] == 96


def test_cli_dense_layers_keep_those_layers_dense(tiny_model_and_text):
    model_path, text_path = tiny_model_and_text
    summary = prefill.run(
        [
            str(text_path),
            "--model",
            model_path,
            "--length",
            "96",
            "--block-size",
            "16",
            "--segment-size",
            "32",
            "--threshold",
            "0.5",
            "--impl",
            "reference",
            "--dense-layers",
            "0",
            "--new-tokens",
            "0",
            "--warmup",
            "0",
        ]
    )
    density = summary["density_per_layer"]
    assert summary["dense_layers"] == [0] and density[0] == 1.0
    assert all(d < 1.0 for d in density[1:])
