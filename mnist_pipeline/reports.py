"""The files the stages hand each other, each format's writer and reader side by side: its schema and checks."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from mnist_pipeline.data import NUM_CLASSES
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import atomic_write_bytes, atomic_write_json, atomic_write_text

# The split stage's folder holds one .npy file of indices into the training images per part.
SPLIT_PARTS = ("train", "val")
PREDICTIONS_HEADER = "index,actual,predicted"


# Split indices: split writes them, train reads them.

def write_split(folder: Path, train: np.ndarray, val: np.ndarray) -> None:
    """Save each part's indices as <part>.npy atomically (the format holds no timestamp: equal arrays, equal bytes)."""
    for part, indices in zip(SPLIT_PARTS, (train, val)):
        buffer = io.BytesIO()
        np.save(buffer, indices)
        atomic_write_bytes(folder / f"{part}.npy", buffer.getvalue())


def read_split(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and validation indices (int64), each checked to be 1-D integers in range(n)."""
    parts = []
    for part in SPLIT_PARTS:
        path = folder / f"{part}.npy"
        try:
            indices = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise PipelineError(f"{path}: cannot be read as a .npy array of indices ({err})") from None
        in_range = indices.size == 0 or 0 <= indices.min() <= indices.max() < n
        if indices.ndim != 1 or indices.dtype.kind not in "iu" or not in_range:
            raise PipelineError(
                f"{path}: expected 1-D integer indices in [0, {n}), got {indices.dtype} {indices.shape}")
        parts.append(indices.astype(np.int64))
    return parts[0], parts[1]


def train_split_size(folder: Path) -> int | None:
    """How many training indices the split holds, without reading them; None when the file cannot be read (its
    reader says why)."""
    try:
        return len(np.load(folder / f"{SPLIT_PARTS[0]}.npy", mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError, TypeError):
        return None


# The train log: train writes it; record logs it as curves, `dvc plots` draws it.

@dataclass(frozen=True)
class LogRow:
    """One report of the training loop, every `log_every` iterations and at the last one: a row of the log."""

    iteration: int
    epoch: int
    train_acc: float
    train_loss: float
    val_acc: float


LOG_COLUMNS = tuple(field.name for field in fields(LogRow))


def write_train_log(path: Path, rows: list[LogRow]) -> None:
    """The periodic metrics as CSV, the training curves of `dvc plots`."""
    lines = [",".join(LOG_COLUMNS)]
    lines += [f"{r.iteration},{r.epoch},{r.train_acc:.6f},{r.train_loss:.6f},{r.val_acc:.6f}" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_train_log(path: Path) -> list[LogRow]:
    """train's log, row by row, checked against its columns."""
    try:
        with path.open(newline="") as file:
            reader = csv.reader(file)
            header = tuple(next(reader, ()))
            if header != LOG_COLUMNS:
                raise ValueError(f"header {','.join(header)!r}")
            return [LogRow(int(row[0]), int(row[1]), float(row[2]), float(row[3]), float(row[4])) for row in reader]
    except (OSError, ValueError, IndexError) as err:
        why = f"{type(err).__name__}: {err}"
        raise PipelineError(f"{path}: expected a CSV with the columns {','.join(LOG_COLUMNS)} ({why})") from None


# train's summary: train writes it; record reads it for the run's tags and metrics, `dvc metrics` shows it.

@dataclass(frozen=True)
class TrainSummary:
    """The best validation accuracy, where it was reached, and where the model trained."""

    best_val_acc: float
    best_iteration: int
    device: str
    world_size: int
    backend: str = "none"


def write_summary(path: Path, summary: TrainSummary) -> None:
    """train's summary as JSON under "train", the accuracy to 6 decimals."""
    atomic_write_json(path, {"train": {**asdict(summary), "best_val_acc": round(summary.best_val_acc, 6)}})


def read_summary(path: Path) -> TrainSummary:
    """train's summary, checked for what the run's tags and metrics need."""
    try:
        summary = json.loads(path.read_text())["train"]
        return TrainSummary(float(summary["best_val_acc"]), int(summary["best_iteration"]), str(summary["device"]),
                            int(summary["world_size"]), str(summary.get("backend", "none")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = f"{type(err).__name__}: {err}"
        raise PipelineError(f"{path}: expected train.best_val_acc, train.best_iteration, train.device and "
                            f"train.world_size ({why})") from None


# The test metrics: evaluate writes them; record reads them, `dvc metrics` shows them.

def write_metrics(path: Path, test: dict[str, object]) -> None:
    """evaluate's metrics as JSON under "test"."""
    atomic_write_json(path, {"test": test})


def read_metrics(path: Path) -> dict[str, object]:
    """evaluate's test metrics (the "test" section), which must hold the accuracy."""
    try:
        test = json.loads(path.read_text())["test"]
        float(test["accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"{path}: expected evaluate's test metrics ({type(err).__name__}: {err})") from None
    return test


# The predictions: evaluate writes them; plot draws them, `dvc plots` makes the confusion matrix of them.

def write_predictions(path: Path, labels: np.ndarray, predicted: np.ndarray) -> None:
    """One row per test image: its index, label and prediction."""
    rows = [f"{i},{a},{p}" for i, (a, p) in enumerate(zip(labels.tolist(), predicted.tolist()))]
    atomic_write_text(path, f"{PREDICTIONS_HEADER}\n" + "\n".join(rows) + "\n")


def read_predictions(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions from evaluate's CSV, checked against the test set's size."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: expected rows {PREDICTIONS_HEADER} ({type(err).__name__}: {err})") from None
    if table.shape != (n, 3) or not np.array_equal(table[:, 0], np.arange(n)):
        raise PipelineError(f"{path}: expected rows {PREDICTIONS_HEADER} for {n} test images, got shape {table.shape}")
    if table[:, 1:].min() < 0 or table[:, 1:].max() >= NUM_CLASSES:
        raise PipelineError(f"{path}: labels and predictions must be 0-{NUM_CLASSES - 1}")
    return table[:, 1], table[:, 2]
