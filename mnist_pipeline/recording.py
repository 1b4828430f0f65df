"""One MLflow run per DVC result: the result's key, the lookup that keeps it to one run, and writing that run.

A result is what made it and what it is: the params, the data, the served code and the outputs' bytes. Its
key is the same on every machine and in every clone, so a result recorded once (by a teammate, by an
experiment, before the marker was deleted) is found and not recorded again.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version as installed
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

import mnist_pipeline
from mnist_pipeline import tracking
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import sha256_file
from mnist_pipeline.live_run import TRAINING_TAG
from mnist_pipeline.machine import trained_on
from mnist_pipeline.params import Params, flatten
from mnist_pipeline.store import Store

PACKAGE = Path(mnist_pipeline.__file__).parent
# The files the served model runs (mnist_pipeline/served_model.py imports the others), logged with its weights.
SERVED_CODE = ("__init__.py", "cpu_kernels.py", "digits.py", "model.py", "served_model.py")
RESULT_KEY_TAG = "result_key"
# Every DVC name a result was recorded under, a line each: "<baseline commit> <experiment>" or
# "<commit> workspace". One run per result: an experiment that reproduces another's bytes adds its name here.
NAMES_TAG = "dvc.names"
# MLflow's limits for one log_batch request.
BATCH_ENTRIES, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100


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


def curve_metrics(train_log: Path) -> list[Metric]:
    """Every column of the training log but the counters, each value at its iteration."""
    now = int(time.time() * 1000)
    try:
        with train_log.open(newline="") as file:
            rows = list(csv.DictReader(file))
        return [
            Metric(name, float(value), now, int(row["iteration"]))
            for row in rows for name, value in row.items() if name not in ("iteration", "epoch")
        ]
    except (OSError, KeyError, ValueError, TypeError) as err:
        why = f"{type(err).__name__}: {err}"
        raise PipelineError(f"{train_log}: expected a CSV with an iteration column ({why})") from None


def read_summary(path: Path) -> dict[str, object]:
    """train's summary, checked for what the run's tags and metrics need."""
    try:
        summary = json.loads(path.read_text())["train"]
        device, world_size = str(summary["device"]), int(summary["world_size"])
        best_val_acc = float(summary["best_val_acc"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = f"{type(err).__name__}: {err}"
        raise PipelineError(f"{path}: expected train.best_val_acc, train.device and train.world_size ({why})") from None
    return {**summary, "device": device, "world_size": world_size, "best_val_acc": best_val_acc}


def read_metrics(path: Path) -> dict[str, object]:
    """evaluate's metrics file, which must hold the test section."""
    try:
        report = json.loads(path.read_text())
        report["test"]["accuracy"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"{path}: expected evaluate's test metrics ({type(err).__name__}: {err})") from None
    return report


def served_config(params: Params) -> dict[str, object]:
    """The served model's model_config (served_model.py reads it): digits prepared as its network trained on them."""
    return {"deskew": params.train.deskew}  # served_model.DESKEW; imported there with torch, so written out here


