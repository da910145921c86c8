"""Head-parallel prefill across the GPUs of one host, with JAX's own sharding.

Megatron-style tensor parallelism on one mesh axis, ``"heads"``: the q/k/v projections are
split by output (so each device computes whole query and KV heads), the output projection by
input, the MLP's gate/up by output and down by input; norms and embeddings are replicated. The
attention itself runs under ``shard_map`` on each device's own heads (:class:`HeadParallel`),
so the Pallas kernel and cuDNN see ordinary local arrays and no attention data crosses devices;
XLA's SPMD partitioner inserts the two all-reduces per layer (after o_proj and down_proj).

Query head h reads KV head h // (Hq // Hkv): with both head axes split into the same number of
contiguous chunks, every query head finds its KV head on its own device, so Hkv must be a
multiple of the device count (8 KV heads: 1, 2, 4 or 8 GPUs).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.attention_spec import attend, resolve_attention
from models.config import LlamaConfig
from models.llama import Llama

AXIS = "heads"

# Parameter path (joined with "/") → how its axes split. Stacked layers carry a leading layer
# axis. Anything not listed is replicated.
PARAM_SPECS: tuple[tuple[str, P], ...] = (
    (r"layers/attn/[qkv]_proj/kernel", P(None, None, AXIS)),
    (r"layers/attn/[qkv]_proj/bias", P(None, AXIS)),
    (r"layers/attn/o_proj/kernel", P(None, AXIS, None)),
    (r"layers/mlp/(gate|up)_proj/kernel", P(None, None, AXIS)),
    (r"layers/mlp/down_proj/kernel", P(None, AXIS, None)),
)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``("heads",)`` mesh over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


def check_shardable(config: LlamaConfig, mesh: Mesh) -> None:
    """Raise ``ValueError`` unless every split axis divides evenly over the mesh."""
    n = mesh.shape[AXIS]
    for name in ("num_heads", "num_kv_heads", "ffn_dim"):
        if getattr(config, name) % n:
            raise ValueError(
                f"LlamaConfig.{name} ({getattr(config, name)}) must be a multiple of the "
                f"{n} devices of the mesh for head-parallel prefill"
            )


def param_spec(path: str) -> P:
    for pattern, spec in PARAM_SPECS:
        if re.fullmatch(pattern, path):
            return spec
    return P()


def shard_model(model: Llama, mesh: Mesh):
    """Split the model once and place its parameters on the mesh: ``(graphdef, state)``."""
    check_shardable(model.config, mesh)
    graphdef, state = nnx.split(model)

    def place(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        name = re.sub(r"/value$", "", name)
        return jax.device_put(leaf, NamedSharding(mesh, param_spec(name)))

    return graphdef, jax.tree_util.tree_map_with_path(place, state)


@dataclasses.dataclass(frozen=True)
class HeadParallel:
    """Any attention spec ("full", a PBSConfig, a PBSAttention, a callable), run by every device
    on its own heads: q ``[B, T, Hq, D]`` and k/v ``[B, T, Hkv, D]`` split on the head axis.

    Hashable (a static jit argument), so the model takes it like any other attention spec.
    Returns (out ``[B, T, Hq, D]`` split the same way, density averaged over devices).
    ``lengths [B]`` (a right-padded batch, ``models.attention_spec.attend``) goes to every device.
    """

    attention: Any
    mesh: Mesh

    def __call__(self, q, k, v, lengths=None):
        inner = resolve_attention(self.attention)

        def local(q, k, v, lengths):
            out, density = attend(q, k, v, inner, lengths)
            return out, jax.lax.pmean(density, AXIS)

        heads = P(None, None, AXIS, None)
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(heads, heads, heads, P()),  # lengths [B] (or None): on every device
            out_specs=(heads, P()),
            check_vma=False,
        )(q, k, v, lengths)
