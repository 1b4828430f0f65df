"""The files the stages hand each other: what each writer writes, its reader reads back; a broken file is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline import reports
from mnist_pipeline.errors import PipelineError


def test_each_format_reads_back_what_was_written(tmp_path: Path) -> None:
    reports.write_split(tmp_path, np.array([0, 2, 3]), np.array([1, 4]))
    train, val = reports.read_split(tmp_path, 5)
    assert (train.tolist(), val.tolist(), train.dtype) == ([0, 2, 3], [1, 4], np.int64)
    assert reports.train_split_size(tmp_path) == 3
    rows = [reports.LogRow(4, 0, 0.5, 1.25, 0.75), reports.LogRow(8, 1, 0.875, 0.5, 1.0)]
    reports.write_train_log(tmp_path / "log.csv", rows)
    assert reports.read_train_log(tmp_path / "log.csv") == rows
    summary = reports.TrainSummary(0.9876543, 8, "cpu", 2, "gloo")
    reports.write_summary(tmp_path / "train.json", summary)
    assert reports.read_summary(tmp_path / "train.json") == reports.TrainSummary(0.987654, 8, "cpu", 2, "gloo")
    reports.write_metrics(tmp_path / "metrics.json", {"accuracy": 0.5, "loss": 1.0})
    assert reports.read_metrics(tmp_path / "metrics.json") == {"accuracy": 0.5, "loss": 1.0}
    labels, predicted = np.array([7, 2, 1]), np.array([7, 3, 1])
    reports.write_predictions(tmp_path / "predictions.csv", labels, predicted)
    back = reports.read_predictions(tmp_path / "predictions.csv", 3)
    assert [a.tolist() for a in back] == [[7, 2, 1], [7, 3, 1]]


@pytest.mark.parametrize(("name", "content", "read", "words"), [
    ("train.npy", b"not numpy", lambda p: reports.read_split(p.parent, 5), "cannot be read as a .npy array"),
    ("log.csv", "iteration,epoch,val_acc\n4,0,0.5\n", reports.read_train_log, "expected a CSV with the columns"),
    ("train.json", '{"train": {"device": "cpu"}}', reports.read_summary, "expected train.best_val_acc"),
    ("metrics.json", '{"train": {}}', reports.read_metrics, "expected evaluate's test metrics"),
    ("predictions.csv", "index,actual,predicted\n0,7,12\n", lambda p: reports.read_predictions(p, 1),
     "labels and predictions must be 0-9"),
])
def test_a_broken_file_is_one_line_naming_it(tmp_path: Path, name: str, content: str | bytes, read, words: str) -> None:
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(PipelineError, match=words) as info:
        read(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_split_indices_out_of_range_are_refused(tmp_path: Path) -> None:
    reports.write_split(tmp_path, np.array([0, 5]), np.array([1]))
    with pytest.raises(PipelineError, match=r"train.npy: expected 1-D integer indices in \[0, 5\)"):
        reports.read_split(tmp_path, 5)
