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
from mnist_pipeline.tracking import tag

NOT_KNOWN = {tag.MACHINE_TRAINED_ON: "not known here: this model came from DVC's cache or remote"}
# The run that watches this training (tracking/live_run.py sets it; torchrun's processes inherit it): noted beside
# the model, so that record completes that run, even one the store could not end when the training did.
LIVE_RUN_ENV = "MNIST_LIVE_RUN_ID"


def provenance() -> dict[str, str]:
    """What decided this process's bytes, as MLflow tags: CPU, torch's CPU capability, the pins, the versions."""
    import torch

    config = torch.__config__.show().splitlines()  # names the MKL and oneDNN builds torch carries
    mkl = next((line.split("Version", 1)[1].split("Product")[0].strip(" -")
                for line in config if "Math Kernel Library" in line), "none")
    onednn = next((line.split("MKL-DNN", 1)[1].split("(")[0].strip() for line in config if "MKL-DNN" in line), "none")
    return {
        f"{tag.MACHINE}cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        f"{tag.MACHINE}cpu_capability": torch.backends.cpu.get_cpu_capability(),
        f"{tag.MACHINE}kernel_pins": " ".join(f"{key}={os.environ.get(key, '(unset)')}" for key in PINS),
        f"{tag.MACHINE}torch": torch.__version__,
        f"{tag.MACHINE}mkl": mkl,
        f"{tag.MACHINE}onednn": onednn,
        f"{tag.MACHINE}python": platform.python_version(),
    }


def write_trained_on(path: Path, model_sha256: str) -> None:
    """Note this machine's tags for the model just trained, and the run that watched its training."""
    atomic_write_json(path, {"model_sha256": model_sha256, "tags": provenance(),
                             "live_run_id": os.environ.get(LIVE_RUN_ENV, "")})


def _noted(path: Path, model_sha256: str) -> dict[str, object] | None:
    """What train noted for this model file, or None (another model: from DVC's cache or remote, or none noted)."""
    try:
        noted = json.loads(path.read_text())
        if noted["model_sha256"] == model_sha256:
            return noted
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def live_run_of(path: Path, model_sha256: str) -> str | None:
    """The id of the MLflow run that watched this model's training here, if one did."""
    noted = _noted(path, model_sha256)
    return str(noted.get("live_run_id") or "") or None if noted else None


def trained_on(path: Path, model_sha256: str) -> dict[str, str]:
    """The tags of the machine that trained this model here, or a tag saying it is not known."""
    noted = _noted(path, model_sha256)
    try:
        return {str(key): str(value) for key, value in noted["tags"].items()}  # type: ignore[index, union-attr]
    except (KeyError, TypeError, AttributeError):
        return dict(NOT_KNOWN)
