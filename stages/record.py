"""DVC stage record: one complete MLflow run for this result: params, curves, test metrics, figures, model."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric

from mnist_pipeline import tracking
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_write_text, sha256_file
from mnist_pipeline.params import Params, flatten, load_params
from mnist_pipeline.store import check_store, resolve_store

# DVC reruns this stage when the file is missing (a fresh clone); its content never changes, so dvc.lock doesn't.
MARKER_TEXT = "This workspace's result is recorded in MLflow. Delete this file to record it again.\n"
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


def log_model(model_path: Path, raw: Path, params: Params, tags: dict[str, str]) -> str:
    """Log the model in the pt2 format (no pickle) and register it; return its version."""
    import torch  # only when a new model is logged: a plot-only result skips the 1.5 s import
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from mnist_pipeline.data import load_mnist
    from mnist_pipeline.model import Net
    from mnist_pipeline.training import load_state_dict, to_tensor

    model = Net()
    load_state_dict(model_path, model)
    model.eval()
    example = to_tensor(load_mnist(raw, "t10k")[0][:2]).numpy()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(example.dtype, (-1, 10))]),
    )
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    info = tracking.retry_busy(
        mlflow.pytorch.log_model, model, name="model", signature=signature, input_example=example,
        serialization_format="pt2", pip_requirements=requirements,
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
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = f"{type(err).__name__}: {err}"
        raise PipelineError(f"{path}: expected train.device and train.world_size ({why})") from None
    return {**summary, "device": device, "world_size": world_size}


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
                       ("marker", "written once the result is recorded")):
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
        tracking.MODEL_TAG: model_sha256,
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
            existing = tracking.find_model_version(registered, model_sha256)
            if existing is None:
                version = log_model(args.model, args.raw, params, tags)
                origin = "trained here"
            else:
                version = existing.version
                origin = f"same model file as run {existing.run_id}"
                tracking.retry_busy(mlflow.set_tags, {"model.run_id": existing.run_id})
            tracking.retry_busy(mlflow.set_tags, {"model.version": f"{registered}/{version}"})
    atomic_write_text(args.marker, MARKER_TEXT)
    print(f"record: MLflow run '{name}' ({run.info.run_id}) in {store.uri}, model {registered} version {version} "
          f"({origin})")

if __name__ == "__main__":
    run_stage(main)
