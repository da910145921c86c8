"""Accuracy of block-sparse prefill rules the way users run the model (``python -m
experiments.accuracy``).

For each rule and length, on SmolLM2-135M-Instruct:

- retrieval: prompts of exactly N tokens with one needle (pass key, key-value lookup, copied
  sentence; depths 10/50/90%) and a question at the end; **sparse prefill of the prompt, then
  dense greedy decode** (``JittedLlama.generate``); exact match of the generated answer. Scored
  against full attention: of the probes full attention answers, how many the rule keeps.
- NLL: teacher-forced negative log-likelihood of the last quarter of needle-free windows of real
  texts (prose and code), against full attention's on the same windows;
- density: computed blocks / causal blocks (dense = 1), mean over layers, on those windows.

``--chunk-size C`` prefills every prompt and window C tokens at a time (``Llama.prefill``'s
chunked prefill; decode unchanged): the rules' keys get the suffix ``_chunkC`` (full attention
keeps ``full``: chunked, it equals one chunk up to rounding) and their labels say the chunk size,
so a chunked run merges with an unchunked one (``--report``) into one table.

On GPU it runs in bf16 through the kernel (``impl="pallas"``: the Mosaic kernel on Hopper);
``--quick`` is the CPU smoke version (short prompts, the exact reference). ``--report A.json
B.json …`` merges runs (e.g. one process per length) and writes the markdown table and the Pareto
plot (density vs retrieval, density vs ΔNLL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.lib import retrieval, timing
from experiments.lib.probes import load_texts
from models import FULL_ATTENTION, JittedLlama, PBSAttention, Tokenizer, load_pretrained
from models.attention_spec import check_chunk_size
from pbs_jax import PBSConfig

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LENGTHS = (2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A prefill attention rule of the study: ``config=None`` is full attention."""

    key: str
    label: str
    config: PBSConfig | None

    def spec(self, impl: str):
        return FULL_ATTENTION if self.config is None else PBSAttention(self.config, impl=impl)

    def chunked(self, chunk_size: int | None) -> Rule:
        """This rule prefilled ``chunk_size`` tokens at a time: the key and label say so (full
        attention keeps its key, the baseline every rule is scored against)."""
        if chunk_size is None:
            return self
        key = self.key if self.config is None else f"{self.key}_chunk{chunk_size}"
        return Rule(key, f"{self.label}, chunks of {chunk_size}", self.config)


RULES = (
    Rule("full", "Full attention", None),
    Rule("paper", "PBS, paper rule (τ 0.9)", PBSConfig.paper()),
    Rule("paper_t095", "PBS, paper rule, τ 0.95", PBSConfig.paper(threshold=0.95)),
    Rule("meanpool", "MeanPooling (no permutation, τ 0.9)", PBSConfig.paper(permute=False)),
    Rule("pbs_plus", "PBS+ (antidiagonal, τ 0.9)", PBSConfig.paper(selector="antidiagonal")),
    Rule("tail128", "PBS + dense tail 128", PBSConfig.paper(dense_tail=128)),
    Rule(
        "tail128_t085",
        "PBS + dense tail 128, τ 0.85",
        PBSConfig.paper(dense_tail=128, threshold=0.85),
    ),
    Rule(
        "tail128_proxy4",
        "PBS + dense tail 128, proxy 4 blocks",
        PBSConfig.paper(dense_tail=128, proxy_blocks=4),
    ),
    Rule(
        "tail256_t085",
        "PBS + dense tail 256, τ 0.85",
        PBSConfig.paper(dense_tail=256, threshold=0.85),
    ),
    Rule(
        "tail128_proxy4_t088",
        "PBS + dense tail 128, proxy 4 blocks, τ 0.88",
        PBSConfig.paper(dense_tail=128, proxy_blocks=4, threshold=0.88),
    ),
    Rule(
        "tail128_proxy2",
        "PBS + dense tail 128, proxy 2 blocks",
        PBSConfig.paper(dense_tail=128, proxy_blocks=2),
    ),
    Rule(
        "tail128_proxy2_t088",
        "PBS + dense tail 128, proxy 2 blocks, τ 0.88",
        PBSConfig.paper(dense_tail=128, proxy_blocks=2, threshold=0.88),
    ),
    Rule(
        "tail128_proxy8_t088",
        "PBS + dense tail 128, proxy 8 blocks, τ 0.88",
        PBSConfig.paper(dense_tail=128, proxy_blocks=8, threshold=0.88),
    ),
    Rule("default", "PBSConfig() (our default)", PBSConfig()),
)
RULE_BY_KEY = {r.key: r for r in RULES}
QUICK_RULES = ("full", "paper", "default")
# The rules the Pareto plot names (label, colour); the other candidates are grey points.
HIGHLIGHT = {
    "paper": ("PBS, paper rule (τ 0.9)", "C0"),
    "paper_t095": ("PBS, paper rule, τ 0.95", "C9"),
    "meanpool": ("MeanPooling (τ 0.9)", "C1"),
    "pbs_plus": ("PBS+ (antidiagonal, τ 0.9)", "C2"),
    "default": ("PBSConfig(): tail 128, proxy 4, τ 0.88", "C3"),
}


