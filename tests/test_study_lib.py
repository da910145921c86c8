"""The study library (experiments/lib) on tiny hand-worked cases, and every script's report
re-rendered from its committed JSON into exactly the committed markdown."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import pbs_jax
from experiments.lib import kernels, metrics, probes, report, specs
from experiments.lib.coverage_results import CoverageSummary
from tests.conftest import jit_exact_attention, make_qkv

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"


# ---- metrics ---------------------------------------------------------------------------------


def test_rel_err_by_hand():
    assert metrics.rel_err([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert metrics.rel_err([3.0, 4.0], [0.0, 5.0]) == pytest.approx(np.sqrt(9 + 1) / 5)
    assert metrics.rel_err(np.zeros(3), np.zeros(3)) == 0.0  # 0 / 0 counts as 0
    x = jnp.arange(8, dtype=jnp.bfloat16).reshape(2, 4)
    assert metrics.rel_err(x, x.astype(jnp.float32)) == 0.0


def tiny_sequence() -> probes.EvalSequence:
    """tokens 0..7; text [0, 4): ppl region [3, 4), scored from position 2; one probe, the
    answer tokens 5, 6 (scored from positions 4, 5)."""
    return probes.EvalSequence("toy", np.arange(8, dtype=np.int32), 4, (probes.Probe("kv", 5, 2),))


def test_evaluated_positions_by_hand():
    positions, ppl_rows = probes.evaluated_positions(tiny_sequence())
    assert positions.tolist() == [2, 4, 5] and ppl_rows == slice(0, 1)


def test_forward_metrics_by_hand():
    seq, v = tiny_sequence(), 8
    # Uniform over the ppl position (perplexity V); the answer positions put all mass on 5, 6.
    logits = np.zeros((3, v), np.float32)
    logits[1, 5] = logits[2, 6] = 30.0
    same = metrics.forward_metrics(seq, logits, logits, np.array([1, 2]), np.array([1, 2]))
    assert same.ppl == pytest.approx(v, rel=1e-5) and same.kl == pytest.approx(0.0, abs=1e-6)
    assert same.agreement == 1.0 and same.rel_logit_error == 0.0 and same.greedy_match == 1.0
    assert same.answers == {"kv": [True]} and same.continuation == [1, 2]

    # Against a reference that puts p = 1/2 on token 3 and 1/14 elsewhere at the ppl position.
    reference = logits.copy()
    reference[0, 3] = np.log(7.0)
    p = np.full(v, 1 / 14)
    p[3] = 1 / 2
    other = metrics.forward_metrics(seq, logits, reference, np.array([1, 2]), np.array([1, 3]))
    assert other.kl == pytest.approx(float(np.sum(p * np.log(p * v))), rel=1e-5)
    assert other.agreement == 0.0  # argmax 0 against 3
    assert other.greedy_match == 0.5 and other.ppl == pytest.approx(v, rel=1e-5)


def test_answers_task_accuracy_and_retained_by_hand():
    seq = probes.EvalSequence(
        "toy",
        np.arange(10, dtype=np.int32),
        4,
        (probes.Probe("kv", 5, 2), probes.Probe("copy", 7, 1), probes.Probe("kv", 8, 2)),
    )
    answers = metrics.answers_correct(seq, np.array([5, 6, 0, 8, 9]))
    assert answers == {"kv": [True, True], "copy": [False]}
    accuracy = metrics.task_accuracy([answers, {"kv": [False], "passkey": [True]}])
    assert accuracy["kv"] == metrics.TaskAccuracy(2 / 3, 3)
    assert accuracy["copy"] == metrics.TaskAccuracy(0.0, 1)
    assert accuracy["passkey"] == metrics.TaskAccuracy(1.0, 1)
    full = {"kv": [True, False, True], "copy": [True]}
    assert metrics.retained({"kv": [False, True, True], "copy": [False]}, full, ["kv"]) == 0.5
    assert metrics.retained({"kv": [True]}, {"kv": [False]}, ["kv"]) is None  # nothing to keep


def test_reduction_and_mean_or_none():
    assert metrics.reduction(0.4, 0.3) == pytest.approx(0.25)
    assert metrics.reduction(None, 0.3) is None and metrics.reduction(0.0, 0.3) is None
    assert metrics.mean_or_none([None, 1.0, 3.0]) == 2.0 and metrics.mean_or_none([None]) is None


# ---- probes ----------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character: every piece tokenizes the same wherever it stands."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_build_sequence_plants_answerable_needles():
    text = "".join(f"Line {i}: some ordinary prose about nothing much.\n" for i in range(400))
    tok = CharTokenizer()
    seq = probes.build_sequence(tok, "prose", text, 4096, per_task=2, seed=3)
    assert len(seq.tokens) == 4096 and len(seq.probes) == 6
    assert sorted(p.task for p in seq.probes) == ["copy", "copy", "kv", "kv", "passkey", "passkey"]
    body = tok.decode(seq.tokens[: seq.text_end].tolist())
    needles_end = max(body.rfind(tok.decode(seq.answer_tokens(p).tolist())) for p in seq.probes)
    assert 0 < needles_end < seq.ppl_start  # every answer is in a needle before the ppl region
    for p in seq.probes:
        assert p.start >= seq.text_end  # answers sit in the question part


# ---- specs -----------------------------------------------------------------------------------


def test_sink_local_with_every_block_is_exact_attention():
    q, k, v = make_qkv(0, 1, 384, 4, 2, 16)
    exact = jit_exact_attention(q, k, v)
    out, density = specs.SinkLocalAttention(window=3)(q, k, v)
    assert float(density) == pytest.approx(1.0)
    assert metrics.rel_err(out, exact) < 1e-5
    out, captured = specs.CaptureAttention()(q, k, v)
    assert metrics.rel_err(out, exact) < 1e-5
    assert captured["q"] is q and captured["k"] is k and captured["v"] is v


def test_attention_for_names_the_method():
    assert specs.attention_for(specs.SINK_LOCAL, None, 4) == specs.SinkLocalAttention(4)
    spec = specs.attention_for("meanpool", 0.8, 0)
    assert spec.impl == "reference" and spec.config.permute is False
    assert spec.config.threshold == 0.8


# ---- kernels ---------------------------------------------------------------------------------


def test_all_causal_lists_by_hand():
    """T = 5 blocks (a partial last one), 2 blocks per segment: earlier segments are listed as
    full, the own segment (both its blocks) as masked, clipped at T."""
    lists = kernels.all_causal_lists(1, 2, 4 * 128 + 64, pbs_jax.PBSConfig())
    assert np.asarray(lists.full_counts)[0, 0].tolist() == [0, 0, 2, 2, 4]
    assert np.asarray(lists.total_counts)[0, 1].tolist() == [2, 2, 4, 4, 5]
    ids = np.asarray(lists.ids)[0, 0]
    for row, total in zip(ids, [2, 2, 4, 4, 5]):
        assert row[:total].tolist() == list(range(total))


def test_causal_tflops_by_hand():
    # 4·B·H·N²·D / 2 FLOPs in 1 ms: 4 · 1 · 2 · 10⁴² · 64 / 2 / 1e-3 s = 2.56e13 = 25.6 TFLOP/s.
    assert kernels.causal_tflops(1, 2, 10_000, 64, 1.0) == pytest.approx(25.6)
    assert kernels.computed_tflops(64, 128, 10, 0.0) == 0.0


# ---- report ----------------------------------------------------------------------------------


def test_report_helpers_by_hand():
    assert report.table_row("a", "", 3) == "| a | | 3 |"
    assert report.table_header("x", "y") == ["| x | y |", "|---|---|"]
    assert report.fmt(None) == "—" and report.fmt(0.12345, ".2f") == "0.12"
    assert report.rounded({"a": [1.23456789, 2], "b": (0.1 + 0.2,)}) == {
        "a": [1.23457, 2],
        "b": [0.3],
    }
    assert report.json_text({"a": [1, 2], "b": [{"c": "d"}]}) == (
        '{\n "a": [ 1, 2 ],\n "b": [\n  {\n   "c": "d"\n  }\n ]\n}'
    )


# ---- results on disk -------------------------------------------------------------------------


def test_coverage_summary_json_round_trip():
    """The committed summary, parsed into records and the derived numbers recomputed, writes
    back exactly as committed."""
    saved = json.loads((RESULTS / "coverage.json").read_text())
    summary = CoverageSummary.from_json(saved)
    assert summary.lengths["8192"].coverage.methods["pbs"].density[0] > 0
    assert report.rounded(summary.to_json()) == saved


def rerender(tmp_path, module, *names, args=()):
    for name in names:
        shutil.copy(RESULTS / name, tmp_path / name)
    module.main(["--report", *(str(tmp_path / n) for n in names), *args])
    stem = pathlib.Path(names[0]).stem
    return (tmp_path / f"{stem}.md").read_text(), (RESULTS / f"{stem}.md").read_text()


@pytest.mark.parametrize(
    "script,names",
    [
        ("bench_kernel", ["bench_kernel.json"]),
        ("bench_kernel", ["bench_kernel_fused_plan.json"]),
        ("bench_kernel", ["bench_kernel_tuned_plan.json"]),
        ("bench_kernel", ["bench_kernel_lists.json"]),
        ("bench_kernel", ["bench_kernel_finish.json"]),
        ("bench_kernel", ["bench_kernel_auto.json"]),
        ("bench_kernel", ["bench_kernel_auto_short.json"]),
        (
            "bench_kernel",
            [
                "bench_kernel_one_choice.json",
                "bench_kernel_one_choice_16k_32k.json",
                "bench_kernel_one_choice_64k.json",
            ],
        ),
        ("bench_kernel", ["bench_kernel_captured_4layers.json"]),
        ("profile_plan", ["profile_plan.json"]),
        ("profile_plan", ["profile_plan_8k.json"]),
        ("profile_plan", ["profile_plan_transposed.json"]),
        ("profile_plan", ["profile_plan_forced_in_selection.json"]),
        ("profile_plan", ["profile_plan_lists_in_selection.json"]),
        (
            "bench_prefill",
            [
                "bench_prefill.json",
                "bench_prefill_2gpu.json",
                "bench_prefill_4gpu.json",
            ],
        ),
        ("probe_mgpu", ["probe_mgpu.json"]),
        ("tune_kernel", ["tune_kernel.json"]),
        ("layer_schedule", ["layer_schedule.json"]),
        ("calibrate_structure", ["calibrate_structure.json"]),
    ],
)
def test_reports_rerender_the_committed_markdown(tmp_path, script, names):
    import importlib

    made, committed = rerender(tmp_path, importlib.import_module(f"experiments.{script}"), *names)
    assert made == committed


@pytest.mark.slow
def test_coverage_report_rerenders_the_committed_markdown(tmp_path):
    from experiments import coverage

    made, committed = rerender(tmp_path, coverage, "coverage.json", args=("--out", str(tmp_path)))
    assert made == committed
    assert json.loads((tmp_path / "coverage.json").read_text()) == json.loads(
        (RESULTS / "coverage.json").read_text()
    )


def test_prefill_memory_probe_reads_xla_usage_report():
    """The probe's parser on a hand-written XLA memory-usage report laid out as on a GPU (the
    outputs' one-slot table first): the temporaries' table (most slots), largest first, sizes in
    bytes; the other allocation's table is not read."""
    from experiments.probe_prefill_memory import largest_buffers, parse_size

    assert parse_size("1.50GiB") == 3 * 2**29 and parse_size("152B") == 152
    report = """Memory Space: default (color=0)
Total bytes: 3221225472 (3.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    8.00GiB(100%);    8.00GiB;            0;                1; 5×bf16[32,1,131072,8,128]

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    1.00GiB( 50%);    1.00GiB;            0;                1; bf16[1,131072,32,128]
    3.00GiB(100%);    2.00GiB;   1073741824;                2; f32[8,1024,1024], s32[2]
    3.00GiB(100%);      64.0KiB;          0;                1; pred[256,256]
"""
    assert largest_buffers(report) == [
        {"bytes": 2 * 2**30, "shapes": "f32[8,1024,1024], s32[2]"},
        {"bytes": 2**30, "shapes": "bf16[1,131072,32,128]"},
        {"bytes": 64 * 2**10, "shapes": "pred[256,256]"},
    ]


