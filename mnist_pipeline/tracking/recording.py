"""One MLflow run per DVC result: writing that run, completing a run a killed record left, and a failed training's run.

A result is what made it and what it is: the params, the data, the served code and the outputs' bytes. Its
key (tracking/result.py) is the same on every machine and in every clone, so a result recorded once (by a teammate,
by an experiment, before the marker was deleted) is found (tracking/recorded.py) and not recorded again. Every step
of record can be killed: its run carries the result's key and a heartbeat from its first write, and the next record
completes that run, each step done once (the model logged, its version registered, the champion crowned, the
metrics and files logged). A training that failed gets its own run here too (record_failed_training).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mnist_pipeline import served_package
from mnist_pipeline.files import sha256_file
from mnist_pipeline.machine import trained_on
from mnist_pipeline.params import Params, flatten
from mnist_pipeline.reports import read_metrics, read_summary, read_train_log
from mnist_pipeline.tracking import mlflow_store, registry, tag
from mnist_pipeline.tracking.heartbeat import beat, dead_because, end_dead_runs
from mnist_pipeline.tracking.recorded import StoredRun, awaits_record, mlflow_runs, recorded_run
from mnist_pipeline.tracking.result import Result, names_entry, run_name, run_tags
from mnist_pipeline.tracking.store import Store, StoreError

# MLflow's limits for one log_batch request.
BATCH_ENTRIES, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100


def curve_metrics(train_log: Path, timestamp: int, logged: set[int]) -> list[Metric]:
    """Every column of the training log but the counters, each value at its iteration, but the iterations `logged`.

    One timestamp for all, the run's start: a completed record's metrics, logged again, are the same rows.
    """
    return [Metric(name, value, timestamp, row.iteration) for row in read_train_log(train_log)
            if row.iteration not in logged for name, value in asdict(row).items() if name not in ("iteration", "epoch")]


def unfinished_run(runs_: list[StoredRun], key: str, live_run_id: str | None) -> StoredRun | None:
    """The run this record completes rather than making one: the run that watched this training (named by train's
    machine file), or a run of this result that a killed or failed record left (it carries the key); None: a new run.
    """
    live = next((r for r in runs_ if r.run_id == live_run_id and awaits_record(r)
                 and r.tags.get(tag.RESULT_KEY, key) == key), None)
    if live is not None:
        return live
    left = [r for r in runs_ if r.tags.get(tag.RESULT_KEY) == key and r.status != "FINISHED"
            and (r.status != "RUNNING" or dead_because(r.tags, r.start_time) is not None)]
    return min(left, key=lambda r: r.start_time, default=None)


def mark_repeat(client: mlflow.MlflowClient, run_id: str, found_id: str, found_name: str) -> str:
    """End the run that watched a training whose result was recorded before: KILLED, `training: repeat` and
    `repeat_of` the result's run, so that nobody takes it for a second result; the line that says so. Nothing is
    deleted: on a team server deleting a run takes the admin, and a teammate's record must complete with EDIT alone.
    """
    note = (f"This training made the bytes of a result recorded before, in run {found_id} ('{found_name}'): that "
            "run is the result's; this one keeps the curves of the repeat.")
    client.log_batch(run_id, tags=[RunTag(tag.TRAINING, tag.REPEAT), RunTag(tag.REPEAT_OF, found_id),
                                   RunTag(tag.NOTE, note)])
    client.set_terminated(run_id, "KILLED")
    return (f"run {run_id}, which watched this training, ended KILLED as a repeat of run {found_id} (the same "
            "bytes: one run per result)")


def logged_model(run_id: str, experiment_id: str, version_tags: dict[str, str]) -> str | None:
    """The id of the model this run logged already, whole (a killed record's), with these model and code hashes."""
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    keys = (tag.MODEL_SHA256, tag.SERVED_CODE_SHA256)
    return next((m.model_id for m in models if m.status == LoggedModelStatus.READY
                 and all(m.tags.get(k) == version_tags.get(k) for k in keys)), None)


def log_model(model_path: Path, raw: Path, params: Params, version_tags: dict[str, str]) -> str:
    """Log the served model as mnist_pipeline/served_package.py packages it (source, and weights loaded with
    weights_only=True: no pickle); its id. Logged before any metric of the run, so MLflow has none to copy onto it."""
    with served_package.packaged(model_path, raw, params) as package:
        return mlflow.pyfunc.log_model(name="model", tags=version_tags, **package).model_id


def register(name: str, model_id: str, run_id: str, tags: dict[str, str]) -> str | None:
    """Register a logged model as a new version of `name`, its tags in the same call; None where this account may
    not register (a team server grants it per account: see team_server add-user --can-register)."""
    client = mlflow.MlflowClient()
    try:
        registry.ensure_registered_model(client, name)
        version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags,
                                              model_id=model_id)
    except MlflowException as err:
        if err.error_code == "PERMISSION_DENIED":
            return None
        raise
    link_logged_model(name, str(version.version), model_id)
    return str(version.version)


