"""Pure jitted entry points of a Llama and ``JittedLlama``, the object studies run.

Each function takes ``(graphdef, state)`` from ONE ``nnx.split`` and merges inside the jit, so
no NNX graph walking happens in timed paths (the Flax NNX performance guide's advice).
``attention`` (models.attention_spec) is a static argument everywhere.

Shapes: B batch, T tokens, S cache length, L layers, V vocabulary, d d_model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention_spec import FULL_ATTENTION, AttentionSpec, resolve_attention
from models.cache import KVCache
from models.config import LlamaConfig
from models.llama import Llama, check_prefill_arguments
from pbs_jax import validate_lengths

__all__ = [
    "JittedLlama",
    "decode_step",
    "forward",
    "generate",
    "greedy_decode",
    "output_logits",
    "prefill",
]


@functools.partial(jax.jit, static_argnames=("attention", "return_aux"))
def forward(graphdef, state, tokens, attention=FULL_ATTENTION, return_aux=False, lengths=None):
    """Jitted ``Llama.__call__``: tokens [B,T] -> logits [B,T,V] (, density [L]); lengths [B]
    for a right-padded batch."""
    return nnx.merge(graphdef, state)(tokens, attention, return_aux=return_aux, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("attention", "max_len", "return_aux", "chunk_size"))
def prefill(
    graphdef,
    state,
    tokens,
    attention=FULL_ATTENTION,
    max_len=None,
    return_aux=False,
    chunk_size=None,
    lengths=None,
):
    """Jitted ``Llama.prefill``: tokens [B,T] -> (last logits [B,V], KVCache [L,B,max_len,..]
    (, PrefillAux)); ``chunk_size``: chunked prefill (None: the whole prompt at once); lengths
    [B] for a right-padded batch (one compile for every lengths)."""
    return nnx.merge(graphdef, state).prefill(
        tokens,
        attention,
        max_len=max_len,
        return_aux=return_aux,
        lengths=lengths,
        chunk_size=chunk_size,
    )


@jax.jit
def output_logits(graphdef, state, hidden):
    """Jitted ``Llama.output_logits``: hidden [..., d] -> logits [..., V] float32."""
    return nnx.merge(graphdef, state).output_logits(hidden)


@functools.partial(jax.jit, donate_argnames=("cache",))
def decode_step(graphdef, state, token, cache, position):
    """Jitted ``Llama.decode_step`` (the cache buffer is donated and updated in place)."""
    return nnx.merge(graphdef, state).decode_step(token, cache, position)


@functools.partial(jax.jit, static_argnames=("num_tokens",), donate_argnames=("cache",))
def greedy_decode(graphdef, state, last_logits, cache, start_position, num_tokens):
    """Greedy continuation after a prefill, under one lax.scan.

    last_logits [B,V] (the prefill's), start_position = prompt length -> (tokens
    [B,num_tokens] int32, cache). Token i is argmax of the logits at position start+i-1.
    start_position [B] (a ragged batch: its ``lengths``) continues each row from its own.
    """
    model = nnx.merge(graphdef, state)
    first = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
    if num_tokens <= 1:
        return first[:, None][:, :num_tokens], cache

    def step(carry, _):
        token, cache, position = carry
        logits, cache = model.decode_step(token, cache, position)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (next_token, cache, position + 1), next_token

    start = jnp.asarray(start_position, jnp.int32)
    (_, cache, _), rest = jax.lax.scan(step, (first, cache, start), None, length=num_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1), cache


def generate(
    graphdef,
    state,
    prompt_tokens,
    max_new_tokens: int,
    attention: AttentionSpec = FULL_ATTENTION,
    lengths=None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Greedy generation: prompt [B,T] -> new tokens [B,max_new_tokens] int32.

    Prefill with ``attention`` (dense or PBS; ``chunk_size`` tokens at a time when given), then
    dense decode against the cache. No early stop at EOS (fixed shapes); trim on the host.
    ``lengths [B]``: a right-padded batch, row b's prompt is ``prompt[b, :lengths[b]]`` and its
    new tokens continue from there (not with ``chunk_size``).
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt_tokens.ndim == 1:
        return generate(
            graphdef, state, prompt_tokens[None], max_new_tokens, attention, chunk_size=chunk_size
        )[0]
    attention = resolve_attention(attention)
    length = prompt_tokens.shape[1]
    max_len = length + max_new_tokens
    lengths = check_prefill_arguments(  # before tracing: a one-line error
        prompt_tokens.shape, attention, max_len=max_len, chunk_size=chunk_size, lengths=lengths
    )
    last_logits, cache = prefill(
        graphdef,
        state,
        prompt_tokens,
        attention,
        max_len=max_len,
        lengths=lengths,
        chunk_size=chunk_size,
    )
    start = length if lengths is None else lengths
    tokens, _ = greedy_decode(graphdef, state, last_logits, cache, start, max_new_tokens)
    return tokens


class JittedLlama:
    """A Llama split once into ``(graphdef, state)``; every method is a pure jitted function.

    Everything a study runs goes through it (no need for the module-level functions):

    - ``runner(tokens, attention="full", *, return_aux=False)``: tokens [B,T] -> logits
      [B,T,V] float32; with ``return_aux`` also the per-layer density [L].
    - ``runner.prefill(tokens, attention="full", *, max_len=None, return_aux=False,
      chunk_size=None)``: -> (last-position logits [B,V], KVCache [L,B,max_len,Hkv,D]); with
      ``return_aux`` also a PrefillAux (last-layer hidden [B,T,d], density [L]); with
      ``chunk_size`` the prompt is prefilled that many tokens at a time (``Llama.prefill``).
    - ``runner.lower_prefill(...)``: that prefill lowered, not run (``jax.stages.Lowered``):
      ``.compile()`` gives its memory analysis and an ahead-of-time executable, called as
      ``compiled(runner.graphdef, runner.state, tokens)``.
    - ``runner.output_logits(hidden)``: hidden [..., d] -> logits [..., V] float32 (every
      position's logits from ``PrefillAux.hidden`` without a second forward).
    - ``runner.decode_step(token, cache, position)``: token [B] -> (logits [B,V], cache); the
      cache passed in is donated.
    - ``runner.greedy_decode(last_logits, cache, start_position, num_tokens)``: greedy
      continuation after a prefill -> (tokens [B,num_tokens] int32, cache); cache donated.
    - ``runner.generate(prompt, max_new_tokens, attention="full", *, chunk_size=None)``: prefill
      (chunked when asked) then greedy decode, prompt [B,T] -> [B,max_new_tokens] ([T] ->
      [max_new_tokens]).
    - Batches of different lengths (right padding): ``lengths=`` [B] on ``runner(...)``,
      ``prefill``, ``lower_prefill`` and ``generate`` (row b's prompt is
      ``tokens[b, :lengths[b]]``; each row equals itself run alone), then ``decode_step`` /
      ``greedy_decode`` with positions [B] (``lengths`` after the prefill). Lengths are checked
      here (1 <= length <= T) and are a traced argument: one compile serves them all. Not with
      ``chunk_size`` (``NotImplementedError``).
    - ``runner.config``, ``runner.graphdef``, ``runner.state``: the split model.

    ``JittedLlama.from_split(graphdef, state)`` wraps an existing split, e.g. parameters placed
    on a mesh by ``models.sharding.shard_model``.

    >>> runner = JittedLlama(model)
    >>> logits = runner(tokens, attention=PBSConfig())              # [B,T,V] f32
    >>> last, cache = runner.prefill(tokens, max_len=T + 32)
    >>> logits, cache = runner.decode_step(next_token, cache, T)
    >>> new_tokens = runner.generate(prompt, 32)
    >>> compiled = runner.lower_prefill(tokens, PBSConfig(), return_aux=True).compile()
    >>> compiled.memory_analysis()
    """

    def __init__(self, model: Llama):
        self.config: LlamaConfig = model.config
        self.graphdef, self.state = nnx.split(model)

    @classmethod
    def from_split(cls, graphdef, state) -> JittedLlama:
        """A runner over an existing ``nnx.split`` (e.g. sharded parameters), without copying."""
        runner = cls.__new__(cls)
        runner.config = nnx.merge(graphdef, state).config
        runner.graphdef, runner.state = graphdef, state
        return runner

    def __call__(
        self,
        tokens,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        return_aux: bool = False,
        lengths=None,
    ):
        tokens = jnp.asarray(tokens, jnp.int32)
        return forward(
            self.graphdef,
            self.state,
            tokens,
            resolve_attention(attention),
            return_aux,
            validate_lengths(lengths, *tokens.shape),
        )

    def _prefill_args(self, tokens, attention, max_len, return_aux, chunk_size, lengths) -> tuple:
        tokens = jnp.asarray(tokens, jnp.int32)
        lengths = check_prefill_arguments(  # before tracing: a one-line error
            tokens.shape, attention, max_len=max_len, chunk_size=chunk_size, lengths=lengths
        )
        args = (
            self.graphdef,
            self.state,
            tokens,
            resolve_attention(attention),
            max_len,
            return_aux,
            chunk_size,
        )
        # lengths only when given: a lowered prefill without it keeps its 3-argument call.
        return args if lengths is None else (*args, lengths)

    def prefill(
        self,
        tokens,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        max_len: int | None = None,
        return_aux: bool = False,
        chunk_size: int | None = None,
        lengths=None,
    ):
        args = self._prefill_args(tokens, attention, max_len, return_aux, chunk_size, lengths)
        return prefill(*args)

    def lower_prefill(
        self,
        tokens,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        max_len: int | None = None,
        return_aux: bool = False,
        chunk_size: int | None = None,
        lengths=None,
    ) -> jax.stages.Lowered:
        """``prefill`` with these arguments, lowered but not compiled nor run. Its compiled form
        takes the dynamic arguments only: ``compiled(runner.graphdef, runner.state, tokens)``,
        and ``lengths`` after the tokens when it was given."""
        args = self._prefill_args(tokens, attention, max_len, return_aux, chunk_size, lengths)
        return prefill.lower(*args)

    def output_logits(self, hidden):
        return output_logits(self.graphdef, self.state, hidden)

    def decode_step(self, token, cache: KVCache, position):
        return decode_step(
            self.graphdef,
            self.state,
            jnp.asarray(token, jnp.int32),
            cache,
            jnp.asarray(position, jnp.int32),
        )

    def greedy_decode(self, last_logits, cache: KVCache, start_position, num_tokens: int):
        return greedy_decode(
            self.graphdef,
            self.state,
            last_logits,
            cache,
            jnp.asarray(start_position, jnp.int32),
            num_tokens,
        )

    def generate(
        self,
        prompt_tokens,
        max_new_tokens: int,
        attention: AttentionSpec = FULL_ATTENTION,
        *,
        chunk_size: int | None = None,
        lengths=None,
    ) -> jax.Array:
        return generate(
            self.graphdef,
            self.state,
            prompt_tokens,
            max_new_tokens,
            attention,
            lengths,
            chunk_size,
        )
