"""Which buffers make a whole prefill's memory: XLA's memory-usage report of the compiled prefill,
per attention mode, without running it (no weights are materialised: the model is abstract).

  python -m experiments.probe_prefill_memory                 # on a GPU: 8B-shaped, 32K and 128K
  python -m experiments.probe_prefill_memory --smoke         # the script's logic on CPU (tiny)
  python -m experiments.probe_prefill_memory --report probe_prefill_memory.json  # re-render

Per length and mode (``full``: cuDNN; ``pbs_fixed``: bench_prefill's FixedDensityPBS at the
paper's density; ``pbs_selector``: the real plan, ``impl="auto"``; ``pbs_pallas``: the real plan,
the kernel always) it prints XLA's compiled
memory (arguments, outputs, temporaries) and the largest slots of the temporaries' allocation,
from the ``*memory-usage-report.txt`` XLA writes under ``--xla_dump_to`` (each slot: its size and
the shapes of the values packed into it), then the slots a PBS mode has and full has not.
Writes ``$OUT/probe_prefill_memory.{json,md}``. The measurement behind issue 13's "PBS peak ≤
full + 2%": which of PBS's temporaries make the difference.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile
import time

DUMP_DIR = tempfile.mkdtemp(prefix="xla_dump_")
if "jax" not in sys.modules:  # the dump flag must be set before the backend starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR}"

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.bench_prefill import fixed_density  # noqa: E402
from experiments.lib import timing  # noqa: E402
from experiments.lib.forward import compile_prefill  # noqa: E402
from experiments.lib.specs import FixedDensityPBS  # noqa: E402
from models import FULL_ATTENTION, Llama, LlamaConfig, PBSAttention  # noqa: E402
from pbs_jax import PBSConfig  # noqa: E402

MODES = ("full", "pbs_fixed", "pbs_selector", "pbs_pallas")
_SIZE_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_size(text: str) -> int:
    """``"1.50GiB"`` / ``"512B"`` → bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]iB|B)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def largest_buffers(report: str) -> list[dict]:
    """The buffers of the temporaries' allocation of an XLA ``*memory-usage-report.txt``: one dict
    per slot (bytes, the shapes of the values that share it), largest first. The report has one
    table per allocation (on GPU the outputs' and parameters' come first, a few slots each); the
    temporaries' is the one with the most slots. Slots are packed by XLA's heap simulator, so
    values sharing a slot are never alive at once; the allocation's size is the temporaries' peak.
    """
    tables, rows = [], []
    for line in report.splitlines() + [""]:
        cells = [c.strip() for c in line.split(";")]
        if len(cells) == 5 and cells[1][:1].isdigit():
            rows.append({"bytes": parse_size(cells[1]), "shapes": cells[4][:300]})
        elif rows and not line.strip():
            tables.append(rows)  # a blank line ends a table
            rows = []
    return sorted(max(tables, key=len, default=[]), key=lambda r: -r["bytes"])


def newest_dump(suffix: str, since: float) -> str:
    """The largest ``*{suffix}`` file XLA wrote after ``since`` (the prefill's module)."""
    files = [p for p in pathlib.Path(DUMP_DIR).glob(f"*{suffix}") if p.stat().st_mtime >= since]
    if not files:
        return ""
    return max(files, key=lambda p: p.stat().st_size).read_text()


def modes_for(n: int, smoke: bool) -> dict:
    cfg = PBSConfig.paper(block_size=16, segment_size=32) if smoke else PBSConfig.paper()
    impl = "reference" if smoke else "auto"
    return {
        "full": FULL_ATTENTION,
        "pbs_fixed": FixedDensityPBS(round(fixed_density(n), 4) if not smoke else 0.5, cfg),
        "pbs_selector": PBSAttention(cfg, impl=impl),
        # The real plan with the kernel always taken: what a user who asks for sparsity runs
        # (auto's lax.cond holds the larger of its branches too, but may skip the plan).
        "pbs_pallas": PBSAttention(cfg, impl="reference" if smoke else "pallas"),
    }


