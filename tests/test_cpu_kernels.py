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

from mnist_pipeline import cpu_kernels
from tests.conftest import REPO, copy_workdir, needs_pinnable_cpu, pipeline_commands, project_env

# What a caller's environment could ask for instead of the pins: another kernel path from each of the three libraries.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "AVX2"}
# The stage as DVC runs it, or with torch loaded first, which leaves the pins unset (cpu_kernels.pin says so).
PINNED = [sys.executable, "-m", "stages.train"]
UNPINNED = [sys.executable, "-c", "import torch, runpy; runpy.run_module('stages.train', run_name='__main__')"]


def train_bytes(work: Path, command: list[str], **env: str) -> tuple[str, str]:
    """The SHA-256 of the model the train stage writes in `work`, and what it printed on stderr."""
    args = pipeline_commands()["train"]
    clean = {k: v for k, v in project_env().items() if k not in cpu_kernels.PINS}
    result = subprocess.run([*command, *args], cwd=work, env={**clean, "PYTHONPATH": str(REPO), **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return hashlib.sha256((work / args[2]).read_bytes()).hexdigest(), result.stderr


@needs_pinnable_cpu
def test_the_pins_decide_the_bytes_not_the_callers_environment(built_pipeline: Path, tmp_path: Path) -> None:
    work = copy_workdir(built_pipeline, tmp_path / "work")
    pinned, _ = train_bytes(work, PINNED)
    asked, notes = train_bytes(work, PINNED, **OTHER_KERNELS)
    assert asked == pinned, "the caller's environment changed the pinned bytes"
    for key, value in OTHER_KERNELS.items():  # the override is said, not silent
        assert f"{key}={value} from the environment is replaced by the pin {key}={cpu_kernels.PINS[key]}" in notes
    # Without the pins the caller's kernels are used, and the bytes change: the pins carry the result.
    unpinned, notes = train_bytes(work, UNPINNED, **OTHER_KERNELS)
    assert "torch was imported before the CPU kernel pins" in notes
    assert unpinned != pinned, "the pins made no difference to the bytes"


def test_a_cpu_without_avx2_or_not_x86_is_named() -> None:
    assert cpu_kernels.unpinnable_reason("x86_64", {"avx2", "fma", "sse4_2"}) is None
    assert cpu_kernels.unpinnable_reason("x86_64", {"avx", "sse4_2"}) == "this CPU lacks AVX2 and FMA"
    assert cpu_kernels.unpinnable_reason("aarch64", {"asimd"}) == "this CPU is aarch64, not x86-64"


def test_an_unpinnable_cpu_gets_the_safe_pins_and_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh stage process
    environ: dict[str, str] = {"ATEN_CPU_CAPABILITY": "default"}
    notes = cpu_kernels.pin(environ)
    # The ISA caps would select code the CPU lacks: the caller's stay as they were; MKL's mode runs anywhere.
    assert environ == {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                       "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT"}
    (note,) = notes
    assert note.startswith("this CPU is aarch64, not x86-64, so it cannot run the pinned AVX2 kernels")
    assert "dvc.lock" in note


@needs_pinnable_cpu
def test_torch_computes_with_the_pinned_kernels_and_provenance_says_so() -> None:
    probe = "import stages, json; from mnist_pipeline import cpu_kernels; print(json.dumps(cpu_kernels.provenance()))"
    clean = {k: v for k, v in project_env().items() if k not in cpu_kernels.PINS}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**clean, **OTHER_KERNELS},
                         capture_output=True, text=True, check=True)
    tags = json.loads(out.stdout)
    versions = {key: tags.pop(key) for key in ("machine.mkl", "machine.onednn")}
    assert tags == {
        "machine.cpu": cpu_kernels.cpu_model(), "machine.cpu_capability": "AVX2",
        "machine.kernel_pins": " ".join(f"{key}={value}" for key, value in cpu_kernels.PINS.items()),
        "machine.torch": torch.__version__, "machine.python": platform.python_version(),
    }
    assert re.fullmatch(r"20\d\d\.\d+", versions["machine.mkl"]), versions  # as torch.__config__.show() names them
    assert re.fullmatch(r"v\d+\.\d+\.\d+", versions["machine.onednn"]), versions