@dataclasses.dataclass(frozen=True)
class RuleResult:
    """One rule at one length: ``correct`` per probe (same probe order for every rule)."""

    rule: str
    length: int
    density: float
    nll: float
    correct: tuple[bool, ...]
    tasks: tuple[str, ...]
    seconds: float


def nll_windows(texts: dict[str, list[int]], length: int, per_text: int) -> np.ndarray:
    """``[W, length]`` int32 needle-free windows, evenly spread over each text."""
    rows = []
    for name in sorted(texts):
        ids = texts[name]
        if len(ids) < length:
            raise ValueError(f"text {name} has {len(ids)} tokens, fewer than {length}")
        for start in np.linspace(0, len(ids) - length, per_text).astype(int):
            rows.append(ids[start : start + length])
    return np.asarray(rows, np.int32)


@jax.jit
def last_quarter_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token NLL over the last quarter of each window: logits ``[W, T, V]``."""
    t = tokens.shape[1]
    start = t - t // 4
    logp = jax.nn.log_softmax(logits[:, start - 1 : t - 1].astype(jnp.float32), axis=-1)
    target = tokens[:, start:]
    return -jnp.take_along_axis(logp, target[..., None], axis=-1).mean()


def evaluate(
    runner, rule: Rule, impl: str, windows, probes, max_new: int, chunk_size: int | None = None
) -> RuleResult:
    spec = rule.spec(impl)
    begin = time.perf_counter()
    tokens = jnp.asarray(windows)
    if chunk_size is None:
        logits, density = runner(tokens, spec, return_aux=True)
    else:  # every position's logits from the chunked prefill's last hidden states
        _, _, aux = runner.prefill(tokens, spec, return_aux=True, chunk_size=chunk_size)
        logits, density = runner.output_logits(aux.hidden), aux.density
        del aux
    nll = float(last_quarter_nll(logits, tokens))
    del logits
    prompts = np.stack([p.tokens for p in probes])
    generated = np.asarray(runner.generate(prompts, max_new, spec, chunk_size=chunk_size))
    correct = retrieval.exact_matches(generated, probes)
    return RuleResult(
        rule.key,
        windows.shape[1],
        float(np.mean(np.asarray(density))),
        nll,
        tuple(bool(c) for c in correct),
        tuple(p.task for p in probes),
        time.perf_counter() - begin,
    )


def run(args, model: tuple[JittedLlama, Tokenizer] | None = None) -> dict:
    """The study's JSON payload. ``model``: SmolLM2-135M-Instruct already loaded as (runner,
    tokenizer) in this backend's dtype (bf16 on GPU, float32 on CPU), e.g. one model shared by
    the tests; loaded here when None."""
    on_gpu = jax.default_backend() == "gpu"
    impl = "pallas" if on_gpu else "reference"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    if model is None:
        print(f"loading SmolLM2-135M-Instruct ({jnp.dtype(dtype).name}) …", flush=True)
        loaded, tokenizer = load_pretrained(dtype=dtype)
        runner = JittedLlama(loaded)
    else:
        runner, tokenizer = model
    sources = load_texts()  # {name: (source, text)}, read once
    texts = {name: tokenizer.encode(text) for name, (_, text) in sources.items()}
    chunk_size = getattr(args, "chunk_size", None)
    rules = [RULE_BY_KEY[k].chunked(chunk_size) for k in args.rules]
    results = []
    for n in args.lengths:
        windows = nll_windows(texts, n, args.windows_per_text)
        probes = retrieval.make_probes(tokenizer, texts, n, args.per_cell, seed=args.seed)
        max_new = max(len(p.answer) for p in probes) + 1
        for rule in tqdm(rules, desc=f"N={n}", file=sys.stdout):
            results.append(evaluate(runner, rule, impl, windows, probes, max_new, chunk_size))
    return {
        "stamp": timing.stamp(),
        "impl": impl,
        "dtype": jnp.dtype(dtype).name,
        "texts": {name: source for name, (source, _) in sources.items()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("report", "out")},
        "rules": {
            r.key: {
                "label": r.label,
                "config": None if r.config is None else dataclasses.asdict(r.config),
            }
            for r in rules
        },
        "results": [dataclasses.asdict(r) for r in results],
    }


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RuleSummary:
    """A rule over all lengths: retrieval kept of full attention's answers, density, ΔNLL."""

    rule: str
    label: str
    density: dict[int, float]
    delta_nll: dict[int, float]
    kept: dict[int, tuple[int, int]]  # N → (answers kept, answers full attention got)
    correct: dict[int, int]

    @property
    def mean_density(self) -> float:
        return float(np.mean(list(self.density.values())))

    @property
    def mean_delta_nll(self) -> float:
        return float(np.mean(list(self.delta_nll.values())))

    @property
    def retained(self) -> float:
        kept, total = (sum(x) for x in zip(*self.kept.values()))
        return kept / max(total, 1)


