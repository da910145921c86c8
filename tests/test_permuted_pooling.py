"""The permuted-pooling kernel against its two oracles, and the planner's GPU path through it.

- ``permuted_block_means`` (Pallas, interpret mode here) against
  ``permuted_block_means_reference`` (the keys gathered in slot order, then block means) and
  against the one-hot einsum of ``pbs_jax.selection.pooled_permuted_keys`` (its CPU path, an
  independent statement: an inverse permutation and a contraction): fresh random keys and a
  random permutation inside every complete segment, N a multiple of the segment, with an
  incomplete last segment, and not a multiple of the block; Hkv 1 and 2; Hp / Hkv 1 (the
  "shared" heads), 3 and 4; float32 and bfloat16; with and without ``lengths`` (a row shorter
  than one segment, lengths inside a complete and inside the incomplete segment); several
  gather tiles per block and a block size that is not a power of two;
- ``pooled_permuted_keys`` on GPU (run here with the kernel in interpret mode) takes the kernel
  and equals its CPU path;
- the contract's validation and the default tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    PoolTiles,
    permuted_block_means,
    permuted_block_means_reference,
    permuted_block_means_supported,
    pool_tiles,
)
from pbs_jax import selection
from pbs_jax.grid import zero_padding
from tests.conftest import interpret_on_fake_gpu

BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
    keys: int  # N
    kv_heads: int  # Hkv
    group: int  # Hp / Hkv
    dtype: str
    lengths: tuple[int, ...] | None = None
    block_size: int = 64
    segment_size: int = 256
    head_dim: int = 32
    tiles: PoolTiles | None = None

    @property
    def id(self) -> str:
        tiles = "" if self.tiles is None else f"-g{self.tiles.rows}"
        lengths = "" if self.lengths is None else "-L" + "_".join(map(str, self.lengths))
        return (
            f"{self.dtype}-N{self.keys}-kv{self.kv_heads}-r{self.group}-b{self.block_size}"
            f"-s{self.segment_size}-d{self.head_dim}{lengths}{tiles}"
        )


CASES = [
    # N a multiple of the segment (2 segments of 4 blocks): every block from the kernel.
    Case(512, 1, 1, "float32"),
    Case(512, 2, 4, "bfloat16", lengths=(512, 100)),  # a row shorter than one segment
    # An incomplete last segment of whole blocks (3 segments + 1 block in place).
    Case(832, 2, 3, "float32", lengths=(600, 831)),
    Case(832, 1, 4, "bfloat16", head_dim=64),
    # N not a multiple of the block: the incomplete segment ends in a partial block.
    Case(1000, 2, 1, "bfloat16", lengths=(950, 100)),  # "shared": one perm head per KV head
    Case(1000, 1, 3, "float32", head_dim=16),
    Case(1000, 2, 4, "float32", lengths=(1000, 255)),
    Case(1300, 2, 3, "bfloat16"),
    # Four gather tiles per block (the fori over chunks), and a 48-key block (gathers of 16).
    Case(1000, 2, 4, "bfloat16", tiles=PoolTiles(rows=16)),
    Case(1000, 1, 3, "float32", block_size=48, segment_size=192, lengths=(1000, 50)),
    # N shorter than one segment: no kernel launch, the blocks of the keys in place.
    Case(200, 2, 3, "float32", lengths=(200, 130)),
]


def _tolerance(dtype: str) -> dict:
    """The kernel adds exact float32 conversions of the keys in another order than its
    oracles: float32 rounding of a sum, relative (bf16 keys add exactly as float32 do; the
    einsum's bf16 operands times a 0/1 one-hot are exact too)."""
    return dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-5, atol=1e-5)


def segment_permutation(key, b: int, hp: int, n: int, segment_size: int) -> jax.Array:
    """``[B, Hp, N]`` int32: a fresh random permutation inside each complete segment
    (``jax.random.permutation`` of every segment's slots), the incomplete last segment in
    place."""
    num_segments = n // segment_size
    complete = num_segments * segment_size
    local = jnp.broadcast_to(
        jnp.arange(segment_size, dtype=jnp.int32), (b, hp, num_segments, segment_size)
    )
    local = jax.random.permutation(key, local, axis=-1, independent=True)
    starts = (jnp.arange(num_segments, dtype=jnp.int32) * segment_size)[:, None]
    tail = jnp.broadcast_to(jnp.arange(complete, n, dtype=jnp.int32), (b, hp, n - complete))
    return jnp.concatenate([(local + starts).reshape(b, hp, complete), tail], axis=-1)