def served_code_sha256(config: dict[str, object]) -> str:
    """SHA-256 of the files the served model runs and its model_config: with the weights, what a version is."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in SERVED_CODE:
        digest.update(f"{name}\0".encode() + (PACKAGE / name).read_bytes() + b"\0")
    return digest.hexdigest()


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


def find_recorded(experiment_id: str, key: str) -> mlflow.entities.Run | None:
    """The finished run of this result, if any: the first made, should a race have made two."""
    runs = tracking.retry_busy(
        mlflow.MlflowClient().search_runs, [experiment_id],
        filter_string=f"tags.{RESULT_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0] if runs else None


def watched_training(experiment_id: str, model_sha256: str, params: dict[str, object]) -> mlflow.entities.Run | None:
    """The run that watched this model train (mnist_pipeline/live_run.py), for record to complete: a training that
    ended with this model file, not yet completed by a record, with the params being recorded. The newest."""
    runs = tracking.retry_busy(
        mlflow.MlflowClient().search_runs, [experiment_id],
        filter_string=(f"tags.{TRAINING_TAG} = 'trained' and tags.{tracking.MODEL_TAG} = '{model_sha256}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=20,
    )
    flat = {k: str(v) for k, v in params.items()}
    return next((r for r in runs if RESULT_KEY_TAG not in r.data.tags and r.data.params == flat), None)


def model_files_present(run: mlflow.entities.Run) -> bool:
    """Whether the registered version a run points at can still be loaded (a deleted mlartifacts/ cannot)."""
    name, _, version = run.data.tags.get("model.version", "").partition("/")
    try:
        return bool(version) and tracking.files_present(name, version)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # the version itself was deleted
            return False
        raise


def log_model(model_path: Path, raw: Path, params: Params, version_tags: dict[str, str]) -> str:
    """Log the served model (source, and weights loaded with weights_only=True: no pickle), register it; its version.

    Logged before any metric of the run, so MLflow has none to copy onto the model. The model reads pixel arrays and PNG/JPEG files as clients have them (mnist_pipeline/served_model.py); its
    input is one list whose items are either, which only an object tensor can say in an MLflow signature.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array
    from PIL import Image

    from mnist_pipeline.data import load_mnist
    from mnist_pipeline.model import Net
    from mnist_pipeline.served_model import WEIGHTS
    from mnist_pipeline.training import load_state_dict

    load_state_dict(model_path, Net())  # refuse a file that is not this network's weights, in one line
    png = io.BytesIO()  # the input example: the first test image as a PNG file, base64 as in a JSON request
    Image.fromarray(load_mnist(raw, "t10k")[0][0]).save(png, format="PNG")
    example = np.array([base64.b64encode(png.getvalue()).decode()], dtype=object)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([ColSpec(DataType.long, "digit"), ColSpec(Array(DataType.double), "probabilities")]),
    )
    requirements = [f"{name}=={installed(name).split('+')[0]}" for name in ("mlflow", "torch", "numpy", "Pillow")]
    with tempfile.TemporaryDirectory() as folder:
        code = Path(folder) / PACKAGE.name  # only what the served model runs, as the package it imports
        code.mkdir()
        for name in SERVED_CODE:
            shutil.copyfile(PACKAGE / name, code / name)
        info = tracking.retry_busy(
            mlflow.pyfunc.log_model, name="model", python_model=str(code / "served_model.py"),
            artifacts={WEIGHTS: str(model_path)}, code_paths=[str(code)], signature=signature,
            input_example=example, pip_requirements=requirements, model_config=served_config(params),
            registered_model_name=params.mlflow.registered_model, tags=version_tags,  # the model's and its version's
        )
    return str(info.registered_model_version)


def _batches(run_id: str, params: dict[str, str], tags: dict[str, str], metrics: list[Metric]) -> None:
    """Params, tags and metrics in the fewest log_batch requests MLflow's limits allow."""
    client = mlflow.MlflowClient()
    params_left = [Param(k, str(v)) for k, v in params.items()]
    tags_left = [RunTag(k, v) for k, v in tags.items()]
    metrics_left = list(metrics)
    while params_left or tags_left or metrics_left:
        p, params_left = params_left[:BATCH_PARAMS], params_left[BATCH_PARAMS:]
        t, tags_left = tags_left[:BATCH_TAGS], tags_left[BATCH_TAGS:]
        room = BATCH_ENTRIES - len(p) - len(t)
        m, metrics_left = metrics_left[:room], metrics_left[room:]
        tracking.retry_busy(client.log_batch, run_id, metrics=m, params=p, tags=t)


def _log_files(result: Result) -> None:
    """The reports and figures in one upload: MLflow copies (or sends) a folder file by file, but in one call."""
    with tempfile.TemporaryDirectory() as folder:
        reports = Path(folder, "reports")
        reports.mkdir()
        for path in result.reports():
            shutil.copyfile(path, reports / path.name)
        shutil.copytree(result.figures, Path(folder, "figures"))
        mlflow.log_artifacts(folder)


