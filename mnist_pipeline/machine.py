"""Where a model was trained: the CPU, the kernels in effect and the library versions, as MLflow tags.

They differ from machine to machine, so they stay out of DVC's outputs: train writes them beside the model in a
git-ignored file that DVC does not track, with the model's SHA-256, and record tags the run with them when that
model is the one it records (a model from DVC's cache or remote was trained elsewhere, on a machine not known here).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from mnist_pipeline.cpu_kernels import PINS, cpuinfo_field
from mnist_pipeline.files import atomic_write_json

NOT_KNOWN = {"machine.trained_on": "not known here: this model came from DVC's cache or remote"}


def provenance() -> dict[str, str]:
    """What decided this process's bytes, as MLflow tags: CPU, torch's CPU capability, the pins, the versions."""
    import torch

    config = torch.__config__.show().splitlines()  # names the MKL and oneDNN builds torch carries
    mkl = next((line.split("Version", 1)[1].split("Product")[0].strip(" -")
                for line in config if "Math Kernel Library" in line), "none")
    onednn = next((line.split("MKL-DNN", 1)[1].split("(")[0].strip() for line in config if "MKL-DNN" in line), "none")
    return {
        "machine.cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "machine.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine.kernel_pins": " ".join(f"{key}={os.environ.get(key, '(unset)')}" for key in PINS),
        "machine.torch": torch.__version__,
        "machine.mkl": mkl,
        "machine.onednn": onednn,
        "machine.python": platform.python_version(),
    }


def write_trained_on(path: Path, model_sha256: str) -> None:
    """Note this machine's tags for the model just trained."""
    atomic_write_json(path, {"model_sha256": model_sha256, "tags": provenance()})


def trained_on(path: Path, model_sha256: str) -> dict[str, str]:
    """The tags of the machine that trained this model here, or a tag saying it is not known."""
    try:
        noted = json.loads(path.read_text())
        if noted["model_sha256"] == model_sha256:
            return {str(key): str(value) for key, value in noted["tags"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return dict(NOT_KNOWN)
