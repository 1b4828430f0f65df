"""The errors a stage reports in one line (bad params or data, a failed download, a failed write), and how."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable

from mnist_pipeline import import_gc

# The user and password part of a URL (scheme://user:password@host/...), as pip, MLflow and DVC accept them.
URL_LOGIN = re.compile(r"(?<=://)[^/?#@\s'\"]*@")


class PipelineError(Exception):
    """A problem the user can act on; the message names the file and the key or byte offset."""


def text_lines(text: str) -> list[str]:
    """The non-blank lines of a message or a log, stripped: tracebacks and tools pad theirs with blank lines."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def first_line(text: str) -> str:
    """The first non-blank line of a message (a library's error can run to hundreds of lines), or ""."""
    return next(iter(text_lines(text)), "")


def without_login(text: str) -> str:
    """`text` with the user and password of every URL in it taken out (a package index or a tracking server
    behind a login): no message, log or run name of the project shows them."""
    return URL_LOGIN.sub("", text)


def interrupt(signum: int, _frame: object) -> None:
    """A SIGTERM handler: raise KeyboardInterrupt, so that runs end KILLED and temporary files go as on Ctrl+C."""
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def interrupted(err: KeyboardInterrupt) -> str:
    """An interruption in words: `interrupted`, and by what when known (stopped by signal SIGTERM)."""
    return f"interrupted{f' ({err})' if str(err) else ''}"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(): a PipelineError, Ctrl+C or SIGTERM ends it with one line on stderr and exit code 1.

    The one SIGTERM path of every stage and tool, whatever it does (live curves or not): raised as
    KeyboardInterrupt, so runs end KILLED saying why and temporary files go; the previous handler is put back.
    The garbage collector that loading paused (stages/__init__.py) works again for main() (import_gc.py).
    """
    import_gc.resume()
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except PipelineError as err:
        sys.exit(f"error: {without_login(str(err))}")
    except KeyboardInterrupt as err:
        sys.exit(f"{interrupted(err)}: outputs not yet written are left as they were")
    except BrokenPipeError:
        # Whoever read the stage's output went away (`dvc repro | head`): Python's advice, stdout to /dev/null so
        # that the exit's flush raises nothing more, and one line on stderr.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit("error: the stage's output was closed (broken pipe): outputs not yet written are left as they were")
    finally:
        signal.signal(signal.SIGTERM, previous)
        import_gc.before_exit()
