"""One MLflow run per DVC result: the result's key, the lookup that keeps it to one run, and writing that run.

A result is what made it and what it is: the params, the data, the served code and the outputs' bytes. Its
key is the same on every machine and in every clone, so a result recorded once (by a teammate, by an
experiment, before the marker was deleted) is found and not recorded again.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import tempfile
import time
from importlib.metadata import version as installed
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mnist_pipeline import tracking
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import sha256_file
from mnist_pipeline.live_run import TRAINING_TAG
from mnist_pipeline.machine import trained_on
from mnist_pipeline.params import Params, flatten
from mnist_pipeline.result import (
    NAMES_TAG, PACKAGE, RESULT_KEY_TAG, SERVED_CODE, Result, names_entry, served_code_sha256, served_config,
)
from mnist_pipeline.store import Store

# MLflow's limits for one log_batch request.
BATCH_ENTRIES, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100


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


def log_model(model_path: Path, raw: Path, params: Params, version_tags: dict[str, str]) -> str | None:
    """Log the served model (source, and weights loaded with weights_only=True: no pickle), register it; its version
    (None: logged in the run, not registered, as this account may not).

    Logged before any metric of the run, so MLflow has none to copy onto the model. The model reads pixel arrays
    and PNG/JPEG files as clients have them (mnist_pipeline/served_model.py); its
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
            input_example=example, pip_requirements=requirements, model_config=served_config(params), tags=version_tags,
        )
    return register(params.mlflow.registered_model, info, version_tags)


def register(name: str, info: mlflow.models.model.ModelInfo, tags: dict[str, str]) -> str | None:
    """Register a logged model as a new version of `name`, its tags in the same call; None where this account may
    not register (a team server grants it per account: see team_server add-user --can-register)."""
    client = mlflow.MlflowClient()
    try:
        try:
            tracking.retry_busy(client.create_registered_model, name)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        version = tracking.retry_busy(client.create_model_version, name, f"models:/{info.model_id}",
                                      run_id=info.run_id, tags=tags, model_id=info.model_id)
    except MlflowException as err:
        if err.error_code == "PERMISSION_DENIED":
            return None
        raise
    # What MLflow's own registration adds: the UI links the logged model to its version by this tag.
    tracking.retry_busy(client.set_logged_model_tags, info.model_id,
                        {"mlflow.modelVersions": json.dumps([{"name": name, "version": version.version}])})
    return str(version.version)


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


def record(result: Result, params: Params, store: Store, tags: dict[str, str], retry: str, key: str) -> list[str]:
    """Record `result`, whose key is `key`, in `store` unless it is there already; the lines to print."""
    summary = read_summary(result.summary)
    metrics = {**tracking.flat_metrics({"train": summary}), **tracking.flat_metrics(read_metrics(result.metrics))}
    curves = curve_metrics(result.train_log)
    code_sha256 = served_code_sha256(served_config(params))
    model_sha256 = sha256_file(result.model)
    name = tags.get("dvc.exp_name", tracking.WORKSPACE_RUN_NAME)
    entry = names_entry(tags)
    registered = params.mlflow.registered_model

    with tracking.store_errors(store, retry):
        experiment_id = tracking.configure(store, params.mlflow.experiment)
        client = mlflow.MlflowClient()
        found = find_recorded(experiment_id, key)
        live = watched_training(experiment_id, model_sha256, flatten(params))
        if found is not None and model_files_present(found):
            names = found.data.tags.get(NAMES_TAG, "").splitlines()
            if entry not in names:
                tracking.retry_busy(client.set_tag, found.info.run_id, NAMES_TAG, "\n".join([*names, entry]))
            lines = [f"record: already recorded as run '{found.info.run_name}' ({found.info.run_id}) in {store.uri}"]
            if live is not None:  # it watched a training that made a result recorded before: not a second run of it
                tracking.retry_busy(client.delete_run, live.info.run_id)
                lines.append(f"record: run {live.info.run_id}, which watched this training, deleted "
                             f"(`mlflow runs restore --run-id {live.info.run_id}` brings it back)")
            return lines
        run_tags = {
            **tags, **trained_on(result.trained_on, model_sha256), RESULT_KEY_TAG: key, NAMES_TAG: entry,
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
            more_tags, champion = {}, None
            if existing is None or lost:
                # What the champion is chosen by: validation accuracy, never the test set's.
                version_tags = {**tracking.version_tags(run_tags), tracking.VAL_ACC_TAG: str(summary["best_val_acc"])}
                version = log_model(result.model, result.raw, params, version_tags)
                origin = "trained here"
                if version is None:
                    origin = (f"logged in the run, not registered: account {tags.get(tracking.ACCOUNT_TAG, '?')!r} "
                              f"may not register {registered!r}; an admin grants it (see the README, Team)")
                elif lost:  # once its replacement is in the champion's choice, out of it
                    tracking.retire_lost_version(registered, existing.version, version)
                    origin = f"logged again: version {existing.version}, the same model, has lost its files"
                if version is not None:  # a new version can change the champion; a known one cannot
                    champion = tracking.crown_champion(registered)
            else:
                version, origin = existing.version, f"same model file as run {existing.run_id}"
                more_tags["model.run_id"] = existing.run_id
            if version is not None:
                more_tags["model.version"] = f"{registered}/{version}"
            now = int(time.time() * 1000)
            test_metrics = [Metric(k, v, now, 0) for k, v in metrics.items()]
            if live:  # its params and curves are there already, logged while it trained
                _batches(run.info.run_id, {}, {**run_tags, **more_tags}, test_metrics)
            else:
                _batches(run.info.run_id, flatten(params), more_tags, test_metrics + curves)
            _log_files(result)
        if found is not None:  # a run of this result whose model cannot load any more: this one replaces it
            tracking.retry_busy(client.delete_run, found.info.run_id)
    name = run.info.run_name if live else name
    model = f"model {registered} version {version}" if version is not None else "model"
    lines = [f"record: MLflow run '{name}' ({run.info.run_id}) in {store.uri}, {model} ({origin})"]
    if found is not None:
        lines.append(f"record: run {found.info.run_id} of the same result lost its model files: deleted "
                     f"(`mlflow runs restore --run-id {found.info.run_id}` brings it back)")
    if champion is not None:
        lines.append(f"record: {registered}@{tracking.CHAMPION} is now version {champion.version}, the best "
                     f"validation accuracy ({champion.tags[tracking.VAL_ACC_TAG]})")
    return lines
