"""End to end: the real `dvc repro` on the real MNIST data, in a temporary git repo made from this project."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from mnist_pipeline.data import load_mnist
from tests.conftest import copy_project, dvc, needs_pinnable_cpu

@pytest.mark.slow
@needs_pinnable_cpu
def test_dvc_repro_on_real_data_reproduces_the_committed_results(tmp_path: Path, real_mnist: Path) -> None:
    clone = copy_project(tmp_path / "clone")
    assert (clone / "dvc.lock").exists(), "dvc.lock must be committed from a real run"
    dvc(clone, "repro", MNIST_MIRROR=str(real_mnist))

    # Same params and data give the same bytes: the committed lock file and reports are unchanged.
    diff = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock", "reports"], cwd=clone,
                          capture_output=True, text=True, check=True)
    assert diff.stdout == "", f"dvc repro changed committed files:\n{diff.stdout}"

    metrics = json.loads((clone / "reports/metrics.json").read_text())["test"]
    assert metrics["accuracy"] >= 0.992
    assert abs(metrics["cross_entropy_manual"] - metrics["loss"]) <= 1e-5
    for name in ("predictions.png", "misclassified.png", "confusion_matrix.png"):
        assert (clone / "reports/figures" / name).stat().st_size > 10_000

    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist")
    assert experiment.artifact_location == (clone / "mlartifacts").as_uri()
    (run,) = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "workspace" and run.data.tags["git.dirty"] == "false"
    assert run.data.metrics["test.accuracy"] == metrics["accuracy"]
    assert run.data.tags["mlflow.source.git.commit"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()
    client = mlflow.MlflowClient()
    params = yaml.safe_load((clone / "params.yaml").read_text())["train"]
    total = -(-42_000 // params["batch_size"]) * params["epochs"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert steps == [*range(params["log_every"], total, params["log_every"]), total]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {
        "figures/predictions.png", "figures/misclassified.png", "figures/confusion_matrix.png"}
    (version,) = client.search_model_versions("name = 'mnist-cnn'")
    assert version.run_id == run.info.run_id and run.data.tags["model.version"] == f"mnist-cnn/{version.version}"
    # docs/serving.md serves the champion: it reads the 10,000 test images as uint8 arrays with the committed accuracy.
    assert client.get_model_version_by_alias("mnist-cnn", "champion").version == version.version
    images, labels = load_mnist(clone / "data/raw", "t10k")
    answer = mlflow.pyfunc.load_model("models:/mnist-cnn@champion").predict(images)
    assert (answer["digit"].to_numpy() == labels).mean() == pytest.approx(metrics["accuracy"], abs=1e-9)

    again = dvc(clone, "repro")
    assert "Data and pipelines are up to date." in again.stdout
