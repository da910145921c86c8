"""Head-parallel prefill on 4 virtual CPU devices equals the unsharded model (also chunked)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx

from models import Llama, LlamaConfig, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # compile-bound, as the in-process tests (conftest)
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.sharding_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.subprocess
def test_parameters_are_split_by_heads(report):
    assert "heads" in report["q_proj_spec"]
    assert report["q_proj_shard_shape"] == [2, 64, 128 // 4]  # [L, d, Hq*D / 4 devices]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("attention", ["full", "pbs", "pbs_ragged", "pbs_chunked"])
def test_sharded_logits_equal_unsharded(report, attention):
    r = report[attention]
    assert r["max_abs_diff"] < 1e-4 * max(1.0, r["logit_scale"]), r
    assert r["density"] == pytest.approx(r["sharded_density"], abs=1e-6)
    if attention != "full":
        assert min(r["density"]) < 1.0  # the sparse path really ran


@pytest.mark.slow
def test_unshardable_head_counts_raise():
    config = LlamaConfig(
        num_layers=1, d_model=32, num_heads=6, num_kv_heads=3, head_dim=8, ffn_dim=64, vocab_size=11
    )
    mesh = sharding.make_mesh(1)
    sharding.shard_model(Llama(config, rngs=nnx.Rngs(0)), mesh)  # one device always works
    with pytest.raises(ValueError, match="num_kv_heads"):
        sharding.check_shardable(config, _FakeMesh(2))


class _FakeMesh:
    """Only the attribute check_shardable reads: the size of the heads axis."""

    def __init__(self, n):
        self.shape = {"heads": n}