def record(result: Result, params: Params, store: Store, tags: dict[str, str], retry: str) -> list[str]:
    """Record `result` in `store` unless it is there already; the lines to print."""
    summary = read_summary(result.summary)
    metrics = {**tracking.flat_metrics({"train": summary}), **tracking.flat_metrics(read_metrics(result.metrics))}
    curves = curve_metrics(result.train_log)
    code_sha256 = served_code_sha256(served_config(params))
    key = result_key(params, result, code_sha256)
    model_sha256 = sha256_file(result.model)
    name = tags.get("dvc.exp_name", tracking.WORKSPACE_RUN_NAME)
    label = f"{tags.get('dvc.exp_baseline_rev') or tags.get('mlflow.source.git.commit', '-')} {name}"
    registered = params.mlflow.registered_model

    with tracking.store_errors(store, retry):
        experiment_id = tracking.configure(store, params.mlflow.experiment)
        client = mlflow.MlflowClient()
        found = find_recorded(experiment_id, key)
        live = watched_training(experiment_id, model_sha256, flatten(params))
        if found is not None and model_files_present(found):
            names = found.data.tags.get(NAMES_TAG, "").splitlines()
            if label not in names:
                tracking.retry_busy(client.set_tag, found.info.run_id, NAMES_TAG, "\n".join([*names, label]))
            lines = [f"record: already recorded as run '{found.info.run_name}' ({found.info.run_id}) in {store.uri}"]
            if live is not None:  # it watched a training that made a result recorded before: not a second run of it
                tracking.retry_busy(client.delete_run, live.info.run_id)
                lines.append(f"record: run {live.info.run_id}, which watched this training, deleted "
                             f"(`mlflow runs restore --run-id {live.info.run_id}` brings it back)")
            return lines
        run_tags = {
            **tags, **trained_on(result.trained_on, model_sha256), RESULT_KEY_TAG: key, NAMES_TAG: label,
            tracking.MODEL_TAG: model_sha256, tracking.CODE_TAG: code_sha256,
            # Where it trained: results differ in their last bits between devices and world sizes.
            "train.device": summary["device"], "train.world_size": str(summary["world_size"]),
            "train.backend": str(summary.get("backend", "none")),
        }
        # The run that watched the training, completed; else a new one (a result restored from DVC's run-cache).
        start = {"run_id": live.info.run_id} if live else {"experiment_id": experiment_id, "run_name": name,
                                                           "tags": run_tags}
        with tracking.tracked_run(**start) as run:
            existing = tracking.find_model_version(registered, model_sha256, code_sha256)
            lost = existing is not None and not tracking.files_present(registered, existing.version)
            more_tags = {}
            if existing is None or lost:
                # What the champion is chosen by: validation accuracy, never the test set's.
                version_tags = {**tracking.version_tags(run_tags), tracking.VAL_ACC_TAG: str(summary["best_val_acc"])}
                version = log_model(result.model, result.raw, params, version_tags)
                origin = "trained here"
                if lost:  # once its replacement is in the champion's choice, out of it
                    tracking.retire_lost_version(registered, existing.version, version)
                    origin = f"logged again: version {existing.version}, the same model, has lost its files"
            else:
                version, origin = existing.version, f"same model file as run {existing.run_id}"
                more_tags["model.run_id"] = existing.run_id
            more_tags["model.version"] = f"{registered}/{version}"
            now = int(time.time() * 1000)
            test_metrics = [Metric(k, v, now, 0) for k, v in metrics.items()]
            if live:  # its params and curves are there already, logged while it trained
                _batches(run.info.run_id, {}, {**run_tags, **more_tags}, test_metrics)
            else:
                _batches(run.info.run_id, flatten(params), more_tags, test_metrics + curves)
            _log_files(result)
            champion = tracking.crown_champion(store, registered)
        if found is not None:  # a run of this result whose model cannot load any more: this one replaces it
            tracking.retry_busy(client.delete_run, found.info.run_id)
    name = run.info.run_name if live else name
    lines = [f"record: MLflow run '{name}' ({run.info.run_id}) in {store.uri}, model {registered} version {version} "
             f"({origin})"]
    if found is not None:
        lines.append(f"record: run {found.info.run_id} of the same result lost its model files: deleted "
                     f"(`mlflow runs restore --run-id {found.info.run_id}` brings it back)")
    if champion is not None:
        lines.append(f"record: {registered}@{tracking.CHAMPION} is now version {champion.version}, the best "
                     f"validation accuracy ({champion.tags[tracking.VAL_ACC_TAG]})")
    return lines
