"""Run in a subprocess with 4 virtual CPU devices (tests/test_sharding.py): the head-parallel
prefill gives the same logits and density as the unsharded model, whole and chunked."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import FULL_ATTENTION, JittedLlama, Llama, LlamaConfig, PBSAttention, sharding
from pbs_jax import PBSConfig


def main():
    assert len(jax.devices()) == 4, jax.devices()
    config = LlamaConfig(
        num_layers=2,
        d_model=64,
        num_heads=8,
        num_kv_heads=4,
        head_dim=16,
        ffn_dim=128,
        vocab_size=97,
        rope_theta=10000.0,
        mlp_chunk=64,
    )
    model = Llama(config, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 150)), jnp.int32)
    runner = JittedLlama(model)
    mesh = sharding.make_mesh(4)
    sharded = JittedLlama.from_split(*sharding.shard_model(model, mesh))
    q_kernel = sharded.state["layers"]["attn"]["q_proj"]["kernel"][...]
    report = {
        "q_proj_spec": str(q_kernel.sharding.spec),
        "q_proj_shard_shape": list(q_kernel.addressable_shards[0].data.shape),
    }
    pbs = PBSAttention(
        PBSConfig(block_size=16, segment_size=32, threshold=0.3, dense_tail=16, proxy_blocks=2),
        impl="reference",
    )
    # "pbs_ragged": a right-padded batch (rows of 150 and 83 tokens), lengths on every device.
    for name, spec, lengths in (
        ("full", FULL_ATTENTION, None),
        ("pbs", pbs, None),
        ("pbs_ragged", pbs, np.array([150, 83])),
    ):
        logits, density = runner(tokens, spec, return_aux=True, lengths=lengths)
        s_logits, s_density = sharded(
            tokens, sharding.HeadParallel(spec, mesh), return_aux=True, lengths=lengths
        )
        report[name] = {
            "max_abs_diff": float(jnp.max(jnp.abs(logits - s_logits))),
            "logit_scale": float(jnp.max(jnp.abs(logits))),
            "density": np.asarray(density).tolist(),
            "sharded_density": np.asarray(s_density).tolist(),
        }
    # Chunked prefill (chunks of 64, 64 and 22 tokens): each chunk's attention is head-parallel.
    (_, _, aux), (_, _, s_aux) = (
        r.prefill(tokens, spec, return_aux=True, chunk_size=64)
        for r, spec in ((runner, pbs), (sharded, sharding.HeadParallel(pbs, mesh)))
    )
    logits, s_logits = runner.output_logits(aux.hidden), sharded.output_logits(s_aux.hidden)
    report["pbs_chunked"] = {
        "max_abs_diff": float(jnp.max(jnp.abs(logits - s_logits))),
        "logit_scale": float(jnp.max(jnp.abs(logits))),
        "density": np.asarray(aux.density).tolist(),
        "sharded_density": np.asarray(s_aux.density).tolist(),
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
