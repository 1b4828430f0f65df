"""One MLflow run per DVC result: the result's key, the lookup that keeps it to one run, and writing that run.

A result is what made it and what it is: the params, the data, the served code and the outputs' bytes. Its
key is the same on every machine and in every clone, so a result recorded once (by a teammate, by an
experiment, before the marker was deleted) is found and not recorded again. A training that failed gets its own
run here too (record_failed_training), so both ends of a result's bookkeeping live in one place.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mnist_pipeline import served_package, tracking
from mnist_pipeline.files import sha256_file
from mnist_pipeline.live_run import TRAINING_TAG
from mnist_pipeline.machine import trained_on
from mnist_pipeline.params import Params, flatten
from mnist_pipeline.reports import read_metrics, read_summary, read_train_log
from mnist_pipeline.result import (
    ACCOUNT_TAG, NAMES_TAG, RESULT_KEY_TAG, WORKSPACE_RUN_NAME, Result, names_entry, run_tags,
)
from mnist_pipeline.store import Store, StoreError

# MLflow's limits for one log_batch request.
BATCH_ENTRIES, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100


def curve_metrics(train_log: Path) -> list[Metric]:
    """Every column of the training log but the counters, each value at its iteration."""
    now = int(time.time() * 1000)
    return [Metric(name, value, now, row.iteration) for row in read_train_log(train_log)
            for name, value in asdict(row).items() if name not in ("iteration", "epoch")]


def find_recorded(experiment_id: str, key: str) -> mlflow.entities.Run | None:
    """The finished run of this result, if any: the first made, should a race have made two."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.{RESULT_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0] if runs else None


def watched_training(experiment_id: str, model_sha256: str, params: dict[str, object]) -> mlflow.entities.Run | None:
    """The run that watched this model train (mnist_pipeline/live_run.py), for record to complete: a training that
    ended with this model file, not yet completed by a record, with the params being recorded. The newest."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.{TRAINING_TAG} = 'trained' and tags.{tracking.MODEL_TAG} = '{model_sha256}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=20,
    )
    flat = {k: str(v) for k, v in params.items()}
    return next((r for r in runs if RESULT_KEY_TAG not in r.data.tags and r.data.params == flat), None)


def mark_repeat(client: mlflow.MlflowClient, live: mlflow.entities.Run, found: mlflow.entities.Run) -> None:
    """End the run that watched a training whose result was recorded before: KILLED, `training: repeat` and
    `repeat_of` the result's run, so that nobody takes it for a second result. Nothing is deleted: on a team
    server deleting a run takes the admin, and a teammate's record must complete with EDIT alone."""
    note = (f"This training made the bytes of a result recorded before, in run {found.info.run_id} "
            f"('{found.info.run_name}'): that run is the result's; this one keeps the curves of the repeat.")
    client.log_batch(live.info.run_id, tags=[RunTag(TRAINING_TAG, "repeat"), RunTag("repeat_of", found.info.run_id),
                                             RunTag("mlflow.note.content", note)])
    client.set_terminated(live.info.run_id, "KILLED")


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
    """Log the served model as mnist_pipeline/served_package.py packages it (source, and weights loaded with
    weights_only=True: no pickle), register it; its version (None: logged in the run, not registered, as this account
    may not). Logged before any metric of the run, so MLflow has none to copy onto the model."""
    with served_package.packaged(model_path, raw, params) as package:
        info = mlflow.pyfunc.log_model(name="model", tags=version_tags, **package)
    return register(params.mlflow.registered_model, info, version_tags)


def register(name: str, info: mlflow.models.model.ModelInfo, tags: dict[str, str]) -> str | None:
    """Register a logged model as a new version of `name`, its tags in the same call; None where this account may
    not register (a team server grants it per account: see team_server add-user --can-register)."""
    client = mlflow.MlflowClient()
    try:
        tracking.ensure_registered_model(client, name)
        version = client.create_model_version(name, f"models:/{info.model_id}",
                                              run_id=info.run_id, tags=tags, model_id=info.model_id)
    except MlflowException as err:
        if err.error_code == "PERMISSION_DENIED":
            return None
        raise
    # What MLflow's own registration adds: the UI links the logged model to its version by this tag.
    client.set_logged_model_tags(info.model_id,
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
        client.log_batch(run_id, metrics=m, params=p, tags=t)


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
    metrics = {**tracking.flat_metrics({"train": asdict(summary)}),
               **tracking.flat_metrics({"test": read_metrics(result.metrics)})}
    curves = curve_metrics(result.train_log)
    code_sha256 = served_package.served_code_sha256(served_package.served_config(params))
    model_sha256 = sha256_file(result.model)
    name = tags.get("dvc.exp_name", WORKSPACE_RUN_NAME)
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
                client.set_tag(found.info.run_id, NAMES_TAG, "\n".join([*names, entry]))
            lines = [f"record: already recorded as run '{found.info.run_name}' ({found.info.run_id}) in {store.uri}"]
            if live is not None:  # it watched a training that made a result recorded before: not a second run of it
                mark_repeat(client, live, found)
                lines.append(f"record: run {live.info.run_id}, which watched this training, ended KILLED as a "
                             f"repeat of run {found.info.run_id} (the same bytes: one run per result)")
            return lines
        run_tags = {
            **tags, **trained_on(result.trained_on, model_sha256), RESULT_KEY_TAG: key, NAMES_TAG: entry,
            tracking.MODEL_TAG: model_sha256, tracking.CODE_TAG: code_sha256,
            # Where it trained: results differ in their last bits between devices and world sizes.
            "train.device": summary.device, "train.world_size": str(summary.world_size),
            "train.backend": summary.backend,
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
                version_tags = {**tracking.version_tags(run_tags), tracking.VAL_ACC_TAG: str(summary.best_val_acc)}
                version = log_model(result.model, result.raw, params, version_tags)
                origin = "trained here"
                if version is None:
                    origin = (f"logged in the run, not registered: account {tags.get(ACCOUNT_TAG, '?')!r} "
                              f"may not register {registered!r}; an admin grants it (docs/team.md)")
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
            client.delete_run(found.info.run_id)
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


def record_failed_training(store: Store, params: Params, outputs: list[Path], cause: str,
                           device_tags: dict[str, str]) -> str:
    """Record a failed training job as one FAILED run holding the cause; say where it went, or why it could not.

    The record stage writes the run of each result. A job of several processes can fail in any of them, on any
    machine: the process that launched it on this machine sees every failure, so it leaves this run, tagged with
    where the job trained (`device_tags`, as its live run would have been).
    """
    tags = {**run_tags(outputs), **device_tags, "failure": cause,
            "mlflow.note.content": f"Training failed: {cause}"}
    name = tags.get("dvc.exp_name", WORKSPACE_RUN_NAME)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a new store's INFO lines would bury the one-line error
    try:
        with tracking.store_errors(store, "the failure is not recorded"):
            experiment_id = tracking.configure(store, params.mlflow.experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
            try:
                mlflow.log_params(flatten(params))
            finally:
                mlflow.end_run("FAILED")
    except StoreError as err:
        return str(err)
    return f"MLflow run '{name}' ({run.info.run_id}) is marked FAILED"
