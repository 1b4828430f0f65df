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
RETRY = "the trained model and reports are kept: fix the store, then rerun the same `dvc repro` or `dvc exp run`, which records this result without training"


def curve_metrics(train_log: Path) -> list[Metric]:
    """The periodic training metrics at their iterations, under the training log's column names."""
    now = int(time.time() * 1000)
    with train_log.open(newline="") as file:
        rows = list(csv.DictReader(file))
    try:
        return [
            Metric(name, float(row[name]), now, int(row["iteration"]))
            for row in rows for name in ("train_acc", "train_loss", "val_acc")
        ]
    except (KeyError, ValueError) as err:
        raise PipelineError(f"{train_log}: expected columns iteration,train_acc,train_loss,val_acc ({err})") from None


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files (the model's input example)")
    parser.add_argument("model", type=Path, help="the best model's weights")
    parser.add_argument("outputs", type=Path, nargs="+", help="the pipeline's reports and figures folder to log")
    parser.add_argument("--marker", type=Path, required=True, help="written once the result is recorded")
    args = parser.parse_args()
    params = load_params()
    store = resolve_store()
    check_store(store)
    reports = {path.name: path for path in args.outputs}
    summary = json.loads(reports["train.json"].read_text())
    metrics = {**tracking.flat_metrics(summary), **tracking.flat_metrics(json.loads(reports["metrics.json"].read_text()))}
    curves = curve_metrics(reports["train_log.csv"])
    model_sha256 = sha256_file(args.model)
    tags = {
        **tracking.run_tags([args.raw, args.model, *args.outputs, args.marker]),
        tracking.MODEL_TAG: model_sha256,
        # Where it trained: results differ in their last bits between devices and world sizes.
        **{f"train.{key}": str(summary["train"][key]) for key in ("device", "world_size")},
    }
    name = tags.get("dvc.exp_name", tracking.WORKSPACE_RUN_NAME)

    with tracking.store_errors(store, RETRY):
        experiment_id = tracking.configure(store, params.mlflow.experiment)
        with tracking.tracked_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
            tracking.retry_busy(mlflow.log_params, flatten(params))
            now = int(time.time() * 1000)
            tracking.log_metric_batch(run.info.run_id, [Metric(k, v, now, 0) for k, v in metrics.items()] + curves)
            for path in args.outputs:
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=path.name)
                else:
                    mlflow.log_artifact(str(path), artifact_path="reports")
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
