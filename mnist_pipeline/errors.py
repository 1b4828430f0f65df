"""The errors a stage reports in one line: bad params or data, a failed download, a failed write."""

from __future__ import annotations

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem the user can act on; the message names the file and the key or byte offset."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(): a PipelineError, Ctrl+C or SIGTERM ends it with one line on stderr and exit code 1."""
    try:
        main()
    except PipelineError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as err:
        sys.exit(f"interrupted{f' ({err})' if str(err) else ''}: outputs not yet written are left as they were")
