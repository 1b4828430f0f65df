"""MLflow bookkeeping: the store `mlflow ui` opens in the repo root, runs tied to git and DVC, found by model hash."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from mnist_pipeline.errors import PipelineError

T = TypeVar("T")

# The tag that ties a run to the model file it trained, so evaluate and plot find it without any state file.
MODEL_TAG = "model_sha256"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
BUSY_RETRIES = 8


def repo_root() -> Path:
    """The main repo's root: DVC sets DVC_ROOT there, even for `--temp` and queued experiments."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def retry_busy(call: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call, retrying with back-off while SQLite reports the store busy (another run is writing)."""
    for attempt in range(BUSY_RETRIES):
        try:
            return call(*args, **kwargs)
        except MlflowException as err:
            if "database is locked" not in str(err) or attempt == BUSY_RETRIES - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def configure(experiment: str) -> str:
    """Point MLflow at the store and return the experiment's id, creating store and experiment if needed.

    The default is the store `mlflow ui` opens in the repo root (sqlite:///mlflow.db), with the
    experiment's artifacts under mlartifacts/, as absolute paths so that experiments running in copies
    of the repo still land there. A file lock serializes creating them, so parallel queued runs don't
    race. MLFLOW_TRACKING_URI overrides all this.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        mlflow.set_tracking_uri(uri)
        return _get_or_create_experiment(experiment, None)
    root = repo_root()
    mlflow.set_tracking_uri(f"sqlite:///{root / STORE_FILE}")
    with (root / f"{STORE_FILE}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _get_or_create_experiment(experiment, (root / ARTIFACTS_DIR).as_uri())


def check_server(uri: str, timeout: float = 10) -> None:
    """Fail at once, with one clear line, if the tracking server does not answer (MLflow itself retries for minutes)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except OSError as err:
        raise PipelineError(
            f"MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer ({getattr(err, 'reason', err)}); "
            "start it, or unset MLFLOW_TRACKING_URI to record in the repo's mlflow.db"
        ) from None


def _get_or_create_experiment(name: str, artifact_location: str | None) -> str:
    found = retry_busy(mlflow.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    try:
        return retry_busy(mlflow.create_experiment, name, artifact_location=artifact_location)
    except MlflowException:
        # Another process (on a remote server, say) created it between our lookup and our create.
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def run_tags() -> dict[str, str]:
    """Tags tying a run to its git commit, whether the workspace was dirty, and the DVC experiment."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        tags["dvc.exp_name"] = name
        tags["mlflow.note.content"] = f"DVC experiment `{name}`: `dvc exp apply {name}` restores its workspace."
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@contextmanager
def tracked_run(**start: object) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, FAILED on an error, KILLED on Ctrl+C or SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    run = retry_busy(mlflow.start_run, **start)
    try:
        yield run
    except KeyboardInterrupt:
        retry_busy(mlflow.end_run, "KILLED")
        raise
    except BaseException:
        retry_busy(mlflow.end_run, "FAILED")
        raise
    else:
        retry_busy(mlflow.end_run, "FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous)


def log_metrics_at(run_id: str, step: int, metrics: dict[str, float]) -> None:
    """Log several metrics at one step in a single request."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    retry_busy(mlflow.MlflowClient().log_batch, run_id, metrics=batch)


def tag_model_version(name: str, version: int | str, tags: dict[str, str]) -> None:
    """Tie a registered model version to its DVC experiment and git commit."""
    client = mlflow.MlflowClient()
    for key in ("dvc.exp_name", "dvc.exp_baseline_rev", "mlflow.source.git.commit"):
        if key in tags:
            retry_busy(client.set_model_version_tag, name, str(version), key.removeprefix("mlflow.source."), tags[key])


def flat_metrics(report: dict[str, object], prefix: str = "") -> dict[str, float]:
    """A nested metrics report as MLflow metric names: {"test": {"accuracy": x}} -> {"test_accuracy": x}."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def log_recorded_results(model: Path, lock: Path = Path("dvc.lock")) -> list[str]:
    """Log to the active run the outputs that dvc.lock records as made from this very model file.

    DVC skips a stage whose inputs match dvc.lock. When training reproduces a model byte for byte (on a
    fresh clone, say), evaluate and plot do not run again, and their committed outputs are this model's
    results: they are logged here so that the new run has them too. Stages that do run log again.
    """
    if not lock.exists():
        return []
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    logged = []
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        deps = stage.get("deps", [])
        if not any(d.get("path") == model.as_posix() and d.get("md5") == md5 for d in deps):
            continue
        for out in stage.get("outs", []):
            path = Path(out["path"])
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.suffix == ".json" and path.is_file():
                retry_busy(mlflow.log_metrics, flat_metrics(json.loads(path.read_text())))
                mlflow.log_artifact(str(path))
            else:
                continue
            logged.append(out["path"])
    return logged


def find_run(experiment_id: str, model_sha256: str) -> str | None:
    """The newest run that trained the model with this hash, if any."""
    runs = retry_busy(
        mlflow.search_runs,
        experiment_ids=[experiment_id],
        filter_string=f"tags.{MODEL_TAG} = '{model_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def model_run(experiment_id: str, model_sha256: str, params: dict[str, object]) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that trained this model; if the store lost it, open a new run for it."""
    run_id = find_run(experiment_id, model_sha256)
    if run_id is None:
        print(f"mlflow: no run trained model {model_sha256[:12]}; recording in a new run")
        with tracked_run(experiment_id=experiment_id, tags={MODEL_TAG: model_sha256, **run_tags()}) as run:
            retry_busy(mlflow.log_params, params)
            yield run
        return
    with tracked_run(run_id=run_id) as run:
        yield run
