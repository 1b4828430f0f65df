"""What a DVC result is, without MLflow: its files, its key and the tags tying it to git and DVC. record reads a
result recorded before with these alone (no MLflow start-up); tracking/recording.py writes a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import sha256_file
from mnist_pipeline.params import Params, flatten
from mnist_pipeline.tracking import tag
from mnist_pipeline.tracking.store import account

WORKSPACE_RUN_NAME = "workspace"  # the run name of a result of `dvc repro` in the workspace (no DVC experiment)
# Extra tags for every run of this process's results, as a JSON object of strings: a sweep's worker names its study and
# trial here (tools/sweep.py), so the live run and record's run both carry them.
RUN_TAGS_ENV = "MNIST_RUN_TAGS"


@dataclass(frozen=True)
class Result:
    """The files of one DVC result, as record's arguments name them."""

    raw: Path
    model: Path
    train_log: Path
    summary: Path
    metrics: Path
    predictions: Path
    figures: Path
    trained_on: Path

    def reports(self) -> list[Path]:
        return [self.train_log, self.summary, self.metrics, self.predictions]


def _content_sha256(path: Path) -> str:
    """A file's SHA-256, or a folder's: of its files' names relative to it and their SHA-256s."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def result_key(params: Params, result: Result, code_sha256: str) -> str:
    """What makes this result, as one SHA-256: params, data, served code and outputs; no path, machine or clock."""
    parts = {"params": flatten(params), "served_code": code_sha256}
    for role in ("raw", "model", "train_log", "summary", "metrics", "predictions", "figures"):
        parts[role] = _content_sha256(getattr(result, role))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def git(*args: str) -> str | None:
    """A git command's output, or None where it fails (no repo, no commit, no such revision)."""
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None


def git_dirty(outputs: list[Path]) -> bool:
    """Whether tracked files differ from the commit, leaving out the pipeline's own outputs and dvc.lock.

    DVC deletes a stage's outputs before running it and rewrites dvc.lock as stages finish: they differ
    from the commit during any `dvc repro`, and say nothing about the code and params that made the result.
    """
    changed = filter(None, (git("diff", "--name-only", "-z", "HEAD") or "").split("\0"))
    own = [path.as_posix().rstrip("/") for path in [*outputs, Path("dvc.lock")]]
    return any(not any(name == out or name.startswith(f"{out}/") for out in own) for name in changed)


def run_tags(outputs: list[Path]) -> dict[str, str]:
    """Tags tying a run to its git commit, to whether code or params differ from it, and to the DVC experiment."""
    tags = {}
    commit = (git("rev-parse", "HEAD") or "").strip()
    if commit:
        tags[tag.GIT_COMMIT] = commit
        tags[tag.GIT_DIRTY] = str(git_dirty(outputs)).lower()
    name = os.environ.get("DVC_EXP_NAME")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if name:
        tags[tag.DVC_EXP_NAME] = name
        tags[tag.NOTE] = (
            f"DVC experiment `{name}`: `dvc exp apply {name}` brings it back into the workspace "
            "(while `dvc exp list` lists it)."
        )
    else:
        tags[tag.NOTE] = f"`dvc repro` in the workspace at commit `{commit[:7] or 'none'}`."
    if baseline:
        tags[tag.DVC_EXP_BASELINE] = baseline
    tags[tag.ACCOUNT] = account()  # on every run: the live run, a failed training's, record's
    return {**tags, **extra_tags()}


def extra_tags() -> dict[str, str]:
    """The tags RUN_TAGS_ENV adds to every run (none when unset); a value that is not a JSON object of strings is
    refused in one line before any run is made."""
    text = os.environ.get(RUN_TAGS_ENV, "")
    try:
        extra = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise PipelineError(f"{RUN_TAGS_ENV}: not JSON ({err})") from None
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise PipelineError(f'{RUN_TAGS_ENV}: must be a JSON object of strings, e.g. {{"sweep.study": "s1"}}')
    return extra


def run_name(tags: dict[str, str]) -> str:
    """The name of a run with these tags: its DVC experiment's, else WORKSPACE_RUN_NAME."""
    return tags.get(tag.DVC_EXP_NAME, WORKSPACE_RUN_NAME)


def names_entry(tags: dict[str, str]) -> str:
    """This result's DVC name as tag.NAMES lists it."""
    return f"{tags.get(tag.DVC_EXP_BASELINE) or tags.get(tag.GIT_COMMIT, '-')} {run_name(tags)}"
