"""The CPU kernels torch computes with, pinned to one code path so that every x86-64 CPU with AVX2 gives the same bytes.

Three libraries inside torch pick their code by CPU, and each choice changes the weights' last bits: ATen's own
vector kernels, oneDNN (the convolutions) and MKL (the linear layers). The pins cap the first two at AVX2, which
Intel and AMD CPUs from 2013 on run, AVX-512 ones included, and put MKL in its conditional numerical reproducibility
mode COMPATIBLE, whose results do not depend on the CPU. A project that probed Intel and AMD machines found the
caps alone or MKL's mode alone not enough, and the three together enough (docs/reproducibility.md). The libraries
read these variables once, when they load: `pin()` must run before torch is imported, which `stages/__init__.py`
does for every stage, and torchrun's processes inherit them.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

# oneDNN's floating-point mode is STRICT by default: pinned so a caller's BF16 or ANY cannot let it round
# float32 convolutions down on CPUs with bfloat16 units.
PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",
}
# The ISA caps select code the CPU must have: set on a CPU without it, a kernel would stop the process (SIGILL).
ISA_PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
# What ATen's AVX2 kernels need of the CPU (oneDNN's AVX2 path needs no more).
NEEDED_FLAGS = ("avx2", "fma")
CPUINFO = Path("/proc/cpuinfo")
# A process that loads torch before importing the pipeline computes with the kernels its environment picks:
# how the tests and the benchmark run the stage without the pins, to show what they change.
UNPINNED_PREFIX = ["-c", "import runpy, sys, torch; runpy.run_module(sys.argv.pop(1), run_name='__main__')"]


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """A field of the first CPU in Linux's /proc/cpuinfo; None where there is no such file or field."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def unpinnable_reason(machine: str, flags: set[str] | None) -> str | None:
    """Why this CPU cannot run the pinned code path (flags: Linux's, None where unknown), or None when it can."""
    if machine != "x86_64":
        return f"this CPU is {machine}, not x86-64"
    if flags is None:
        return "this system does not say which instructions its CPU has (no /proc/cpuinfo)"
    missing = [flag for flag in NEEDED_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {' and '.join(f.upper() for f in missing)}"
    return None


def this_cpu_unpinnable() -> str | None:
    """`unpinnable_reason` for the CPU this runs on."""
    flags = cpuinfo_field("flags")
    return unpinnable_reason(platform.machine(), None if flags is None else set(flags.split()))


def pin(environ: MutableMapping[str, str]) -> list[str]:
    """Set the pins in `environ`, overriding the caller's values; the notes worth one line each before training.

    Called before torch loads. Where the CPU cannot run the pinned path, the ISA caps are left unset (the CPU's
    own choice) and the note says what that means for dvc.lock; where torch is already loaded, nothing is
    changed and the note says the process computes with the caller's kernels.
    """
    if "torch" in sys.modules:
        return ["torch was imported before the CPU kernel pins, so this process computes with the kernels its "
                "environment picks; its bytes may differ from dvc.lock's"]
    notes = []
    reason = this_cpu_unpinnable()
    for key, value in PINS.items():
        wanted = None if reason and key in ISA_PINS else value
        if key in environ and environ[key] != wanted:
            instead = f"the pin {key}={wanted}" if wanted else "this CPU's own choice"
            notes.append(f"{key}={environ[key]} from the environment is replaced by {instead}")
        if wanted is None:
            environ.pop(key, None)
        else:
            environ[key] = wanted
    if reason:
        notes.append(f"{reason}, so it cannot run the pinned AVX2 kernels: it trains with its own, and its model and "
                     "metrics will differ from dvc.lock's in their last bits (a retrain here changes dvc.lock)")
    return notes


def without_pins(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` with none of the pins set, for a process whose kernels the caller chooses."""
    return {key: value for key, value in environ.items() if key not in PINS}
