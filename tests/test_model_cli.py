"""The pbs-prefill CLI (experiments/prefill.py) on a tiny random GGUF: a smoke run, labels, and
every user error as one line with exit status 2 before any model is loaded."""

from __future__ import annotations

import json
import time

import pytest

from experiments import prefill
from experiments.lib.prefill_report import CPU_TIMING_NOTE, continuation_summary, method_label
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
        "--selector",
        "--allow-longer",
        "--chunk-size",
    ):
        assert option in text
    flat = " ".join(text.split())
    # What density means, and that errors come from the timed prefill itself.
    assert "dense is exactly 1" in flat and "paper's density is the same ratio" in flat
    assert "come from the last timed prefill" in flat


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
            "--dense-tail",  # the default 128 rows would make all 96 tokens dense
            "0",
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
            "--dense-tail",  # the default 128 rows would make all 96 tokens dense
            "0",
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


def test_cli_labels_no_permute_as_meanpooling_and_summarises_continuations(
    tiny_model_and_text, capsys
):
    model_path, text_path = tiny_model_and_text
    summary = prefill.run(
        [
            str(text_path),
            "--model",
            model_path,
            "--length",
            "64",
            "--block-size",
            "16",
            "--segment-size",
            "32",
            "--no-permute",
            "--impl",
            "reference",
            "--new-tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert summary["method"] == "MeanPooling"
    assert "per-layer density (MeanPooling)" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("full"))
    assert header.split()[-1] == "MeanPooling"
    # One summary line for the continuations, never a flag on every later token.
    first = summary["continuation_first_difference"]
    if first is None:
        assert "greedy continuations agree on all 6 tokens" in out
    else:
        assert (
            f"agree on the first {first - 1} of 6 tokens; first difference at token {first}" in out
        )
    assert out.count("<- first difference") == (first is not None)
    assert "<- differs" not in out
    # On CPU timings are not presented as a speed-up.
    assert "speed-up" not in out and CPU_TIMING_NOTE in " ".join(out.split())


def test_continuation_summary_counts_agreement_up_to_the_first_difference():
    assert continuation_summary([1, 2, 3], [1, 2, 3]) == (
        "greedy continuations agree on all 3 tokens"
    )
    assert continuation_summary([5] * 20, [5] * 14 + [6] + [5] * 5) == (
        "greedy continuations agree on the first 14 of 20 tokens; first difference at token 15"
    )


def test_method_labels_say_what_ran():
    from pbs_jax import PBSConfig

    assert method_label(PBSConfig()) == "PBS"
    assert method_label(PBSConfig(permute=False)) == "MeanPooling"
    assert method_label(PBSConfig(selector="antidiagonal")) == "PBS+ (antidiagonal)"


@pytest.fixture
def model_never_loaded(monkeypatch):
    """Fails the test if the CLI gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(prefill, "load_pretrained", refuse)


def bad_inputs(tmp_path, text_path):
    """(argv, words the one-line message must hold) for every user error of issue 14."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\x00with NUL\n")
    text = str(text_path)
    return [
        ([text, "--length", "0"], "--length: must be at least 1"),
        ([text, "--length", "-5"], "--length: must be at least 1"),
        ([text, "--length", "300"], "exceeds the model's 256 trained positions"),
        ([str(empty)], "is empty"),
        ([str(tmp_path / "missing.txt")], "does not exist"),
        ([str(binary)], "is not UTF-8 text"),
        ([str(nul)], "looks binary"),
        ([str(tmp_path)], "is not a file"),
        ([text, "--threshold", "1.5"], "0 < threshold <= 1"),
        ([text, "--threshold", "0"], "0 < threshold <= 1"),
        ([text, "--block-size", "100"], "multiple of block_size"),
        ([text, "--segment-size", "0"], "segment_size must be a positive int"),
        ([text, "--dense-layers", "2"], "layers 0 to 1 only"),
        ([text, "--dense-layers", "-1"], "--dense-layers: must be at least 0"),
        ([text, "--new-tokens", "-1"], "--new-tokens: must be at least 0"),
        ([text, "--repeats", "0"], "--repeats: must be at least 1"),
        ([text, "--gqa", "both"], "invalid choice"),
        ([text, "--selector", "top-k"], "invalid choice"),
        ([text, "--json", str(tmp_path / "no" / "out.json")], "folder does not exist"),
        ([text, "--chunk-size", "0"], "--chunk-size: must be at least 1"),
        ([text, "--chunk-size", "100"], "multiple of the PBS segment_size (256)"),
    ]


