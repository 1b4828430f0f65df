"""MLflow's side of a run: the store's set-up, a run that always ends, a store's failure in one line."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from filelock import FileLock, Timeout
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from mnist_pipeline.errors import text_lines
from mnist_pipeline.tracking import tag
from mnist_pipeline.tracking.store import Store, StoreError, login_environ

# Marks the experiment as model training. MLflow 3.17's UI lets its sidebar switch decide instead (see
# docs/runs.md), but earlier UIs and MLflow's own search read this tag.
EXPERIMENT_KIND = {tag.EXPERIMENT_KIND: "custom_model_development"}
# What a store can raise when it is broken, full or unreachable. Processes that write one SQLite store at once
# (queued experiments, a live run beside record) wait for each other in SQLite itself: MLflow gives each of its
# sessions a busy timeout of 20 s (mlflow/store/db/utils.py), so no call is retried here, as some are not
# idempotent. A store still locked after that is a "database is locked" error, said in one line by store_errors.
STORE_ERRORS = (MlflowException, SQLAlchemyError, OSError, requests.RequestException)
# How long configure waits for another process to set up the same store: seconds for a new one.
STORE_LOCK_TIMEOUT_S = 120


@contextmanager
def store_errors(store: Store, retry: str) -> Iterator[None]:
    """Turn a store failure (SQLAlchemy's or MLflow's tracebacks run to hundreds of lines) into one line."""
    try:
        yield
    except STORE_ERRORS as err:
        lines = text_lines(str(err)) or [type(err).__name__]
        # MLflow lists failed downloads after a heading ("... from <uri>:"), each file under a "##### File" line.
        cause = next((line for line in lines[1:] if not line.startswith("#")), "") if lines[0].endswith(":") else ""
        raise StoreError(f"MLflow store {store.uri}: {f'{lines[0]} {cause}'.strip()[:300]}; {retry}") from None


def configure(store: Store, experiment: str) -> str:
    """Point MLflow at the store and return the experiment's id, creating it if needed.

    A local store's experiment keeps its artifacts in an absolute folder beside the database, so runs made
    in DVC's temporary copies of the repo land there too. A file lock serializes creating the store and the
    experiment: several processes creating a fresh SQLite store at once fail.
    """
    os.environ.update(login_environ(store))  # a login given in the URI, as MLflow's variables (see store.Store)
    mlflow.set_tracking_uri(store.uri)
    if store.database is None:
        return ensure_experiment(experiment)
    lock = store.database.with_name(f"{store.database.name}.lock")
    try:
        with FileLock(lock, timeout=STORE_LOCK_TIMEOUT_S):
            experiment_id = ensure_experiment(experiment, store.artifacts.as_uri())
    except Timeout:
        raise StoreError(
            f"MLflow store {store.uri}: another process has held {lock} for {STORE_LOCK_TIMEOUT_S} s while setting up "
            f"the store; if it hangs, `fuser {lock}` names it: stop it and run again"
        ) from None
    location = mlflow.get_experiment(experiment_id).artifact_location
    parts = urllib.parse.urlsplit(location)
    if parts.scheme in ("", "file") and not Path(parts.path).is_absolute():
        raise StoreError(
            f"MLflow store {store.uri}: experiment {experiment!r} keeps artifacts at {location!r}, relative to the "
            "working folder, which DVC deletes after a --temp or queued run; rename that experiment or set "
            "mlflow.experiment in params.yaml to a new name"
        )
    return experiment_id


def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment `name` in the current tracking store, created (tagged EXPERIMENT_KIND) if missing."""
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except MlflowException:
            # Another process (on a shared server, say) created it between our lookup and our create.
            found = mlflow.get_experiment_by_name(name)
            if found is None:
                raise
    if tag.EXPERIMENT_KIND not in found.tags:
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return found.experiment_id


@contextmanager
def tracked_run(**start: object) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that always ends: FINISHED, FAILED on an error, KILLED on Ctrl+C or SIGTERM (raised as
    KeyboardInterrupt by errors.run_stage, which every stage and tool runs in)."""
    run = mlflow.start_run(**start)
    try:
        yield run
    except KeyboardInterrupt:
        _fail_pending_models(run)
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        _fail_pending_models(run)
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def _fail_pending_models(run: mlflow.ActiveRun) -> None:
    """Mark FAILED the models this run began to log: MLflow leaves one PENDING when its upload breaks.

    Best effort: when the store itself is broken this fails too, and ending the run must still be tried.
    """
    try:
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
        for model in models:
            if model.status == LoggedModelStatus.PENDING:
                mlflow.MlflowClient().finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    except STORE_ERRORS:
        pass


def flat_metrics(report: dict[str, object], prefix: str = "") -> dict[str, float]:
    """A nested metrics file's numbers under the names `dvc metrics show` prints: test.accuracy, ..."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