def summarize(payload: dict) -> list[RuleSummary]:
    rows = [
        RuleResult(**{**r, "correct": tuple(r["correct"]), "tasks": tuple(r["tasks"])})
        for r in payload["results"]
    ]
    full = {r.length: r for r in rows if r.rule == "full"}
    summaries = []
    for key, meta in payload["rules"].items():
        mine = {r.length: r for r in rows if r.rule == key}
        kept = {}
        for n, r in mine.items():
            full_correct = np.array(full[n].correct)
            kept[n] = (int((np.array(r.correct) & full_correct).sum()), int(full_correct.sum()))
        summaries.append(
            RuleSummary(
                key,
                meta["label"],
                {n: r.density for n, r in mine.items()},
                {n: r.nll - full[n].nll for n, r in mine.items()},
                kept,
                {n: int(sum(r.correct)) for n, r in mine.items()},
            )
        )
    return summaries


def merge(payloads: list[dict]) -> dict:
    merged = dict(payloads[0])
    merged["rules"] = {k: v for p in payloads for k, v in p["rules"].items()}
    merged["results"] = [r for p in payloads for r in p["results"]]
    merged["stamps"] = [p["stamp"] for p in payloads]
    return merged


def write_report(payload: dict, out: pathlib.Path, name: str) -> list[RuleSummary]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarize(payload)
    lengths = sorted({int(n) for s in summaries for n in s.density})
    s0 = payload["stamp"]
    total_probes = {
        n: len(next(r for r in payload["results"] if r["length"] == n)["correct"]) for n in lengths
    }
    lines = [
        "# Accuracy of prefill rules, the user's way (sparse prefill, dense greedy decode)",
        "",
        f"SmolLM2-135M-Instruct, {payload['dtype']}, impl={payload['impl']}, "
        f"{s0['device']}, JAX {s0['jax']}, {s0['date']}. Script: `experiments/accuracy.py`.",
        f"Retrieval: {', '.join(f'{total_probes[n]} probes at {n}' for n in lengths)} "
        "(pass key, key-value, copy × depths 10/50/90%); *kept* = answers the rule generates "
        "correctly among those full attention generates correctly. ΔNLL: last quarter of "
        "needle-free windows of real texts, nat/token vs full. Density: computed / causal "
        "blocks (dense = 1), mean over layers.",
        "",
        "| rule | density "
        + " / ".join(str(n) for n in lengths)
        + " | mean density | kept "
        + " / ".join(str(n) for n in lengths)
        + " | kept (all) | ΔNLL "
        + " / ".join(str(n) for n in lengths)
        + " |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.label} | {' / '.join(f'{s.density[n]:.3f}' for n in lengths)} | "
            f"{s.mean_density:.3f} | "
            f"{' / '.join(f'{s.kept[n][0]}/{s.kept[n][1]}' for n in lengths)} | "
            f"{100 * s.retained:.0f}% | "
            f"{' / '.join(f'{s.delta_nll[n]:+.4f}' for n in lengths)} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    paper = next((s for s in summaries if s.rule == "paper"), None)
    for s in summaries:
        if s.rule == "full":
            continue
        style = HIGHLIGHT.get(s.rule)
        kw = (
            dict(s=60, color=style[1], label=style[0], zorder=3)
            if style
            else dict(s=18, color="0.65")
        )
        axes[0].scatter(s.mean_density, 100 * s.retained, **kw)
        axes[1].scatter(s.mean_density, s.mean_delta_nll, **kw)
    axes[0].scatter([], [], s=18, color="0.65", label="other candidates (see table)")
    if paper is not None:  # the density budget: the paper rule's mean density + 0.03
        for ax in axes:
            ax.axvline(paper.mean_density + 0.03, color="0.5", ls=":", lw=1)
        axes[1].axhline(paper.mean_delta_nll / 2, color="0.5", ls=":", lw=1)
    axes[0].axhline(95, color="0.5", ls=":", lw=1)
    axes[0].set(
        xlabel="mean block density",
        ylabel="retrieval kept vs full (%)",
        title="density vs retrieval (dotted: +0.03 density, 95%)",
    )
    axes[1].set(
        xlabel="mean block density",
        ylabel="ΔNLL vs full (nat/token)",
        title="density vs ΔNLL (dotted: half the paper rule's)",
    )
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"SmolLM2-135M, {payload['dtype']}, {s0['device']}, JAX {s0['jax']}, {s0['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=130)
    plt.close(fig)
    return summaries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument(
        "--rules", nargs="+", default=[r.key for r in RULES], choices=[r.key for r in RULES]
    )
    p.add_argument("--per-cell", type=int, default=3, help="probes per (task, depth)")
    p.add_argument("--windows-per-text", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="chunked prefill: this many tokens at a time (a multiple of every rule's segment "
        "size); rule keys get the suffix _chunkN (default: the whole prompt at once)",
    )
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke run: 512 tokens, 3 rules, 1 probe per cell"
    )
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--name", default="accuracy")
    p.add_argument("--report", type=pathlib.Path, nargs="+", help="re-render (and merge) JSON runs")
    return p


def main(
    argv: list[str] | None = None, model: tuple[JittedLlama, Tokenizer] | None = None
) -> list[RuleSummary]:
    """Run (or only re-render) the study and write its report; ``model``: see ``run``."""
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        payload = merge([json.loads(p.read_text()) for p in args.report])
    else:
        if args.quick:
            args.lengths, args.rules, args.per_cell, args.windows_per_text = (
                [512],
                list(QUICK_RULES),
                1,
                1,
            )
        for key in args.rules:
            try:
                check_chunk_size(args.chunk_size, RULE_BY_KEY[key].spec("reference"))
            except ValueError as error:
                build_parser().error(f"--chunk-size: {error}")
        payload = run(args, model)
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    summaries = write_report(payload, args.out, args.name)
    print((args.out / f"{args.name}.md").read_text())
    return summaries


if __name__ == "__main__":
    main()
