"""One module per DVC stage, run as `python -m stages.<name>` from the repo root.

Python imports this package before any stage module, so the CPU kernel pins are set here, before torch loads, for
every stage and for the processes torchrun starts (mnist_pipeline/cpu_kernels.py says why).
"""

from mnist_pipeline import cpu_kernels

KERNEL_NOTES = cpu_kernels.pin()