def test_kernel_groups_and_hlo_names_worked_by_hand():
    """profile_layer's kernel attribution on hand-written names and HLO lines."""
    from experiments.lib.kernel_trace import grouped, hlo_instructions, kernel_group

    assert kernel_group("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_group("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "gemm"
    assert kernel_group("gemm_fusion_dot_5") == "gemm"
    assert kernel_group("cudnn_something_else") == "attention"
    assert kernel_group("loop_multiply_fusion") == "other"
    assert kernel_group("input_dot_product_reduce") == "gemm"  # "dot" between separators
    assert kernel_group("loop_dotted_fusion") == "other"
    hlo = hlo_instructions(
        "  %loop_multiply_fusion.2 = bf16[8,4]{1,0} fusion(%a), kind=kLoop, "
        'metadata={op_name="jit(prefill)/while/body/closed_call/mul"}\n'
        "  ROOT %wrapped_convert.3 = f32[2]{0} fusion(%b), kind=kLoop\n"
    )
    assert hlo == {
        "loop_multiply_fusion_2": {"shape": "bf16[8,4]{1,0}", "op": "while/body/mul"},
        "wrapped_convert_3": {"shape": "f32[2]{0}", "op": "wrapped_convert"},
    }
    g = grouped([("loop_multiply_fusion_2", 2.0, 30.0), ("gemm_fusion_dot", 1.0, 70.0)], hlo)
    assert g["group_us"] == {"gemm": 70.0, "attention": 0.0, "other": 30.0}
    assert g["other_by_op"] == [("while/body/mul", 30.0)]


def test_fused_layer_variants_equal_the_layer():
    """profile_layer's variants (q/k/v and gate/up as one matmul each, per call or once, other MLP
    chunks) compute the model layer's own output, in float32 on a tiny config."""
    import jax
    from flax import nnx

    from experiments.lib.layer_variants import layer_call, variant_call, variants
    from models import LlamaConfig
    from models.layers import DecoderLayer

    config = LlamaConfig.preset("smollm2-135m", num_layers=1, mlp_chunk=16)
    graphdef, state = nnx.split(DecoderLayer(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    n = 64
    x = jax.random.normal(jax.random.key(0), (1, n, config.d_model), jnp.float32)
    positions = jnp.arange(n, dtype=jnp.int32)
    call = layer_call(graphdef)
    want = np.asarray(call(state, x, positions)[0])
    named = {k: v for k, v in variants(n, config.mlp_chunk).items() if not v.compiler_options}
    assert {"fused q/k/v", "fused gate/up", "MLP unchunked"} <= set(named)
    for name, variant in named.items():
        fn, fn_state = variant_call(call, graphdef, state, variant, x, positions)
        got = np.asarray(fn(fn_state, x, positions)[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
