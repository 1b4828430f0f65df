"""Benchmarks, run as `python -m benchmarks.bench` from the repo root.

They measure the code as the stages run it, so the CPU kernel pins are set here, before torch loads, as
stages/__init__.py does for the stages.
"""

import os

from mnist_pipeline import cpu_kernels

cpu_kernels.pin(os.environ)
