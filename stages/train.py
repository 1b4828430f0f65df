"""DVC stage train: train the seed's CNN, keep the best model by validation accuracy, record it in MLflow."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from tqdm import tqdm

from mnist_pipeline import tracking
from mnist_pipeline.data import load_mnist
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from mnist_pipeline.model import Net
from mnist_pipeline.params import flatten, load_params
from mnist_pipeline.training import (
    LogRow, make_deterministic, select_device, state_dict_bytes, to_tensor, train,
)

PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def load_indices(split_dir: Path, name: str, n: int) -> torch.Tensor:
    """Indices from the split stage, checked to lie in range(n)."""
    path = split_dir / f"{name}.npy"
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: cannot be read as a .npy array of indices ({err})") from None
    in_range = indices.size == 0 or 0 <= indices.min() <= indices.max() < n
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or not in_range:
        raise PipelineError(f"{path}: expected 1-D integer indices in [0, {n}), got {indices.dtype} {indices.shape}")
    return torch.from_numpy(indices.astype(np.int64))


def log_csv(rows: list[LogRow]) -> str:
    """The periodic metrics as CSV, the training curves of `dvc plots`."""
    lines = ["iteration,epoch,train_acc,train_loss,val_acc"]
    lines += [f"{r.iteration},{r.epoch},{r.train_acc:.6f},{r.train_loss:.6f},{r.val_acc:.6f}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("split", type=Path, help="folder of train.npy and val.npy")
    parser.add_argument("model", type=Path, help="where the best model's weights go")
    parser.add_argument("log", type=Path, help="CSV of the periodic training metrics")
    parser.add_argument("summary", type=Path, help="JSON of the best validation accuracy")
    args = parser.parse_args()
    params = load_params()
    p = params.train
    device = select_device(p.device)
    make_deterministic(params.seed, p.num_threads)
    experiment_id = tracking.configure(params.mlflow.experiment)  # fails fast if the store is unreachable
    images, labels = load_mnist(args.raw, "train")
    train_idx = load_indices(args.split, "train", len(labels))
    val_idx = load_indices(args.split, "val", len(labels))
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    model = Net().to(device)

    tags = tracking.run_tags()
    with tracking.tracked_run(experiment_id=experiment_id, run_name=tags.get("dvc.exp_name"), tags=tags) as run:
        tracking.retry_busy(mlflow.log_params, flatten(params))
        progress = tqdm(total=p.epochs * -(-len(train_idx) // p.batch_size), desc="train", unit="it", disable=None)

        def report(row: LogRow, improved: bool) -> None:
            if improved:
                progress.write("Updated the best model!")
            progress.write(
                f"Epoch {row.epoch}, Iteration {row.iteration} statistics:\n"
                f"Train acc: {100 * row.train_acc:.3f}\nTrain loss: {row.train_loss:.5f}\n"
                f"Val acc: {100 * row.val_acc:.3f}\n"
            )
            tracking.log_metrics_at(run.info.run_id, row.iteration, row.metrics())

        start = time.perf_counter()
        result = train(
            model, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), p, params.seed,
            on_log=report, on_step=progress.update,
        )
        seconds = time.perf_counter() - start
        progress.close()
        print(f"End of the training loop! {seconds:.1f} s, best val acc {100 * result.best_val_acc:.3f}% "
              f"at iteration {result.best_iteration}")

        weights = state_dict_bytes(result.best_state)
        atomic_write_bytes(args.model, weights)
        atomic_write_text(args.log, log_csv(result.log))
        atomic_write_json(args.summary, {"train": {
            "best_val_acc": round(result.best_val_acc, 6), "best_iteration": result.best_iteration,
        }})
        model.load_state_dict(result.best_state)
        model.cpu().to(memory_format=torch.contiguous_format).eval()  # export plain-layout weights
        example = x[val_idx[:2]].numpy()
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
        )
        tracking.retry_busy(mlflow.log_metrics, {"best_val_acc": result.best_val_acc, "train_seconds": seconds})
        tracking.retry_busy(mlflow.set_tag, tracking.MODEL_TAG, hashlib.sha256(weights).hexdigest())
        info = tracking.retry_busy(
            mlflow.pytorch.log_model, model, name="model", signature=signature, input_example=example,
            serialization_format="pt2", pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=params.mlflow.registered_model,
        )
        tracking.tag_model_version(params.mlflow.registered_model, info.registered_model_version, tags)
        reused = tracking.log_recorded_results(args.model)
        if reused:
            print(f"mlflow: logged {', '.join(reused)}: dvc.lock records them for this same model")


if __name__ == "__main__":
    run_stage(main)
