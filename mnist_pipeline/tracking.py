"""MLflow bookkeeping: the store `mlflow ui` opens in the repo root, runs tied to git and DVC, found by model hash."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

# The tag that ties a run to the model file it trained, so evaluate and plot find it without any state file.
MODEL_TAG = "model_sha256"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlruns"


def repo_root() -> Path:
    """The main repo's root: DVC sets DVC_ROOT there, even for `--temp` and queued experiments."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def configure(experiment: str) -> str:
    """Point MLflow at the store and return the experiment's id, creating it if needed.

    The default is the store `mlflow ui` opens in the repo root (sqlite:///mlflow.db, artifacts under
    mlruns/), as absolute paths so that experiments running in copies of the repo still land there.
    MLFLOW_TRACKING_URI overrides it.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        root = repo_root()
        uri = f"sqlite:///{root / STORE_FILE}"
        artifact_location = (root / ARTIFACTS_DIR).as_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between our lookup and our create.
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def run_tags() -> dict[str, str]:
    """Tags tying a run to its git commit and, under `dvc exp run`, to the DVC experiment."""
    tags = {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def log_metrics_at(run_id: str, step: int, metrics: dict[str, float]) -> None:
    """Log several metrics at one step in a single request."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    mlflow.MlflowClient().log_batch(run_id, metrics=batch)


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
                mlflow.log_metrics(flat_metrics(json.loads(path.read_text())))
                mlflow.log_artifact(str(path))
            else:
                continue
            logged.append(out["path"])
    return logged


def find_run(experiment_id: str, model_sha256: str) -> str | None:
    """The newest run that trained the model with this hash, if any."""
    runs = mlflow.search_runs(
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
        with mlflow.start_run(experiment_id=experiment_id, tags={MODEL_TAG: model_sha256, **run_tags()}) as run:
            mlflow.log_params(params)
            yield run
        return
    with mlflow.start_run(run_id=run_id) as run:
        yield run
