"""Smoke runs of every stage's main() on tiny generated IDX files, MLflow's store in a temporary folder.

The stages run once per test session (conftest's `built_pipeline`); each test here gets its own copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mnist_pipeline.data import MnistFile, load_mnist
from mnist_pipeline.files import sha256_file
from mnist_pipeline.tracking import mlflow_store, tag
from mnist_pipeline.tracking.store import resolve_store
from tests.conftest import get_json, idx_bytes, mlflow_server, run_pipeline, tiny_arrays


def test_stage_outputs(pipeline: Path) -> None:
    for name, array in tiny_arrays().items():
        assert (pipeline / "data/raw" / name).read_bytes() == idx_bytes(array)
    train_idx, val_idx = np.load("data/split/train.npy"), np.load("data/split/val.npy")
    assert (len(train_idx), len(val_idx)) == (168, 72)
    assert sorted(np.concatenate([train_idx, val_idx])) == list(range(240))

    log = Path("reports/train_log.csv").read_text().splitlines()
    assert log[0] == "iteration,epoch,train_acc,train_loss,val_acc"
    # 168 images in batches of 32: 6 iterations an epoch, 12 in all, reported every 4 and at the end.
    assert [int(row.split(",")[0]) for row in log[1:]] == [4, 8, 12]

    metrics = json.loads(Path("reports/metrics.json").read_text())["test"]
    assert 0 <= metrics["accuracy"] <= 1
    assert abs(metrics["cross_entropy_manual"] - metrics["loss"]) <= 1e-5
    assert sorted(metrics["per_class_accuracy"]) == [str(c) for c in range(10)]
    predictions = Path("reports/predictions.csv").read_text().splitlines()
    assert predictions[0] == "index,actual,predicted" and len(predictions) == 61
    hits = sum(row.split(",")[1] == row.split(",")[2] for row in predictions[1:])
    assert hits / 60 == pytest.approx(metrics["accuracy"], abs=1e-6)
    for name in ("predictions.png", "misclassified.png", "confusion_matrix.png"):
        assert Path("reports/figures", name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_mlflow_run_holds_training_evaluation_and_figures(pipeline: Path) -> None:
    experiment_id = mlflow_store.configure(resolve_store(), "mnist")
    assert mlflow.get_tracking_uri() == f"sqlite:///{pipeline / 'mlflow.db'}"
    runs = mlflow.search_runs([experiment_id], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[tag.MODEL_SHA256] == sha256_file("models/model.pt")
    assert run.data.params["train.batch_size"] == "32" and run.data.params["seed"] == "42"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [4, 8, 12]
    metrics = json.loads(Path("reports/metrics.json").read_text())["test"]
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["accuracy"])
    summary = json.loads(Path("reports/train.json").read_text())["train"]
    assert run.data.metrics["train.best_val_acc"] == summary["best_val_acc"]
    assert run.data.tags["train.device"] == "cpu" and run.data.metrics["train.world_size"] == 1
    assert run.info.run_name == "workspace"
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "reports")} == {
        "reports/train_log.csv", "reports/train.json", "reports/metrics.json", "reports/predictions.csv"}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/predictions.png", "figures/misclassified.png", "figures/confusion_matrix.png"}
    assert run.info.artifact_uri.startswith((pipeline / "mlartifacts").as_uri())
    # The served model reads the test images as they are and predicts what evaluate did.
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    answer = model.predict(load_mnist(Path("data/raw"), "t10k")[0])
    evaluated = [int(row.split(",")[2]) for row in Path("reports/predictions.csv").read_text().splitlines()[1:]]
    assert answer["digit"].tolist() == evaluated
    assert np.allclose(np.stack(answer["probabilities"]).sum(1), 1)


@pytest.mark.slow  # starting `mlflow server` alone takes about half a minute
def test_tracking_uri_sends_everything_to_a_running_server(
    workdir: Path, tiny_mnist: tuple[Path, tuple[MnistFile, ...]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with mlflow_server(tmp_path) as base:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        run_pipeline(*tiny_mnist, monkeypatch)
        api = f"{base}/api/2.0/mlflow"
        experiment = get_json(f"{api}/experiments/get-by-name?experiment_name=mnist")["experiment"]
        (run,) = get_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"val_acc", "test.accuracy"} <= metrics
        files = get_json(f"{api}/artifacts/list?run_id={run['info']['run_id']}&path=figures")["files"]
        assert len(files) == 3
    # Nothing went to the local default store, and the artifacts went through the server.
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()
    assert len(list((tmp_path / "server-artifacts").rglob("*.png"))) == 3
