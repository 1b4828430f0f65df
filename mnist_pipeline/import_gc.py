"""Python's cyclic garbage collector around a program's imports and its exit: paused while torch and MLflow load,
blind to what they made once loaded.

torch and MLflow make about 500,000 objects as they load, which live as long as the process. Python 3.11's collector
walks all of them at each full collection while they load, and again as the process exits: a process that loads both
and exits takes about 0.6x the time with the collector paused (docs/performance.md). So each program of ours pauses
the collector before its imports (stages/__init__.py, the live-run helper) and around the imports it makes late
(`paused`), and once loaded moves what exists out of the collector's sight (gc.freeze) and turns it back on: the
work itself is collected as usual. A process that did not pause (pytest running a stage's main) is left alone.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_program = False  # this process paused the collector for its imports: it is one of our programs


def pause() -> None:
    """No collection while this program's modules load."""
    global _program
    _program = True
    gc.disable()


def resume() -> None:
    """Everything made so far out of the collector's sight, for good; collections as usual from here."""
    if _program and not gc.isenabled():
        gc.freeze()
        gc.enable()


@contextmanager
def paused() -> Iterator[None]:
    """The collector paused for a block that loads modules late: train's torch (after its live-run helper started),
    record's MLflow and its short work with it (only when there is something to write)."""
    if not _program or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        resume()


def before_exit() -> None:
    """What the work made, out of sight too: the exit's collections then walk nothing that lives to the end."""
    if _program:
        gc.freeze()
