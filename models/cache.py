"""The state a prefill hands to decoding: the KV cache (``KVCache``, the one place it is
written) and the prefill's extra outputs (``PrefillAux``).

Shapes: L layers, B batch, S cache length, T new tokens, Hkv key-value heads, D head_dim,
d d_model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["KVCache", "PrefillAux"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys (after RoPE) and values in original token order, preallocated.

    keys, values: [L, B, S, Hkv, D]. Slot s holds the token at position s; slots at or beyond
    the current position are garbage and masked out by decode_step. In a right-padded batch
    each row has its own position (``lengths`` after the prefill): slots past it hold the
    padding's keys, masked the same way and overwritten as the row decodes.
    """

    keys: jax.Array
    values: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def write(self, layer_index, keys: jax.Array, values: jax.Array, position) -> KVCache:
        """The cache with one layer's new keys and values written (cast to the cache's dtype);
        the one place the cache is written.

        Cache [L, B, S, Hkv, D]; ``layer_index`` a scalar int (traced under the layer scan);
        keys, values [B, T, Hkv, D] (keys after RoPE). ``position``:

        - a scalar int (static or traced): every row's T new entries go to slots
          ``position … position+T-1`` (one ``dynamic_update_slice``: O(T) writes);
        - [B] int32, one position per row (a ragged batch; T must be 1): row b's entry goes to
          slot ``position[b]`` (a scatter).
        """
        if jnp.ndim(position) == 1:
            rows = jnp.arange(keys.shape[0])
            return KVCache(
                self.keys.at[layer_index, rows, position].set(keys[:, 0].astype(self.keys.dtype)),
                self.values.at[layer_index, rows, position].set(
                    values[:, 0].astype(self.values.dtype)
                ),
            )
        at = (layer_index, 0, position, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(self.keys, keys[None].astype(self.keys.dtype), at),
            jax.lax.dynamic_update_slice(self.values, values[None].astype(self.values.dtype), at),
        )


class PrefillAux(NamedTuple):
    """Extra prefill outputs: last-layer hidden [B,T,d] (before the final norm), and the
    per-layer block density [L] float32 (ones for dense attention)."""

    hidden: jax.Array
    density: jax.Array
