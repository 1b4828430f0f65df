"""The CPU kernel pins: the train stage's bytes whatever kernels the caller asks for, and other bytes without them."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_pipeline import cpu_kernels, machine
from tests.conftest import REPO, copy_workdir, needs_pinnable_cpu, pipeline_commands, project_env

# What a caller's environment could ask for instead of the pins: another kernel path from each of the three libraries.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "AVX2"}


def start_training(work: Path, pinned: bool, **env: str) -> subprocess.Popen[str]:
    """The train stage in `work`, in the background. Pinned, it runs as DVC runs it; not pinned, torch is loaded
    first, which leaves the pins unset. Without live curves: only the model's bytes are compared."""
    command = ["-m", "stages.train"] if pinned else [*cpu_kernels.UNPINNED_PREFIX, "stages.train"]
    return subprocess.Popen([sys.executable, *command, *pipeline_commands()["train"]], cwd=work, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**cpu_kernels.without_pins(project_env()), "PYTHONPATH": str(REPO),
                                 "MNIST_LIVE_CURVES": "off", **env})


def model_bytes(work: Path, process: subprocess.Popen[str]) -> tuple[str, str]:
    """The SHA-256 of the model the training wrote in `work`, and what it printed on stderr."""
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return hashlib.sha256((work / pipeline_commands()["train"][2]).read_bytes()).hexdigest(), stderr


@pytest.mark.slow  # two trainings in processes of their own
@needs_pinnable_cpu
def test_the_pins_decide_the_bytes_not_the_callers_environment(built_pipeline: Path, tmp_path: Path) -> None:
    # The pinned bytes: the tiny pipeline's model, trained in a test process, which imported the stages (and so
    # set the pins) before torch. Two trainings at once, each in its own copy of the tiny pipeline, retrain it.
    pinned = hashlib.sha256((built_pipeline / pipeline_commands()["train"][2]).read_bytes()).hexdigest()
    cases = {"asked": (True, OTHER_KERNELS), "unpinned": (False, OTHER_KERNELS)}
    works = {name: copy_workdir(built_pipeline, tmp_path / name) for name in cases}
    started = {name: start_training(works[name], with_pins, **env) for name, (with_pins, env) in cases.items()}
    (asked, notes), (unpinned, unpinned_notes) = (model_bytes(works[n], started[n]) for n in cases)
    assert asked == pinned, "the caller's environment changed the pinned bytes"
    for key, value in OTHER_KERNELS.items():  # the override is said, not silent
        assert f"train: {key}={value} from the environment is replaced by the pin {key}={cpu_kernels.PINS[key]}" in notes
    # Without the pins the caller's kernels are used, and the bytes change: the pins carry the result.
    assert "train: torch was imported before the CPU kernel pins" in unpinned_notes
    assert unpinned != pinned, "the pins made no difference to the bytes"


def test_a_cpu_without_avx2_or_not_x86_is_named() -> None:
    assert cpu_kernels.unpinnable_reason("x86_64", {"avx2", "fma", "sse4_2"}) is None
    assert cpu_kernels.unpinnable_reason("x86_64", {"avx", "sse4_2"}) == "this CPU lacks AVX2 and FMA"
    assert cpu_kernels.unpinnable_reason("aarch64", {"asimd"}) == "this CPU is aarch64, not x86-64"
    assert "does not say which instructions" in cpu_kernels.unpinnable_reason("x86_64", None)


def test_an_unpinnable_cpu_computes_with_its_own_kernels_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh stage process
    environ = {"ATEN_CPU_CAPABILITY": "default", "PATH": "/bin"}
    notes = cpu_kernels.pin(environ)
    # The ISA caps would select code the CPU lacks, and the caller's choice would change the bytes unseen: both go.
    assert environ == {"MKL_CBWR": "COMPATIBLE", "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT", "PATH": "/bin"}
    replaced, cannot = notes
    assert replaced == "ATEN_CPU_CAPABILITY=default from the environment is replaced by this CPU's own choice"
    assert cannot.startswith("this CPU is aarch64, not x86-64, so it cannot run the pinned AVX2 kernels")
    assert "dvc.lock" in cannot


@needs_pinnable_cpu
def test_torch_computes_with_the_pinned_kernels_and_the_tags_say_so() -> None:
    probe = "import stages, json; from mnist_pipeline import machine; print(json.dumps(machine.provenance()))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**cpu_kernels.without_pins(project_env()), **OTHER_KERNELS})
    tags = json.loads(out.stdout)
    versions = {key: tags.pop(key) for key in ("machine.mkl", "machine.onednn")}
    assert tags == {
        "machine.cpu": cpu_kernels.cpuinfo_field("model name"), "machine.cpu_capability": "AVX2",
        "machine.kernel_pins": " ".join(f"{key}={value}" for key, value in cpu_kernels.PINS.items()),
        "machine.torch": torch.__version__, "machine.python": platform.python_version(),
    }
    assert re.fullmatch(r"20\d\d\.\d+", versions["machine.mkl"]), versions  # as torch.__config__.show() names them
    assert re.fullmatch(r"v\d+\.\d+\.\d+", versions["machine.onednn"]), versions


def test_the_tags_of_a_model_trained_elsewhere_say_so(tmp_path: Path) -> None:
    noted = tmp_path / "trained-on.json"
    noted.write_text(json.dumps({"model_sha256": "abc", "tags": {"machine.cpu": "a CPU"}}))
    assert machine.trained_on(noted, "abc") == {"machine.cpu": "a CPU"}
    assert machine.trained_on(noted, "another model") == machine.NOT_KNOWN
    assert machine.trained_on(tmp_path / "missing.json", "abc") == machine.NOT_KNOWN
