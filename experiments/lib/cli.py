"""What the command lines share: argparse types, and progress on stderr (every long step says
what it does and how long it took, so a user sees a slow run move)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from tqdm.auto import tqdm

PROGRESS_PREFIX = "[pbs]"


def int_at_least(minimum: int):
    """An argparse ``type``: an integer ``>= minimum``, else a one-line argparse error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def say(message: str, end: str = "\n") -> None:
    """One progress message on stderr, flushed (stdout holds the results only)."""
    print(f"{PROGRESS_PREFIX} {message}", end=end, file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str, *, own_output: bool = False):
    """Announce ``what``, run the block, then report its elapsed time: on the same line, or on
    a line of its own when the block prints (a progress bar) — ``own_output``."""
    say(f"{what} …", end="\n" if own_output else "")
    start = time.perf_counter()
    yield
    elapsed = f"done in {time.perf_counter() - start:.1f} s"
    if own_output:
        say(f"{what}: {elapsed}")
    else:
        print(f" {elapsed}", file=sys.stderr, flush=True)


def bar(iterable, description: str, unit: str = "run", **tqdm_options):
    """``iterable`` under a progress bar on stderr (``iterable`` None: a bar updated by hand,
    e.g. ``total=`` and ``initial=`` in ``tqdm_options``)."""
    return tqdm(
        iterable,
        desc=f"{PROGRESS_PREFIX} {description}",
        unit=unit,
        file=sys.stderr,
        **tqdm_options,
    )
