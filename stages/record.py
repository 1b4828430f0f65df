"""DVC stage record: one complete MLflow run for this result: params, curves, test metrics, figures, model."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric

import mnist_pipeline
from mnist_pipeline import tracking
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_write_text, sha256_file
from mnist_pipeline.machine import trained_on
from mnist_pipeline.params import Params, flatten, load_params
from mnist_pipeline.store import check_store, resolve_store

# DVC reruns this stage when the file is missing (a fresh clone); its content never changes, so dvc.lock doesn't.
MARKER_TEXT = "This workspace's result is recorded in MLflow. Delete this file to record it again.\n"
PACKAGE = Path(mnist_pipeline.__file__).parent
# The files the served model runs (mnist_pipeline/served_model.py imports the others), logged with its weights.
SERVED_CODE = ("__init__.py", "cpu_kernels.py", "digits.py", "model.py", "served_model.py")
RETRY = ("the trained model and reports are kept: fix the store, then rerun the same `dvc repro` or `dvc exp run`, "
         "which records this result without training")


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


def served_config(params: Params) -> dict[str, object]:
    """The served model's model_config (served_model.py reads it): digits prepared as its network trained on them."""
    return {"deskew": params.train.deskew}  # served_model.DESKEW; imported there with torch, so written out here


def served_code_sha256(config: dict[str, object]) -> str:
    """SHA-256 of the files the served model runs and its model_config: with the weights, what a version is."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in SERVED_CODE:
        digest.update(f"{name}\0".encode() + (PACKAGE / name).read_bytes() + b"\0")
    return digest.hexdigest()


def log_model(model_path: Path, raw: Path, params: Params, tags: dict[str, str]) -> str:
    """Log the served model (source, and weights loaded with weights_only=True: no pickle), register it; its version.

    The model reads pixel arrays and PNG/JPEG files as clients have them (mnist_pipeline/served_model.py). Its
    input is one list whose items are either, which only an object tensor can say in an MLflow signature.
    """
    import base64
    import io
    import tempfile
    from importlib.metadata import version as installed

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
    # The input example: the first test image as a PNG file, base64 as in a JSON request.
    png = io.BytesIO()
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
            registered_model_name=params.mlflow.registered_model,
        )
    version = str(info.registered_model_version)
    tracking.tag_model_version(params.mlflow.registered_model, version, tags)
    return version


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in (("raw", "folder of the MNIST IDX files (the model's input example)"),
                       ("model", "the best model's weights"), ("train-log", "train's periodic metrics (CSV)"),
                       ("summary", "train's summary (JSON)"), ("metrics", "evaluate's test metrics (JSON)"),
                       ("predictions", "evaluate's predictions (CSV)"), ("figures", "plot's folder of figures"),
                       ("marker", "written once the result is recorded"),
                       ("trained-on", "the training machine's tags, from train (JSON)")):
        parser.add_argument(f"--{name}", type=Path, required=True, help=what)
    args = parser.parse_args()
    params = load_params()
    store = resolve_store()
    check_store(store)
    summary = read_summary(args.summary)
    metrics = {**tracking.flat_metrics({"train": summary}), **tracking.flat_metrics(read_metrics(args.metrics))}
    curves = curve_metrics(args.train_log)
    model_sha256 = sha256_file(args.model)
    outputs = [args.train_log, args.summary, args.metrics, args.predictions, args.figures]
    tags = {
        **tracking.run_tags([args.raw, args.model, *outputs, args.marker]),
        **trained_on(args.trained_on, model_sha256),
        tracking.MODEL_TAG: model_sha256, tracking.CODE_TAG: served_code_sha256(served_config(params)),
        # Where it trained: results differ in their last bits between devices and world sizes.
        "train.device": summary["device"], "train.world_size": str(summary["world_size"]),
        "train.backend": str(summary.get("backend", "none")),
    }
    name = tags.get("dvc.exp_name", tracking.WORKSPACE_RUN_NAME)

    with tracking.store_errors(store, RETRY):
        experiment_id = tracking.configure(store, params.mlflow.experiment)
        with tracking.tracked_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
            tracking.retry_busy(mlflow.log_params, flatten(params))
            now = int(time.time() * 1000)
            tracking.log_metric_batch(run.info.run_id, [Metric(k, v, now, 0) for k, v in metrics.items()] + curves)
            for path in outputs[:-1]:
                mlflow.log_artifact(str(path), artifact_path="reports")
            mlflow.log_artifacts(str(args.figures), artifact_path="figures")
            registered = params.mlflow.registered_model
            existing = tracking.find_model_version(registered, model_sha256, tags[tracking.CODE_TAG])
            lost = existing is not None and not tracking.files_present(registered, existing.version)
            if existing is None or lost:
                version = log_model(args.model, args.raw, params, tags)
                origin = "trained here"
                # What the champion is chosen by: validation accuracy, never the test set's.
                tracking.retry_busy(mlflow.MlflowClient().set_model_version_tag, registered, version,
                                    tracking.VAL_ACC_TAG, str(summary["best_val_acc"]))
                if lost:  # once its replacement is in the champion's choice, out of it
                    tracking.retire_lost_version(registered, existing.version, version)
                    origin = f"logged again: version {existing.version}, the same model, has lost its files"
            else:
                version = existing.version
                origin = f"same model file as run {existing.run_id}"
                tracking.retry_busy(mlflow.set_tags, {"model.run_id": existing.run_id})
            tracking.retry_busy(mlflow.set_tags, {"model.version": f"{registered}/{version}"})
            champion = tracking.crown_champion(store, registered)
    atomic_write_text(args.marker, MARKER_TEXT)
    print(f"record: MLflow run '{name}' ({run.info.run_id}) in {store.uri}, model {registered} version {version} "
          f"({origin})")
    if champion is not None:
        print(f"record: {registered}@{tracking.CHAMPION} is now version {champion.version}, the best validation "
              f"accuracy ({champion.tags[tracking.VAL_ACC_TAG]})")

if __name__ == "__main__":
    run_stage(main)
