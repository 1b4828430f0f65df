"""One module per DVC stage, run as `python -m stages.<name>` from the repo root.

Python imports this package before any stage module, so the CPU kernel pins are set here, before torch loads, for
every stage and for the processes torchrun starts (mnist_pipeline/cpu_kernels.py says why); and a stage run as a
program loads its modules with Python's garbage collector paused (mnist_pipeline/import_gc.py), which the stage's
run_stage (or run_rank) turns back on.
"""

import os
import sys

from mnist_pipeline import cpu_kernels, import_gc

if sys.argv[:1] == ["-m"]:  # `python -m stages.<name>` is finding its module (Python's documented sys.argv[0])
    import_gc.pause()
KERNEL_NOTES = cpu_kernels.pin(os.environ)


def say_kernel_notes(stage: str) -> None:
    """What the pins could not do here, one line each, before the stage computes."""
    for note in KERNEL_NOTES:
        print(f"{stage}: {note}", file=sys.stderr, flush=True)
