"""Byte-level BPE tokenizer from a GGUF's own metadata or an HF tokenizer.json.

The GGUF stores the vocabulary (``tokenizer.ggml.tokens``), the merges, token types, special
ids and the chat template; we rebuild the Hugging Face ``tokenizers`` object from them. The
pre-tokenizer (how text is split before BPE) is not stored, only named
(``tokenizer.ggml.pre``); ``PRE_TOKENIZERS`` maps the names we know to llama.cpp's regexes.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["PRE_TOKENIZERS", "Tokenizer", "render_chatml"]

# llama.cpp's llm_tokenizer_bpe regexes (llama-vocab.cpp), by tokenizer.ggml.pre name.
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_then_bytes(regex: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2():
    # StarCoder family (SmolLM2 included): every digit alone, then the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT])


PRE_TOKENIZERS = {
    "gpt2": lambda: _GPT2_SPLIT,
    "default": lambda: _GPT2_SPLIT,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "llama-bpe": lambda: _regex_then_bytes(_LLAMA3_REGEX),
    "llama3": lambda: _regex_then_bytes(_LLAMA3_REGEX),
    "qwen2": lambda: _regex_then_bytes(_QWEN2_REGEX),
}

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


class Tokenizer:
    """encode / decode / apply_chat_template over a ``tokenizers.Tokenizer``."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """From a ``gguf.GGUFReader`` (tokenizer.ggml.model must be "gpt2": byte-level BPE)."""

        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NotImplementedError(
                f"tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') is supported"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        token_types = field("tokenizer.ggml.token_type", [1] * len(tokens))
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            warnings.warn(
                f"unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 split", stacklevel=2
            )
            pre = "gpt2"

        backend = HFTokenizer(
            models.BPE(
                vocab={token: i for i, token in enumerate(tokens)},
                merges=merges,
                ignore_merges=pre in ("llama-bpe", "llama3"),
            )
        )
        backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) must be matched whole, never split by BPE.
        backend.add_special_tokens(
            [
                AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
                for i, t in enumerate(token_types)
                if t in (_CONTROL, _USER_DEFINED)
            ]
        )
        return cls(
            backend,
            bos_id=field("tokenizer.ggml.bos_token_id"),
            eos_id=field("tokenizer.ggml.eos_token_id"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
            chat_template=field("tokenizer.chat_template"),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """From an HF folder: tokenizer.json (+ tokenizer_config.json for template/specials)."""
        folder = os.fspath(folder)
        backend = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        config: dict[str, Any] = {}
        path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)

        def special_id(key):
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if token else None

        template = config.get("chat_template")
        if isinstance(template, list):  # list of named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_id=special_id("bos_token"),
            eos_id=special_id("eos_token"),
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=template,
        )

    # -- use --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """text -> token ids (BOS prepended when the model wants it, or add_bos=True)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Renders [{"role", "content"}, ...] with the model's template (text, not ids).

        Uses jinja2 when installed (exactly the model's template); otherwise a ChatML
        renderer for ChatML templates (SmolLM2, Qwen2), keeping the template's default
        system prompt.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        try:
            import jinja2.sandbox
        except ImportError:
            if "<|im_start|>" not in self.chat_template:
                raise NotImplementedError(
                    "rendering this non-ChatML chat template needs jinja2 (pip install jinja2)"
                ) from None
            return render_chatml(
                messages,
                add_generation_prompt=add_generation_prompt,
                default_system=_default_system_prompt(self.chat_template),
            )
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(self.eos_id) if self.eos_id is not None else ""
        return env.from_string(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )


def _default_system_prompt(template: str) -> str | None:
    # ChatML templates that inject a system turn when the conversation lacks one write it as
    # a literal '<|im_start|>system\n...<|im_end|>' string.
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.DOTALL)
    return found.group(1) if found else None


def render_chatml(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` per message (+ the assistant header)."""
    turns = list(messages)
    if default_system is not None and (not turns or turns[0]["role"] != "system"):
        turns = [{"role": "system", "content": default_system}] + turns
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