def link_logged_model(name: str, version: str, model_id: str) -> None:
    """What MLflow's own registration adds: the UI links the logged model to its version by this tag."""
    mlflow.MlflowClient().set_logged_model_tags(
        model_id, {tag.LOGGED_MODEL_VERSIONS: json.dumps([{"name": name, "version": version}])})


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


def record(result: Result, params: Params, store: Store, tags: dict[str, str], retry: str, key: str,
           live_run_id: str | None) -> list[str]:
    """Record `result`, whose key is `key`, in `store` unless it is there already; the lines to print.

    `live_run_id`: the run that watched this model's training (train's machine file names it), if any.
    """
    summary = read_summary(result.summary)
    metrics = {**mlflow_store.flat_metrics({"train": asdict(summary)}),
               **mlflow_store.flat_metrics({"test": read_metrics(result.metrics)})}
    code_sha256 = served_package.served_code_sha256(served_package.served_config(params))
    model_sha256 = sha256_file(result.model)
    entry = names_entry(tags)
    registered = params.mlflow.registered_model
    # The stage's output is its lines: not MLflow's INFO lines (a new store's tables, the input example's check) nor
    # its bar for the model it loads back to check that example; its warnings stay.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    with mlflow_store.store_errors(store, retry):
        experiment_id = mlflow_store.configure(store, params.mlflow.experiment)
        client = mlflow.MlflowClient()
        stored = mlflow_runs(experiment_id, key, (live_run_id,) if live_run_id else ())
        found = recorded_run(stored, key)
        mine = unfinished_run(stored, key, live_run_id)
        lines = [f"record: {line}" for line in end_dead_runs(experiment_id, keep=(mine.run_id,) if mine else ())]
        if found is not None:
            names = found.tags.get(tag.NAMES, "").splitlines()
            if entry not in names:
                client.set_tag(found.run_id, tag.NAMES, "\n".join([*names, entry]))
            lines.append(f"record: already recorded as run '{found.name}' ({found.run_id}) in {store.uri}")
            if mine is not None and mine.run_id != found.run_id and tag.TRAINING in mine.tags:  # a repeat's
                lines.append(f"record: {mark_repeat(client, mine.run_id, found.run_id, found.name)}")
            return lines
        replaced = [r for r in stored if r.tags.get(tag.RESULT_KEY) == key and r.status == "FINISHED"]
        run_tags = {
            **tags, **trained_on(result.trained_on, model_sha256), tag.RESULT_KEY: key, tag.NAMES: entry,
            tag.MODEL_SHA256: model_sha256, tag.SERVED_CODE_SHA256: code_sha256, tag.HEARTBEAT: beat(),
            # Where it trained: results differ in their last bits between devices and world sizes.
            tag.TRAIN_DEVICE: summary.device, tag.TRAIN_WORLD_SIZE: str(summary.world_size),
            tag.TRAIN_BACKEND: summary.backend,
        }
        # The run that watched the training, or the one a killed record left, completed; else a new one (a result
        # restored from DVC's run-cache). Its first write makes it this result's: the key and this process's beat.
        start = {"run_id": mine.run_id} if mine else {"experiment_id": experiment_id, "run_name": run_name(tags),
                                                      "tags": run_tags}
        with mlflow_store.tracked_run(**start) as run:
            run_id = run.info.run_id
            if mine:
                _batches(run_id, {}, run_tags, [])
            version, origin, more_tags = _model_version(run_id, experiment_id, result, params, run_tags,
                                                        str(summary.best_val_acc))
            # Every record crowns: a version registered by a killed record has no champion move behind it yet.
            champion = registry.crown_champion(registered) if version is not None else None
            if version is not None:
                more_tags[tag.MODEL_VERSION] = f"{registered}/{version}"
            timestamp = run.info.start_time
            logged = {m.step for m in client.get_metric_history(run_id, "val_acc")}
            test_metrics = [Metric(k, v, timestamp, 0) for k, v in metrics.items()]
            _batches(run_id, flatten(params), more_tags,
                     test_metrics + curve_metrics(result.train_log, timestamp, logged))
            _log_files(result)
        for old in replaced:  # runs of this result whose model cannot load any more: this one replaces them
            client.log_batch(old.run_id, tags=[RunTag(tag.REPLACED_BY, run_id), RunTag(tag.NOTE, (
                f"Replaced by run {run_id}: this run's registered model lost its files.")), RunTag(
                tag.REPLACED_RESULT_KEY, key)])
            client.delete_tag(old.run_id, tag.RESULT_KEY)
    name = run.info.run_name
    model = f"model {registered} version {version}" if version is not None else "model"
    lines.append(f"record: MLflow run '{name}' ({run_id}) in {store.uri}, {model} ({origin})")
    for old in replaced:
        lines.append(f"record: run {old.run_id} of the same result lost its model files: tagged "
                     f"{tag.REPLACED_BY}={run_id}, no longer this result's run")
    if champion is not None:
        lines.append(f"record: {registered}@{registry.CHAMPION} is now version {champion.version}, the best "
                     f"validation accuracy ({champion.tags[tag.VAL_ACC]})")
    return lines


