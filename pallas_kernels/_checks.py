"""The rules every kernel module shares, each stated once: argument validation, the tile
dataclasses' field checks, and the few constants and launch rules of the kernel entries.

Everything checked here is static (shapes, dtypes, Python ints), so it runs at trace time and
works under an outer `jax.jit`. Data-dependent properties of the block lists (ids in range,
ascending order) cannot be checked without a host sync; the kernel clamps them for memory
safety instead (see `block_sparse_attention`).

Contents:
  LOG2E, FLOAT_DTYPES, MIN_DOT_DIM, MAX_HEAD_DIM, MGPU_*
                                                  shared constants
  is_int, is_pow2, largest_pow2_divisor           the integer predicates and tile rounding
  check_pow2_at_least, check_num_warps, check_num_stages
                                                  the tile dataclasses' field rules
  check_dot_head_dim                              a head dim that can be a Triton dot operand
  ROW_TILE_ELEMENTS, row_tile, check_row_head_dim, check_lengths
                                                  the pooling kernels' default row tile, head
                                                  dim and ragged lengths
  resolve_interpret, accepts                      the kernel entries' interpret default and
                                                  the ``*_supported`` rule
  dot_precision, shared_head, triton_launch_params, triton_compiler_params
                                                  the Triton launches' common pieces
  check_query_offset, validate, validate_mgpu     the attention kernels' contracts
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Softmax in base 2 everywhere: log2(e) folded into the logit scale, exp2 in the kernels.
LOG2E = math.log2(math.e)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Smallest dimension of a Triton dot operand (``tl.dot`` needs M, N, K >= 16).
MIN_DOT_DIM = 16
MAX_HEAD_DIM = 256
# Triton warps per program: a power of two up to this.
_MAX_NUM_WARPS = 32
# The Mosaic GPU kernel: two 64-row wgmma warpgroups per 128-row block; SMEM holds the Q tiles
# and a 2-slot K/V ring, which fits D 64 or 128.
MGPU_BLOCK_SIZE = 128
MGPU_HEAD_DIMS = (64, 128)
MGPU_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Dims:
    batch: int
    seq_len: int
    num_q_heads: int
    num_kv_heads: int
    num_perm_heads: int
    head_dim: int
    num_blocks: int  # Tq = ceil(M / block_size): the query blocks (M = seq_len)
    max_listed: int  # Kmax
    kv_len: int  # N >= M: the queries are the last M of the N key positions


def check_query_offset(m: int, n: int, block_size: int) -> None:
    """Queries ``[B, M, ...]`` are the last M of the N key positions: M <= N and N - M a
    multiple of ``block_size`` (a chunk starts on a block boundary: its query blocks are the
    whole sequence's last blocks)."""
    if m > n or (n - m) % block_size:
        raise ValueError(
            f"the M = {m} queries must be the last M of the N = {n} keys, starting on a block "
            f"boundary: M <= N and N - M a multiple of block_size = {block_size}"
        )


def is_int(x) -> bool:
    """A Python or numpy integer; bools (and floats, arrays, ...) are not."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing ``n`` and at most ``cap`` (both positive)."""
    return min(n & -n, cap)


def is_pow2(x) -> bool:
    """A positive integer power of two (:func:`is_int`): every Triton tile size."""
    return is_int(x) and x > 0 and (x & (x - 1)) == 0


def check_pow2_at_least(cls_name: str, field: str, value, minimum: int) -> None:
    """Raise ValueError unless ``value`` (field ``cls_name.field``) is a power of two >=
    ``minimum``."""
    if not is_pow2(value) or value < minimum:
        raise ValueError(f"{cls_name}.{field} must be a power of two >= {minimum}, got {value!r}")


def check_num_warps(cls_name: str, value) -> None:
    """Raise ValueError unless ``value`` is a Triton warp count: a power of two in [1, 32]."""
    if not is_pow2(value) or value > _MAX_NUM_WARPS:
        raise ValueError(
            f"{cls_name}.num_warps must be a power of two in [1, {_MAX_NUM_WARPS}], got {value!r}"
        )


def check_num_stages(cls_name: str, value) -> None:
    """Raise ValueError unless ``value`` is a Triton pipelining depth: an int >= 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{cls_name}.num_stages must be an int >= 1, got {value!r}")


# Elements of one [rows, D] tile that the pooling kernels load and add per step by default: 16K
# float32 values are 64 per thread at 8 warps.
ROW_TILE_ELEMENTS = 16 * 1024


def row_tile(block_size: int, head_dim: int) -> int:
    """Rows of a pooling kernel's default ``[rows, D]`` tile: the largest power of two dividing
    block_size with at most :data:`ROW_TILE_ELEMENTS` elements."""
    return largest_pow2_divisor(block_size, max(1, ROW_TILE_ELEMENTS // head_dim))


def check_row_head_dim(d) -> None:
    """Raise ValueError unless head dim ``d`` can be a Triton tensor dimension of a kernel
    with no dot: a power of two <= MAX_HEAD_DIM."""
    if not is_pow2(d) or d > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D={d} must be a power of two <= {MAX_HEAD_DIM} (a Triton tensor dimension)"
        )


def check_lengths(lengths, batch: int) -> None:
    """Raise ValueError unless ``lengths`` is None or an integer ``[B]`` array."""
    if lengths is not None and (
        getattr(lengths, "shape", None) != (batch,)
        or not jnp.issubdtype(lengths.dtype, jnp.integer)
    ):
        raise ValueError(
            f"lengths must be None or an integer [B] = [{batch}] array, got {lengths!r:.80}"
        )


def check_dot_head_dim(d) -> None:
    """Raise ValueError unless head dim ``d`` can be a Triton dot operand: a power of two in
    [MIN_DOT_DIM, MAX_HEAD_DIM]."""
    if not is_pow2(d) or not MIN_DOT_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim must be a power of two in [{MIN_DOT_DIM}, {MAX_HEAD_DIM}] "
            f"(a Triton dot operand), got {d}"
        )


def softmax_scale(head_dim: int, sm_scale: float | None = None) -> float:
    """The attention kernels' and references' softmax scale: ``sm_scale``, default 1/√D."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale


def resolve_interpret(interpret: bool | None) -> bool:
    """A kernel entry's ``interpret`` argument: None means "when the default backend is not a
    GPU" (Pallas interpret mode on CPU)."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def accepts(validate: Callable, *args, **kwargs) -> bool:
    """Whether ``validate(*args, **kwargs)`` passes (raises no ValueError): the rule of every
    ``*_supported`` function, which asks a kernel's own contract check."""
    try:
        validate(*args, **kwargs)
    except ValueError:
        return False
    return True


def dot_precision(dtype):
    """The Triton dots' precision: IEEE float32 (HIGHEST) for float32 inputs, the default (one
    16-bit MMA) otherwise."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def shared_head(h, group: int):
    """The head (K/V or permutation) that query head ``h`` reads when ``group`` query heads
    share one, in a BlockSpec index map."""
    return lax.div(h, group)  # lax.div, as jax ops do for program-id math


def triton_launch_params(*, num_warps: int, num_stages: int):
    """Explicit Triton launch parameters (the default GPU backend differs between JAX versions:
    every Triton kernel passes its own)."""
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_compiler_params(tiles):
    """Triton launch parameters of a tile dataclass (its ``num_warps`` and ``num_stages``)."""
    return triton_launch_params(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _shape(name, x):
    try:
        return tuple(int(d) for d in x.shape)
    except AttributeError:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}") from None


def validate(
    q, k, v, key_pos, block_ids, full_counts, total_counts, *, block_size: int, sm_scale
) -> Dims:
    """Check the kernel contract; raise ValueError naming the argument and the rule."""
    if not is_int(block_size):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    if not is_pow2(block_size) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if sm_scale is not None and not (
        isinstance(sm_scale, (int, float, np.floating)) and np.isfinite(sm_scale) and sm_scale > 0
    ):
        raise ValueError(f"sm_scale must be None or a finite positive float, got {sm_scale!r}")

    qs, ks, vs = _shape("q", q), _shape("k", k), _shape("v", v)
    if len(qs) != 4:
        raise ValueError(f"q must have rank 4 [B, N, Hq, D], got shape {qs}")
    if len(ks) != 4:
        raise ValueError(f"k must have rank 4 [B, N, Hk, D], got shape {ks}")
    if vs != ks:
        raise ValueError(f"v must have the same shape as k {ks}, got {vs}")
    b, n, hq, d = qs
    if n == 0:
        raise ValueError("q must have a sequence length N >= 1, got N = 0")
    if ks[0] != b or ks[3] != d:
        raise ValueError(f"k/v must be [B, N, Hk, D] with B={b}, D={d} taken from q {qs}, got {ks}")
    n_kv = ks[1]
    check_query_offset(n, n_kv, block_size)
    hk = ks[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"Hq={hq} (q.shape[2]) must be a multiple of Hk={hk} (k.shape[2])")
    if not is_pow2(d) or d < 16 or d > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D={d} must be a power of two in [16, {MAX_HEAD_DIM}] (Triton tensor "
            "shapes are powers of two; pad D yourself otherwise)"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype).name not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")

    kps = _shape("key_pos", key_pos)
    if len(kps) != 3 or kps[0] != b or kps[2] != n_kv:
        raise ValueError(f"key_pos must be [B, Hp, N] = [{b}, Hp, {n_kv}], got shape {kps}")
    hp = kps[1]
    if hp == 0 or hq % hp:
        raise ValueError(f"Hq={hq} must be a multiple of Hp={hp} (key_pos.shape[1])")

    t = pl.cdiv(n, block_size)
    ids = _shape("block_ids", block_ids)
    if len(ids) != 4 or ids[:3] != (b, hq, t):
        raise ValueError(
            f"block_ids must be [B, Hq, Tq, Kmax] = [{b}, {hq}, {t}, Kmax] with "
            f"Tq = ceil(M / block_size) = ceil({n} / {block_size}), got shape {ids}"
        )
    for name, x in (("full_counts", full_counts), ("total_counts", total_counts)):
        s = _shape(name, x)
        if s != (b, hq, t):
            raise ValueError(f"{name} must be [B, Hq, Tq] = [{b}, {hq}, {t}], got shape {s}")
    for name, x in (
        ("key_pos", key_pos),
        ("block_ids", block_ids),
        ("full_counts", full_counts),
        ("total_counts", total_counts),
    ):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype (int32), got {x.dtype}")
    return Dims(b, n, hq, hk, hp, d, t, ids[3], n_kv)


def validate_mgpu(q, k_perm, v_perm, k, v, block_ids, off_counts, *, block_size: int) -> None:
    """Check the Mosaic GPU kernel's contract; raise ValueError naming the argument and rule."""
    shapes = {
        name: _shape(name, x)
        for name, x in (
            ("q", q),
            ("k_perm", k_perm),
            ("v_perm", v_perm),
            ("k", k),
            ("v", v),
            ("block_ids", block_ids),
            ("off_counts", off_counts),
        )
    }
    if len(shapes["q"]) != 4:
        raise ValueError(f"q must have rank 4 [B, N, Hq, D], got shape {shapes['q']}")
    b, n, hq, d = shapes["q"]
    if block_size != MGPU_BLOCK_SIZE or n == 0 or n % block_size:
        raise ValueError(
            f"N ({n}) must be a positive multiple of block_size ({block_size}) and block_size "
            f"must be {MGPU_BLOCK_SIZE}"
        )
    n_kv = shapes["k_perm"][1] if len(shapes["k_perm"]) == 4 else n  # k, v: checked below
    if d not in MGPU_HEAD_DIMS:
        raise ValueError(
            f"head dim must be one of {MGPU_HEAD_DIMS} (SMEM holds Q and a 2-slot K/V ring), "
            f"got {d}"
        )
    dtypes = [jnp.dtype(x.dtype).name for x in (q, k_perm, v_perm, k, v)]
    if dtypes[0] not in MGPU_DTYPES or len(set(dtypes)) != 1:
        raise ValueError(
            f"q, k_perm, v_perm, k and v must share one 16-bit dtype {MGPU_DTYPES}, got {dtypes}"
        )
    kp, kk = shapes["k_perm"], shapes["k"]
    if (
        len(kp) != 4
        or len(kk) != 4
        or shapes["v_perm"] != kp
        or shapes["v"] != kk
        or kp[:2] != (b, n_kv)
        or kk[:2] != (b, n_kv)
        or kp[3] != d
        or kk[3] != d
        or kp[2] == 0
        or kk[2] == 0
        or hq % kp[2]
        or hq % kk[2]
    ):
        raise ValueError(
            "k_perm/v_perm must be [B, N, Hp, D] and k/v [B, N, Hkv, D] with Hp and Hkv "
            f"dividing Hq (q [B, M, Hq, D], the last M of N positions); got q {shapes['q']}, "
            f"k_perm {kp}, k {kk}"
        )
    check_query_offset(n, n_kv, block_size)
    t = n // block_size
    if len(shapes["block_ids"]) != 4 or shapes["block_ids"][:3] != (b, hq, t):
        raise ValueError(
            f"block_ids must be [B, Hq, T, Kmax] = [{b}, {hq}, {t}, Kmax], got "
            f"{shapes['block_ids']}"
        )
    if shapes["off_counts"] != (b, hq, t):
        raise ValueError(
            f"off_counts must be [B, Hq, T] = [{b}, {hq}, {t}], got {shapes['off_counts']}"
        )
    for name, x in (("block_ids", block_ids), ("off_counts", off_counts)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype (int32), got {x.dtype}")