def probe(n: int, config: LlamaConfig, smoke: bool, top: int) -> dict:
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tokens = jnp.zeros((1, n), jnp.int32)  # concrete (the runner checks it); 4 bytes a token
    row = {"n": n}
    for name, attention in modes_for(n, smoke).items():
        start = time.time()
        compiled = compile_prefill(graphdef, state, tokens, attention)
        m = compiled.memory_analysis()
        buffers = largest_buffers(newest_dump("memory-usage-report.txt", start))
        row[name] = {
            "argument_gib": m.argument_size_in_bytes / 2**30,
            "output_gib": m.output_size_in_bytes / 2**30,
            "temp_gib": m.temp_size_in_bytes / 2**30,
            "alias_gib": m.alias_size_in_bytes / 2**30,
            "buffers": buffers[:top],
            "buffers_gib": sum(b["bytes"] for b in buffers) / 2**30,
        }
        print(
            f"N={n} {name}: temp {row[name]['temp_gib']:.3f} GiB, args "
            f"{row[name]['argument_gib']:.3f}, out {row[name]['output_gib']:.3f}; "
            f"{len(buffers)} slots in the temporaries, {row[name]['buffers_gib']:.3f} GiB",
            flush=True,
        )
    full_shapes = {b["shapes"] for b in row["full"]["buffers"]}
    for name in MODES[1:]:
        row[name]["not_in_full"] = [
            b for b in row[name]["buffers"] if b["shapes"] not in full_shapes
        ]
    return row


def peak_gib(mode: dict) -> float:
    """The compiled peak as bench_prefill counts it: arguments + outputs + temporaries − aliased."""
    return mode["argument_gib"] + mode["output_gib"] + mode["temp_gib"] - mode["alias_gib"]


def render(rows) -> str:
    lines = []
    for r in rows:
        lines.append(f"\n## N = {r['n']}\n")
        lines.append(
            "| mode | peak GiB (vs full) | temp GiB | args GiB | out GiB | temporaries' slots GiB |"
        )
        lines.append("|---|---|---|---|---|---|")
        full_peak = peak_gib(r["full"])
        for name in MODES:
            x = r[name]
            lines.append(
                f"| {name} | {peak_gib(x):.3f} ({peak_gib(x) / full_peak - 1:+.2%}) | "
                f"{x['temp_gib']:.3f} | {x['argument_gib']:.3f} | {x['output_gib']:.3f} | "
                f"{x['buffers_gib']:.3f} |"
            )
        for name in MODES[1:]:
            extra = r[name].get("not_in_full", [])
            lines.append(f"\n{name}: its largest temporaries whose shapes full's have not\n")
            lines.append("| MiB | shapes sharing the slot |\n|---|---|")
            lines += [f"| {b['bytes'] / 2**20:.1f} | `{b['shapes']}` |" for b in extra]
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--top", type=int, default=25, help="slots kept per mode")
    parser.add_argument("--smoke", action="store_true", help="tiny model and length on CPU")


def bench(args, out):
    if args.smoke:
        config, lengths = LlamaConfig.preset("smollm2-135m", num_layers=2), [256]
    else:
        config, lengths = LlamaConfig.preset("llama-3.1-8b"), args.lengths
    rows = [probe(n, config, args.smoke, args.top) for n in lengths]
    preset = "smollm2-135m, 2 layers" if args.smoke else "llama-3.1-8b"
    return {"stamp": timing.stamp(), "preset": preset, "rows": rows}


def report(payload, out: pathlib.Path, name: str = "probe_prefill_memory"):
    st = payload["stamp"]
    text = f"# Prefill temporaries ({payload['preset']}) — {st['device']}, JAX {st['jax']}, "
    text += f"{st['date']}\n" + render(payload["rows"]) + "\n"
    (out / f"{name}.md").write_text(text)


def main(argv=None):
    timing.benchmark_cli(
        argv,
        __doc__,
        "probe_prefill_memory",
        add_arguments,
        bench,
        report,
        runs_off_gpu=lambda args: args.smoke,
    )


if __name__ == "__main__":
    main()
