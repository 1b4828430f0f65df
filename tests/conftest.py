"""Shared fixtures: tiny generated MNIST-shaped IDX files, a shrunk copy of the real params, the real data."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_pipeline.data import MNIST_FILES, MnistFile

REPO = Path(__file__).resolve().parents[1]
# The real MNIST files (gzipped) beside the clone; CI lays them there too.
SHARED_MNIST = REPO.parent / "shared" / "mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding `array`."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def tiny_arrays(n_train: int = 240, n_test: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """Random MNIST-shaped images whose brightest quadrant encodes the label, so a CNN can learn it."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 4)
            images[i, 2 + 8 * row : 8 + 8 * row, 2 + 6 * col : 8 + 6 * col] = 255
        arrays[f"{split}-images-idx3-ubyte"] = images
        arrays[f"{split}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    return arrays


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, tuple[MnistFile, ...]]:
    """A folder of tiny uncompressed IDX files and their MnistFile entries (names as MNIST's, own MD5s)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    files = []
    arrays = tiny_arrays()
    for official in MNIST_FILES:
        data = idx_bytes(arrays[official.name])
        (folder / official.name).write_bytes(data)
        files.append(MnistFile(official.name, hashlib.md5(data).hexdigest(), len(data), official.ndim))
    return folder, tuple(files)


def gzip_folder(src: Path, dest: Path) -> Path:
    """Gzip every file of `src` into `dest` as <name>.gz."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        (dest / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    return dest


def shrunk_params(**train: object) -> dict:
    """The real params.yaml, shrunk for a fast run on tiny data."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"epochs": 2, "batch_size": 32, "log_every": 4, **train})
    params["plot"].update({"n_images": 9, "n_misclassified": 9})
    params["evaluate"]["batch_size"] = 25
    return params


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working folder holding a shrunk params.yaml, with MLflow's store inside it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(shrunk_params(), sort_keys=False))
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(work))
    return work


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    """The real MNIST files; their absence is an error, not a skip."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"the real MNIST files are expected in {SHARED_MNIST}")
    return SHARED_MNIST


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
}


def project_env(**extra: str) -> dict[str, str]:
    """This Python's environment first on PATH (DVC runs `python -m stages...`), no inherited tracking settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MNIST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **GIT_IDENTITY, **extra}


def copy_project(dest: Path) -> Path:
    """The project's tracked and not-ignored files, committed in a fresh git repo: what a clone holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    env = project_env()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "clone"], cwd=dest, check=True, env=env)
    return dest


def dvc(clone: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=clone, env=project_env(**env), capture_output=True, text=True
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(command: list[str], port: int, ready_path: str, cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """Run a server on 127.0.0.1:port until it answers ready_path; stop it afterwards. Yields its base URL."""
    log_path = Path(tempfile.gettempdir()) / f"mnist-pipeline-server-{port}.log"
    log = log_path.open("w")  # closed below, after the process
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + ready_path, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not start:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def get_json(url: str, body: dict | None = None) -> dict:
    """GET (or POST `body` as JSON to) a URL and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)