def test_bad_input_is_one_line_and_exit_status_2_before_loading(
    tiny_model_and_text, tmp_path, capsys, model_never_loaded
):
    model_path, text_path = tiny_model_and_text
    for argv, words in bad_inputs(tmp_path, text_path):
        start = time.perf_counter()
        with pytest.raises(SystemExit) as exit_info:
            prefill.main([*argv, "--model", model_path])
        assert exit_info.value.code == 2, argv
        assert time.perf_counter() - start < 5, argv
        err = capsys.readouterr().err
        message = err.strip().splitlines()[-1]
        assert message.startswith("pbs-prefill: error: ") and words in message, (argv, err)
        assert "Traceback" not in err


def test_missing_model_is_a_clean_error(tiny_model_and_text, tmp_path, capsys, model_never_loaded):
    _, text_path = tiny_model_and_text
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"definitely not a GGUF file")
    for model, words in (
        (str(tmp_path / "missing.gguf"), "does not exist"),
        (str(not_gguf), "is not a readable Llama GGUF file"),
        (str(tmp_path), "has no config.json"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            prefill.main([str(text_path), "--model", model])
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith("pbs-prefill: error: ") and words in message


def test_allow_longer_and_short_text_proceed(tiny_model_and_text, capsys):
    """--allow-longer lets a length past the trained positions through; a text with fewer tokens
    than asked is a one-line note, and all of it is prefilled."""
    model_path, text_path = tiny_model_and_text
    text_path.write_text("the cat sat on the mat.\n" * 3)
    summary = prefill.run(
        [
            str(text_path),
            "--model",
            model_path,
            "--length",
            "300",
            "--allow-longer",
            "--impl",
            "reference",
            "--new-tokens",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert summary["tokens"] < 300
    assert f"has only {summary['tokens']} tokens; prefilling all of them" in err
    assert "Traceback" not in err and "[pbs] load tiny.gguf" in err and "done in" in err


def test_several_texts_run_as_one_ragged_batch_reported_per_row(tiny_model_and_text, capsys):
    """Two texts (positional + --text): one ragged prefill, one report per row, each row with
    its own length and continuation (tests/test_ragged.py: a ragged row equals itself alone)."""
    model_path, text_path = tiny_model_and_text
    short = text_path.parent / "short.txt"
    short.write_text("the cat ate the fish.\n" * 3)
    summary = prefill.run(
        [str(text_path), "--text", str(short), "--model", model_path, "--length", "96"]
        + ["--block-size", "16", "--segment-size", "32", "--dense-tail", "0"]
        + ["--impl", "reference", "--new-tokens", "3"]
    )
    out = capsys.readouterr().out
    rows = summary["rows"]
    assert [r["text"] for r in rows] == [str(text_path), str(short)]
    assert summary["batch_lengths"] == [r["tokens"] for r in rows]
    assert rows[0]["tokens"] == 96 and rows[1]["tokens"] < 96
    assert "row 1 of 2" in out and "row 2 of 2" in out
    for row in rows:
        assert len(row["full_new_tokens"]) == len(row["pbs_new_tokens"]) == 3
        assert 0 <= row["next_token_agreement"] <= 1 and row["rel_logit_error_all"] >= 0


def test_every_text_is_checked_before_loading(
    tiny_model_and_text, tmp_path, capsys, model_never_loaded
):
    model_path, text_path = tiny_model_and_text
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        prefill.main([str(text_path), "--text", str(empty), "--model", model_path])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("pbs-prefill: error: ") and "is empty" in message
