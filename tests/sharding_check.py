"""Run in a subprocess with 4 virtual CPU devices (tests/test_sharding.py): the head-parallel
prefill gives the same logits and density as the unsharded model."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import llama, sharding
from pbs_jax import PBSConfig


def main():
    assert len(jax.devices()) == 4, jax.devices()
    config = llama.LlamaConfig(
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
    model = llama.Llama(config, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 150)), jnp.int32)
    graphdef, state = nnx.split(model)
    mesh = sharding.make_mesh(4)
    s_graphdef, s_state = sharding.shard_model(model, mesh)
    q_kernel = s_state["layers"]["attn"]["q_proj"]["kernel"][...]
    report = {
        "q_proj_spec": str(q_kernel.sharding.spec),
        "q_proj_shard_shape": list(q_kernel.addressable_shards[0].data.shape),
    }
    pbs = llama.PBSAttention(
        PBSConfig(block_size=16, segment_size=32, threshold=0.3), impl="reference"
    )
    for name, spec in (("full", llama.FULL_ATTENTION), ("pbs", pbs)):
        fwd = functools.partial(llama.forward, attention=spec, return_aux=True)
        logits, density = fwd(graphdef, state, tokens)
        s_logits, s_density = jax.jit(
            functools.partial(
                llama.forward, attention=sharding.HeadParallel(spec, mesh), return_aux=True
            )
        )(s_graphdef, s_state, tokens)
        report[name] = {
            "max_abs_diff": float(jnp.max(jnp.abs(logits - s_logits))),
            "logit_scale": float(jnp.max(jnp.abs(logits))),
            "density": np.asarray(density).tolist(),
            "sharded_density": np.asarray(s_density).tolist(),
        }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