def _operands(case: Case, seed: int = 0):
    key_k, key_p = jax.random.split(jax.random.key(seed))
    k = jax.random.normal(
        key_k, (BATCH, case.keys, case.kv_heads, case.head_dim), jnp.dtype(case.dtype)
    )
    perm = segment_permutation(
        key_p, BATCH, case.kv_heads * case.group, case.keys, case.segment_size
    )
    lengths = None if case.lengths is None else jnp.asarray(case.lengths, jnp.int32)
    return k, perm, lengths


def _einsum_path(k, perm, case: Case, lengths):
    """``pooled_permuted_keys``' one-hot einsum, whatever the backend (the kernel's
    independent oracle)."""
    return selection.one_hot_pooled_permuted_keys(
        k, perm, case.block_size, case.segment_size, lengths
    )


@functools.cache
def _run(case: Case):
    """(kernel, reference, einsum) of one case, computed once per session."""
    k, perm, lengths = _operands(case)
    kwargs = dict(block_size=case.block_size, segment_size=case.segment_size, lengths=lengths)
    # interpret=None: the compiled kernel on a GPU, interpret mode elsewhere.
    kernel = permuted_block_means(k, perm, tiles=case.tiles, interpret=None, **kwargs)
    reference = permuted_block_means_reference(k, perm, **kwargs)
    einsum = _einsum_path(k, perm, case, lengths)
    return tuple(np.asarray(x) for x in (kernel, reference, einsum))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_equals_the_reference(case):
    kernel, reference, _ = _run(case)
    t = -(-case.keys // case.block_size)
    chex.assert_shape(kernel, (BATCH, t, case.kv_heads * case.group, case.head_dim))
    assert kernel.dtype == np.float32
    chex.assert_trees_all_close(kernel, reference, **_tolerance(case.dtype))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_equals_the_one_hot_einsum(case):
    kernel, _, einsum = _run(case)
    chex.assert_trees_all_close(kernel, einsum, **_tolerance(case.dtype))


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=lambda c: c.id)
def test_keys_past_a_length_count_as_zero_padding(case):
    """Blocks wholly past a row's length are zero; the kernel without ``lengths`` on keys
    zeroed past the lengths is the kernel with them."""
    kernel, _, _ = _run(case)
    k, perm, lengths = _operands(case)
    for row, length in enumerate(case.lengths):
        first_empty = -(-length // case.block_size)
        if length < case.keys // case.segment_size * case.segment_size:
            # Permuted slots: a block of a segment straddling the length may hold any key of
            # it, so only the segments wholly past the length are known to be zero.
            first_empty = -(-length // case.segment_size) * (case.segment_size // case.block_size)
        np.testing.assert_array_equal(kernel[row, first_empty:], 0.0)
    unmasked = permuted_block_means(
        zero_padding(k, lengths), perm, block_size=case.block_size, segment_size=case.segment_size
    )
    np.testing.assert_array_equal(np.asarray(unmasked), kernel)


def test_each_permutation_head_pools_its_own_order():
    """A permutation head differing from its neighbour in one segment changes that segment's
    blocks of that head only (the kernel loops over a KV head's permutation heads)."""
    case = CASES[6]
    k, perm, _ = _operands(case)
    kwargs = dict(block_size=case.block_size, segment_size=case.segment_size)
    base = np.asarray(permuted_block_means(k, perm, **kwargs))
    seg = case.segment_size
    swapped = perm.at[:, 5, seg : 2 * seg].set(perm[:, 5, seg : 2 * seg][:, ::-1])
    out = np.asarray(permuted_block_means(k, swapped, **kwargs))
    spb = seg // case.block_size
    changed = np.abs(out - base).max(axis=(0, 3)) > 0  # [T, Hp]
    expected = np.zeros_like(changed)
    expected[spb : 2 * spb, 5] = True
    np.testing.assert_array_equal(changed, expected)


def test_pooled_permuted_keys_on_gpu_runs_the_kernel(monkeypatch):
    """``pooled_permuted_keys`` on GPU (the kernel, interpret mode here) equals its CPU path,
    with and without lengths."""
    case = CASES[6]
    k, perm, lengths = _operands(case)
    ran = 0
    for lens in (None, lengths):
        on_cpu = _einsum_path(k, perm, case, lens)
        with monkeypatch.context() as patch:
            calls = interpret_on_fake_gpu(patch, selection, "permuted_block_means")
            on_gpu = jax.jit(
                functools.partial(
                    selection.pooled_permuted_keys,
                    block_size=case.block_size,
                    segment_size=case.segment_size,
                )
            )(k, perm, lengths=lens)
        chex.assert_trees_all_close(on_gpu, on_cpu, **_tolerance(case.dtype))
        ran += len(calls["permuted_block_means"])
    assert ran == 2, "the GPU path did not run the kernel"


def test_default_tiles():
    assert pool_tiles(128, 128) == PoolTiles(rows=128, num_warps=8)
    assert pool_tiles(64, 32) == PoolTiles(rows=64, num_warps=8)
    assert pool_tiles(48, 16) == PoolTiles(rows=16, num_warps=8)
    assert pool_tiles(128, 256) == PoolTiles(rows=64, num_warps=8)
    assert pool_tiles(256, 32) == PoolTiles(rows=256, num_warps=8)


@pytest.mark.parametrize(
    "kwargs",
    [dict(rows=0), dict(rows=24), dict(num_warps=3), dict(num_stages=0)],
)
def test_bad_tiles_raise(kwargs):
    with pytest.raises(ValueError, match="PoolTiles"):
        PoolTiles(**kwargs)


def _shapes(b=1, n=512, hkv=2, hp=4, d=32, dtype=jnp.float32, perm_dtype=jnp.int32):
    return jnp.zeros((b, n, hkv, d), dtype), jnp.zeros((b, hp, n), perm_dtype)


@pytest.mark.parametrize(
    "operands, kwargs, match",
    [
        (_shapes(), dict(block_size=64, segment_size=96), "multiple of block_size"),
        (_shapes(), dict(block_size=0, segment_size=256), "block_size must be a positive int"),
        (_shapes(), dict(block_size=64, segment_size=256.0), "segment_size must be"),
        (_shapes(d=48), dict(block_size=64, segment_size=256), "power of two"),
        (_shapes(d=512), dict(block_size=64, segment_size=256), "power of two"),
        (_shapes(dtype=jnp.int32), dict(block_size=64, segment_size=256), "k.dtype"),
        (_shapes(hp=3), dict(block_size=64, segment_size=256), "multiple of Hkv"),
        (_shapes(perm_dtype=jnp.float32), dict(block_size=64, segment_size=256), "integer"),
        (
            (jnp.zeros((1, 512, 2, 32)), jnp.zeros((1, 4, 500), jnp.int32)),
            dict(block_size=64, segment_size=256),
            "perm must be",
        ),
        (
            _shapes(),
            dict(block_size=64, segment_size=256, lengths=jnp.zeros((2,), jnp.int32)),
            "lengths",
        ),
        (
            _shapes(),
            dict(block_size=64, segment_size=256, tiles=PoolTiles(rows=128)),
            "divide block_size",
        ),
    ],
)
def test_contract_violations_raise(operands, kwargs, match):
    k, perm = operands
    with pytest.raises(ValueError, match=match):
        permuted_block_means(k, perm, interpret=True, **kwargs)
    if "lengths" not in kwargs and "tiles" not in kwargs:
        sizes = dict(block_size=kwargs["block_size"], segment_size=kwargs["segment_size"])
        assert not permuted_block_means_supported(k, perm, **sizes)


def test_supported_shapes():
    k, perm = _shapes()
    assert permuted_block_means_supported(k, perm, block_size=64, segment_size=256)
    k, perm = _shapes(n=1000, hkv=1, hp=1, dtype=jnp.bfloat16)
    assert permuted_block_means_supported(k, perm, block_size=48, segment_size=96)
