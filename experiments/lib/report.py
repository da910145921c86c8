"""Writing results for people: number formatting, markdown table rows, figures and readable
JSON. No measurement here; every function is a pure rendering of given numbers."""

from __future__ import annotations

import json
import pathlib
import re


def fmt(x, spec: str = ".3f", none: str = "—") -> str:
    """``format(x, spec)``, or ``none`` for a missing value."""
    return none if x is None else format(x, spec)


def table_row(*cells) -> str:
    """One markdown table row: ``| a | b |`` (an empty cell is ``| |``)."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def table_header(*titles) -> list[str]:
    """A markdown table's header and separator lines."""
    return [table_row(*titles), "|" + "---|" * len(titles)]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (figures are saved, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path, dpi: int = 120) -> str:
    """Save and close ``fig``; returns the file name (what the markdown links)."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path.name


def json_text(tree) -> str:
    """Indented JSON with every list of plain values (no strings or nesting) on one line."""
    return re.sub(
        r'\[[^\[\]{}"]*\]', lambda m: re.sub(r"\s+", " ", m.group(0)), json.dumps(tree, indent=1)
    )


def rounded(tree, digits: int = 6):
    """``tree`` (dicts, lists, scalars) with floats rounded to ``digits`` significant digits."""
    if isinstance(tree, float):
        return float(f"{tree:.{digits}g}")
    if isinstance(tree, dict):
        return {k: rounded(v, digits) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [rounded(v, digits) for v in tree]
    return tree


RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "results"  # the committed results
