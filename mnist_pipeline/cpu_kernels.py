"""The CPU kernels torch computes with, pinned to one code path so that every x86-64 CPU with AVX2 gives the same bytes.

Three libraries inside torch pick their code by CPU, and each choice changes the weights' last bits: ATen's own
vector kernels, oneDNN (the convolutions) and MKL (the linear layers). The pins cap the first two at AVX2, which
Intel and AMD CPUs from 2013 on run, AVX-512 ones included, and put MKL in its conditional numerical reproducibility
mode COMPATIBLE, whose results do not depend on the CPU. Projects that probed Intel and AMD machines found the caps
alone or MKL's mode alone not enough, and the three together enough (docs/reproducibility.md). The libraries read
these variables once, when they load: `pin()` must run before torch is imported, which `stages/__init__.py` does
for every stage, and torchrun's processes inherit them.
"""

from __future__ import annotations

import os
import platform
import sys
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


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The instruction-set flags Linux reports for the first CPU (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name, as Linux reports it (platform's answer elsewhere)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def unpinnable_reason(machine: str, flags: set[str]) -> str | None:
    """Why this CPU cannot run the pinned code path, or None when it can."""
    if machine not in ("x86_64", "AMD64"):
        return f"this CPU is {machine}, not x86-64"
    missing = [flag for flag in NEEDED_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {' and '.join(f.upper() for f in missing)}"
    return None


def pin(environ: os._Environ[str] | dict[str, str] = os.environ) -> list[str]:
    """Set the pins in `environ`, overriding the caller's values; the notes worth one line each before training.

    Called before torch loads. Where the CPU cannot run the pinned path, only the pins it can run are set and
    the note says what that means for dvc.lock; where torch is already loaded, nothing is changed and the note
    says the process computes with the caller's kernels.
    """
    if "torch" in sys.modules:
        return ["torch was imported before the CPU kernel pins, so this process computes with the kernels its "
                "environment picks; its bytes may differ from dvc.lock's"]
    notes = []
    reason = unpinnable_reason(platform.machine(), cpu_flags())
    for key, value in PINS.items():
        if reason and key in ISA_PINS:
            continue
        if environ.get(key, value) != value:
            notes.append(f"{key}={environ[key]} from the environment is replaced by the pin {key}={value}")
        environ[key] = value
    if reason:
        notes.append(f"{reason}, so it cannot run the pinned AVX2 kernels: it trains with its own, and its model and "
                     "metrics will differ from dvc.lock's in their last bits (a retrain here changes dvc.lock)")
    return notes


def provenance() -> dict[str, str]:
    """What decided this process's bytes, as MLflow tags: CPU, torch's CPU capability, the pins, the versions."""
    import torch

    config = torch.__config__.show()
    versions = {
        "mkl": next((line.split("Version", 1)[1].split("Product")[0].strip(" -")
                     for line in config.splitlines() if "Math Kernel Library" in line), "none"),
        "onednn": next((line.split("MKL-DNN", 1)[1].split("(")[0].strip()
                        for line in config.splitlines() if "MKL-DNN" in line), "none"),
    }
    return {
        "machine.cpu": cpu_model(),
        "machine.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine.kernel_pins": " ".join(f"{key}={os.environ.get(key, '(unset)')}" for key in PINS),
        "machine.torch": torch.__version__,
        "machine.mkl": versions["mkl"],
        "machine.onednn": versions["onednn"],
        "machine.python": platform.python_version(),
    }
