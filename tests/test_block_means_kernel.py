"""The block-means kernel against the rule it evaluates, and the planner's GPU path through it.

- ``masked_block_means`` (Pallas, interpret mode here) against ``block_means`` (jnp: pad,
  reshape, mean) of the rows zeroed past the lengths (an independent statement: the padding in
  XLA, the lengths by ``pbs_jax.grid.zero_padding``): fresh random rows, N a multiple of the
  block, not a multiple (a partial last block) and shorter than one block; float32, bfloat16
  and float16; H 1 to 4, D 16 to 128; blocks of 16, 64 and 128; two batch rows, with and
  without ragged lengths (a length of 1, of N, inside a block and on a block boundary); one and
  several row steps per block;
- rows past a length count as zeros: the kernel with ``lengths`` is the kernel on rows zeroed
  past them;
- ``mean_pool_blocks`` on GPU (run here with the kernel in interpret mode) takes the kernel
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
    block_means,
    masked_block_means,
    masked_block_means_supported,
    pool_tiles,
)
from pbs_jax import selection
from pbs_jax.grid import zero_padding
from tests.conftest import interpret_on_fake_gpu

BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
    rows: int  # N
    heads: int  # H
    head_dim: int  # D
    dtype: str
    block_size: int = 64
    lengths: tuple[int, ...] | None = None
    tiles: PoolTiles | None = None

    @property
    def id(self) -> str:
        tiles = "" if self.tiles is None else f"-r{self.tiles.rows}"
        lengths = "" if self.lengths is None else "-L" + "_".join(map(str, self.lengths))
        return (
            f"{self.dtype}-N{self.rows}-h{self.heads}-d{self.head_dim}-b{self.block_size}"
            f"{lengths}{tiles}"
        )


CASES = [
    # N a multiple of the block: plain loads.
    Case(256, 2, 32, "float32"),
    Case(256, 3, 16, "bfloat16", lengths=(256, 1)),  # a length of N and a length of 1
    # A partial last block: masked loads, with and without lengths.
    Case(200, 2, 64, "float32", lengths=(1, 200)),
    Case(200, 1, 32, "bfloat16", block_size=16),
    Case(300, 2, 128, "bfloat16", block_size=128, lengths=(300, 129)),
    # N shorter than one block: a single partial block.
    Case(100, 2, 16, "float16", block_size=128, lengths=(100, 37)),
    # Several row steps per block (the fori over row tiles), lengths on and inside a block.
    Case(384, 4, 32, "float32", block_size=128, tiles=PoolTiles(rows=32)),
    Case(200, 2, 32, "bfloat16", lengths=(128, 63), tiles=PoolTiles(rows=16)),
]


def _tolerance() -> dict:
    """The kernel adds exact float32 conversions of the rows in another order than
    ``block_means``: float32 rounding of a sum of ~N(0, 1) values, whatever the input dtype."""
    return dict(rtol=1e-6, atol=1e-6)


def _operands(case: Case, seed: int = 0):
    x = jax.random.normal(
        jax.random.key(seed),
        (BATCH, case.rows, case.heads, case.head_dim),
        jnp.float32,
    ).astype(jnp.dtype(case.dtype))
    lengths = None if case.lengths is None else jnp.asarray(case.lengths, jnp.int32)
    return x, lengths


def _zeroed_past(x, lengths):
    """x with the rows at positions ``>= lengths[b]`` set to zero (x itself without lengths)."""
    return x if lengths is None else zero_padding(x, lengths)


@functools.cache
def _run(case: Case):
    """(kernel, oracle) of one case, computed once per session."""
    x, lengths = _operands(case)
    # interpret=None: the compiled kernel on a GPU, interpret mode elsewhere.
    kernel = masked_block_means(
        x, block_size=case.block_size, lengths=lengths, tiles=case.tiles, interpret=None
    )
    oracle = block_means(_zeroed_past(x, lengths), case.block_size)
    return np.asarray(kernel), np.asarray(oracle)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_equals_block_means(case):
    kernel, oracle = _run(case)
    t = -(-case.rows // case.block_size)
    chex.assert_shape(kernel, (BATCH, t, case.heads, case.head_dim))
    assert kernel.dtype == np.float32
    chex.assert_trees_all_close(kernel, oracle, **_tolerance())


@pytest.mark.parametrize("case", [c for c in CASES if c.lengths is not None], ids=lambda c: c.id)
def test_rows_past_a_length_count_as_zeros(case):
    """Blocks wholly past a row's length are zero, and the kernel with ``lengths`` is the kernel
    without them on rows zeroed past the lengths (the same sums: zeros added in place)."""
    kernel, _ = _run(case)
    for row, length in enumerate(case.lengths):
        np.testing.assert_array_equal(kernel[row, -(-length // case.block_size) :], 0.0)
    x, lengths = _operands(case)
    unmasked = masked_block_means(
        _zeroed_past(x, lengths), block_size=case.block_size, tiles=case.tiles
    )
    np.testing.assert_array_equal(np.asarray(unmasked), kernel)


def test_mean_pool_blocks_on_gpu_runs_the_kernel(monkeypatch):
    """``mean_pool_blocks`` on GPU (the kernel, interpret mode here) equals its CPU path, with
    and without lengths."""
    case = CASES[2]
    x, lengths = _operands(case)
    ran = 0
    for lens in (None, lengths):
        on_cpu = selection.mean_pool_blocks(x, case.block_size, lens)
        with monkeypatch.context() as patch:
            calls = interpret_on_fake_gpu(patch, selection, "masked_block_means")
            on_gpu = jax.jit(selection.mean_pool_blocks, static_argnums=1)(x, case.block_size, lens)
        chex.assert_trees_all_close(on_gpu, on_cpu, **_tolerance())
        ran += len(calls["masked_block_means"])
    assert ran == 2, "the GPU path did not run the kernel"


def test_mean_pool_blocks_keeps_the_jnp_path_for_unsupported_blocks(monkeypatch):
    """A block size the kernel does not take (not a power of two) keeps the jnp path on GPU."""
    x, lengths = _operands(CASES[2])

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel ran for a block size it does not take")

    with monkeypatch.context() as patch:
        patch.setattr(jax, "default_backend", lambda: "gpu")
        patch.setattr(selection, "masked_block_means", no_kernel)
        out = selection.mean_pool_blocks(x, 48, lengths)
    chex.assert_trees_all_close(out, block_means(_zeroed_past(x, lengths), 48))


def test_default_tiles():
    assert pool_tiles(128, 128) == PoolTiles(rows=128, num_warps=8, num_stages=2)
    assert pool_tiles(64, 32) == PoolTiles(rows=64)
    assert pool_tiles(16, 16) == PoolTiles(rows=16)
    assert pool_tiles(128, 256) == PoolTiles(rows=64)
    assert pool_tiles(256, 64) == PoolTiles(rows=256)


@pytest.mark.parametrize(
    "kwargs", [dict(rows=0), dict(rows=24), dict(num_warps=3), dict(num_stages=0)]
)
def test_bad_tiles_raise(kwargs):
    with pytest.raises(ValueError, match="PoolTiles"):
        PoolTiles(**kwargs)


def _x(b=2, n=200, h=2, d=32, dtype=jnp.float32):
    return jnp.zeros((b, n, h, d), dtype)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (_x(), dict(block_size=48), "block_size must be a power of two >= 16"),
        (_x(), dict(block_size=8), "block_size must be a power of two >= 16"),
        (_x(), dict(block_size=64.0), "block_size must be an int"),
        (jnp.zeros((2, 200, 32)), dict(block_size=64), "x must be a 4-d array"),
        (_x(n=0), dict(block_size=64), "B, N and H >= 1"),
        (_x(d=48), dict(block_size=64), "power of two"),
        (_x(d=512), dict(block_size=64), "power of two"),
        (_x(dtype=jnp.int32), dict(block_size=64), "x.dtype"),
        (_x(), dict(block_size=64, lengths=jnp.zeros((3,), jnp.int32)), "lengths"),
        (_x(), dict(block_size=64, lengths=jnp.zeros((2,), jnp.float32)), "lengths"),
        (_x(), dict(block_size=64, tiles=PoolTiles(rows=128)), "divide block_size"),
        (_x(), dict(block_size=64, tiles=(64, 8, 2)), "tiles must be a PoolTiles"),
    ],
)
def test_contract_violations_raise(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        masked_block_means(x, interpret=True, **kwargs)
    if "lengths" not in kwargs and "tiles" not in kwargs:
        assert not masked_block_means_supported(x, block_size=kwargs["block_size"])


def test_supported_shapes():
    assert masked_block_means_supported(_x(), block_size=64)
    assert masked_block_means_supported(_x(n=1000, h=1, dtype=jnp.bfloat16), block_size=16)
    assert masked_block_means_supported(_x(d=256, dtype=jnp.float16), block_size=128)
