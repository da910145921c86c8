"""Static configuration of PBS attention: one frozen, hashable dataclass (a static jit argument)."""

from __future__ import annotations

import dataclasses

# Permutation heads: one per query head ("replicate"), or one per KV head ranked by the mean
# importance of its query group ("shared").
GQA_MODES = ("replicate", "shared")
SELECTORS = ("meanpool", "antidiagonal")
# The fields that make the paper's rule (arXiv 2510.21270 §4.1 and its official code).
PAPER_RULE = dict(
    block_size=128,
    segment_size=256,
    threshold=0.9,
    force_sink=True,
    permute=True,
    gqa="replicate",
    selector="meanpool",
    dense_tail=0,
    proxy_blocks=1,
)


@dataclasses.dataclass(frozen=True)
class PBSConfig:
    """Hyper-parameters of Permuted Block-Sparse attention (arXiv 2510.21270).

    The defaults are the best rule we measured on a real model the way users run it (sparse
    prefill, dense greedy decode; experiments/results/accuracy.md): the paper's rule plus a dense
    last block row, a proxy of the last 4 query blocks and τ = 0.88. On SmolLM2-135M at 2K-8K it
    keeps 34 of the 35 retrieval answers full attention gets (the paper's rule: 28), at a mean
    density 0.014 above the paper's and under half its NLL increase. ``PBSConfig.paper()`` is the
    paper's rule (§4.1, and its official code, which our op equals on it).

    Attributes:
      block_size: tokens per attention block (both query and key blocks).
      segment_size: tokens per permutation segment; keys are sorted only inside a segment, so
        segment order (and therefore causality between segments) is preserved. A positive
        multiple of ``block_size``.
      threshold: top-p mass of the mean-pooled block softmax that a query block keeps, in (0, 1].
        A row whose allowed mass never reaches it keeps every allowed block (the paper's Alg. 2).
      force_sink: always compute the key block holding original token 0 (the attention sink).
      permute: sort keys inside segments. ``False`` is the paper's MeanPooling baseline: the same
        selector over unpermuted keys, forcing the first key block and the diagonal block.
      gqa: ``"replicate"`` gives every query head its own permutation (the paper's default);
        ``"shared"`` gives one permutation per KV head, from the scores averaged over its query
        group (paper App. G): K/V then stay one copy per KV head even when permuted physically.
      selector: how a block pair is scored before the top-p rule. ``"meanpool"`` (the paper's
        PBS-Attn and MeanPooling baseline): the softmax of mean-pooled queries against mean-pooled
        keys. ``"antidiagonal"`` (XAttention's scoring; with ``permute`` the paper's PBS-Attn+):
        the softmax mass of stride-sampled anti-diagonal q·k products that falls in each block.
        Either way the same softmax domain, top-p rule and forced blocks apply.
      antidiagonal_stride: sampling stride of the ``"antidiagonal"`` selector (XAttention uses
        8 or 16); ``block_size`` must be a multiple of it when that selector is chosen.
      dense_tail: beyond the paper. The last ``dense_tail`` query rows, rounded up to whole
        blocks, attend to every causal block (0: none, the paper's rule). The prefill's last row
        gives the first generated token, so its attention decides retrieval; one dense block row
        costs ~1/T of the work.
      proxy_blocks: beyond the paper. Trailing query blocks whose softmax over the keys is the
        importance estimate that orders each segment (1: the last ``block_size`` queries, the
        paper's proxy).

    ``PBSConfig.paper(**overrides)`` is the rule of the paper and its official code.
    """

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.88
    force_sink: bool = True
    permute: bool = True
    gqa: str = "replicate"
    selector: str = "meanpool"
    antidiagonal_stride: int = 8
    dense_tail: int = 128
    proxy_blocks: int = 4

    @classmethod
    def paper(cls, **overrides) -> PBSConfig:
        """The paper's rule, as its official code computes it (our op equals that code on it)."""
        return cls(**{**PAPER_RULE, **overrides})

    def __post_init__(self):
        def _is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(
                f"PBSConfig.block_size must be a positive int, got {self.block_size!r}"
            )
        if not _is_int(self.segment_size) or self.segment_size <= 0:
            raise ValueError(
                f"PBSConfig.segment_size must be a positive int, got {self.segment_size!r}"
            )
        if self.segment_size % self.block_size:
            raise ValueError(
                "PBSConfig.segment_size must be a positive multiple of block_size "
                f"(segments hold whole blocks), got segment_size={self.segment_size}, "
                f"block_size={self.block_size}"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"PBSConfig.threshold must be a number, got {self.threshold!r}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(
                f"PBSConfig.threshold must satisfy 0 < threshold <= 1, got {self.threshold}"
            )
        if not isinstance(self.force_sink, bool):
            raise ValueError(f"PBSConfig.force_sink must be a bool, got {self.force_sink!r}")
        if not isinstance(self.permute, bool):
            raise ValueError(f"PBSConfig.permute must be a bool, got {self.permute!r}")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"PBSConfig.gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        if self.selector not in SELECTORS:
            raise ValueError(
                f"PBSConfig.selector must be one of {SELECTORS}, got {self.selector!r}"
            )
        if not _is_int(self.antidiagonal_stride) or self.antidiagonal_stride <= 0:
            raise ValueError(
                "PBSConfig.antidiagonal_stride must be a positive int, got "
                f"{self.antidiagonal_stride!r}"
            )
        if self.selector == "antidiagonal" and self.block_size % self.antidiagonal_stride:
            raise ValueError(
                "PBSConfig.block_size must be a multiple of antidiagonal_stride for the "
                "antidiagonal selector (whole strides per block), got "
                f"block_size={self.block_size}, "
                f"antidiagonal_stride={self.antidiagonal_stride}"
            )
        self._validate_extensions()

    def _validate_extensions(self):
        for name in ("dense_tail", "proxy_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"PBSConfig.{name} must be an int, got {value!r}")
        if self.dense_tail < 0:
            raise ValueError(f"PBSConfig.dense_tail must be >= 0 (rows), got {self.dense_tail}")
        if self.proxy_blocks < 1:
            raise ValueError(f"PBSConfig.proxy_blocks must be >= 1, got {self.proxy_blocks}")

    @property
    def mask_segment_size(self) -> int:
        """Span whose blocks are always computed and token-masked on original positions.

        With permutation it is the permutation segment. Without (MeanPooling), keys keep their
        order, so only the diagonal block needs the token mask and is forced, as in the paper.
        """
        return self.segment_size if self.permute else self.block_size

    def num_perm_heads(self, num_q_heads: int, num_kv_heads: int) -> int:
        """Heads that own a permutation: Hq in replicate mode, Hkv in shared mode."""
        return num_q_heads if self.gqa == "replicate" else num_kv_heads
