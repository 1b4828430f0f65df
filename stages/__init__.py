"""One module per DVC stage, run as `python -m stages.<name>` from the repo root.

Python imports this package before any stage module, so the CPU kernel pins are set here, before torch loads, for
every stage and for the processes torchrun starts (mnist_pipeline/cpu_kernels.py says why).
"""

import os
import sys

from mnist_pipeline import cpu_kernels

KERNEL_NOTES = cpu_kernels.pin(os.environ)


def say_kernel_notes(stage: str) -> None:
    """What the pins could not do here, one line each, before the stage computes."""
    for note in KERNEL_NOTES:
        print(f"{stage}: {note}", file=sys.stderr, flush=True)
