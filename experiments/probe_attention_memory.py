"""Device memory of one layer's attention, from XLA's compiled memory analysis (no run).

  python -m experiments.probe_attention_memory     # on a GPU; prints one line per program

At 128K tokens, 32/8 heads of 128, bf16: full attention (cuDNN), PBS at a fixed density
(``FixedDensityPBS``: plan + lists + kernel), the plan alone, the fixed mask and its lists,
and the kernel entry with the slot-order copy in one launch and capped per group of permutation
heads (``pallas_kernels.planned.SLOT_COPY_LIMIT_BYTES``). Used for the 128K peak-memory analysis in
experiments/NOTES.md (H200, JAX 0.11.2, 2026-11-30).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pbs_jax
from experiments.lib.specs import FixedDensityPBS
from pallas_kernels import planned
from pbs_jax import PBSConfig

N, HQ, HKV, D = 131072, 32, 8, 128


def memory(name, fn, *args) -> None:
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    print(
        f"{name}: temp {m.temp_size_in_bytes / 2**30:.3f} GiB, out "
        f"{m.output_size_in_bytes / 2**30:.3f}, args {m.argument_size_in_bytes / 2**30:.3f}",
        flush=True,
    )


def main() -> None:
    cfg = PBSConfig.paper()
    t = pbs_jax.num_blocks(N, cfg.block_size)
    q = jax.ShapeDtypeStruct((1, N, HQ, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, N, HKV, D), jnp.bfloat16)
    ints = {shape: jax.ShapeDtypeStruct(shape, jnp.int32) for shape in ((1, HQ, N), (1, HQ, t))}
    memory("full", pbs_jax.dense_attention, q, k, k)
    memory("pbs_fixed", lambda q, k, v: FixedDensityPBS(0.22, cfg)(q, k, v)[0], q, k, k)
    memory("plan", lambda q, k: pbs_jax.pbs_plan(q, k, cfg), q, k)
    memory(
        "fixed mask + lists",
        lambda key: pbs_jax.index_lists(
            pbs_jax.fixed_density_mask(key, (1, HQ, t), 0.22, cfg), cfg
        ),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
    )
    ids = jax.ShapeDtypeStruct((1, HQ, t, t), jnp.int32)
    for limit in (2**40, planned.SLOT_COPY_LIMIT_BYTES):
        planned.SLOT_COPY_LIMIT_BYTES = limit
        memory(
            f"kernel entry, copy limit {limit >> 20} MiB",
            lambda q, k, v, kp, ids, full, total: planned.planned_attention(
                q, k, v, kp, ids, full, total, block_size=128, segment_blocks=2
            ),
            q,
            k,
            k,
            ints[(1, HQ, N)],
            ids,
            ints[(1, HQ, t)],
            ints[(1, HQ, t)],
        )


if __name__ == "__main__":
    main()