def _model_version(run_id: str, experiment_id: str, result: Result, params: Params, run_tags: dict[str, str],
                   val_acc: str) -> tuple[str | None, str, dict[str, str]]:
    """The registered version of this result's model: found, or logged (once per run) and registered; how, in words;
    the run's tags that say so."""
    registered = params.mlflow.registered_model
    # What the champion is chosen by: validation accuracy, never the test set's.
    version_tags = {**registry.version_tags(run_tags), tag.VAL_ACC: val_acc}
    existing = registry.find_model_version(registered, run_tags[tag.MODEL_SHA256], run_tags[tag.SERVED_CODE_SHA256])
    lost = existing is not None and not registry.files_present(registered, existing.version)
    if existing is not None and not lost:
        if existing.run_id == run_id:  # a killed record of this run registered it, perhaps not linked yet
            model_id = logged_model(run_id, experiment_id, version_tags)
            if model_id:
                link_logged_model(registered, existing.version, model_id)
            return existing.version, "trained here", {}
        return existing.version, f"same model file as run {existing.run_id}", {tag.MODEL_RUN_ID: existing.run_id}
    model_id = logged_model(run_id, experiment_id, version_tags) or log_model(result.model, result.raw, params,
                                                                              version_tags)
    version = register(registered, model_id, run_id, version_tags)
    if version is None:
        return None, (f"logged in the run, not registered: account {run_tags.get(tag.ACCOUNT, '?')!r} may not "
                      f"register {registered!r}; an admin grants it (docs/team.md)"), {}
    if lost:  # once its replacement is in the champion's choice, out of it
        registry.retire_lost_version(registered, existing.version, version)
        return version, f"logged again: version {existing.version}, the same model, has lost its files", {}
    return version, "trained here", {}


def record_failed_training(store: Store, params: Params, outputs: list[Path], cause: str,
                           device_tags: dict[str, str]) -> str:
    """Record a failed training job as one FAILED run holding the cause; say where it went, or why it could not.

    The record stage writes the run of each result. A job of several processes can fail in any of them, on any
    machine: the process that launched it on this machine sees every failure, so it leaves this run, tagged with
    where the job trained (`device_tags`, as its live run would have been).
    """
    tags = {**run_tags(outputs), **device_tags, tag.FAILURE: cause, tag.NOTE: f"Training failed: {cause}"}
    name = run_name(tags)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a new store's INFO lines would bury the one-line error
    try:
        with mlflow_store.store_errors(store, "the failure is not recorded"):
            experiment_id = mlflow_store.configure(store, params.mlflow.experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
            try:
                mlflow.log_params(flatten(params))
            finally:
                mlflow.end_run("FAILED")
    except StoreError as err:
        return str(err)
    return f"MLflow run '{name}' ({run.info.run_id}) is marked FAILED"
