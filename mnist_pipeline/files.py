"""Atomic file output: write beside the target, then rename, so no reader ever sees half a file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import PipelineError


def partial_name(path: Path) -> str:
    """The prefix of temporary files and folders made for `path` (git-ignored as *.partial-*)."""
    return f".{path.name}.partial-"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=partial_name(path))
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files.
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise PipelineError(f"cannot write {path}: {err.strerror or err}; it is left as it was") from err
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, with sorted keys so equal results give equal bytes."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_partial_dir(path: Path) -> Path:
    """A fresh temporary folder beside `path`, removing any left by an earlier killed run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(partial_name(path) + "*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=partial_name(path)))
    tmp.chmod(0o755)  # mkdtemp makes folders private; outputs are ordinary folders.
    return tmp


def replace_dir(tmp_dir: Path, path: Path) -> None:
    """Move a finished temporary folder to `path`, replacing what was there."""
    old = None
    if path.exists():
        old = path.parent / f"{partial_name(path)}old"
        os.replace(path, old)
    os.replace(tmp_dir, path)
    if old is not None:
        shutil.rmtree(old)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
