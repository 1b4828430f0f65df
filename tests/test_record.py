"""One result, one MLflow run: the record stage, and store failures before and after training."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import LoggedModelStatus

from mnist_pipeline.data import load_mnist
from mnist_pipeline.errors import run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.served_package import served_config
from mnist_pipeline.tracking import live_run
from mnist_pipeline.tracking.store import resolve_store
from stages import plot, record, train
from tests.conftest import REPO, pipeline_commands, project_env
from tests.test_faults import snapshot

MARKER = Path(pipeline_commands()["record"][-1])


@pytest.fixture
def done(pipeline: Path) -> Path:
    """This test's copy of a working folder where the whole pipeline ran on the tiny data."""
    return pipeline


def runs() -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(resolve_store().uri)
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              order_by=["attributes.start_time ASC"])


def record_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["record", *pipeline_commands()["record"]])
    run_stage(record.main)


def test_a_plot_only_change_is_its_own_run_and_points_at_the_models_version(done: Path, monkeypatch) -> None:
    """Train and evaluate skipped, plot rerun with another param: a run of its own, pointing at the model."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["plot"]["n_images"] = 4
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(sys, "argv", ["plot", *pipeline_commands()["plot"]])
    plot.main()
    # The stage as DVC runs it: MLflow to write the run, and no torch, since no model is logged (docs/performance.md)
    command = [sys.executable, "-X", "importtime", "-m", "stages.record", *pipeline_commands()["record"]]
    stage = subprocess.run(command, cwd=done, capture_output=True, text=True,
                           env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(done)))
    assert stage.returncode == 0, stage.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in stage.stderr.splitlines()
                if line.startswith("import time:")}
    assert "mlflow" in imported and "torch" not in imported
    first, second = runs()
    assert second.data.tags["model_sha256"] == first.data.tags["model_sha256"]
    assert second.data.tags["model.version"] == first.data.tags["model.version"] == "mnist-cnn/1"
    assert second.data.tags["model.run_id"] == first.info.run_id
    assert "model.run_id" not in first.data.tags
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-cnn'")) == 1
    assert second.data.metrics == first.data.metrics
    assert (first.data.params["plot.n_images"], second.data.params["plot.n_images"]) == ("9", "4")
    assert first.info.status == second.info.status == "FINISHED"


def test_a_corrupt_store_stops_train_before_training(done: Path, monkeypatch, capsys) -> None:
    before = snapshot(done)
    (done / "mlflow.db").write_bytes(b"garbage" * 1000)
    monkeypatch.setattr(sys, "argv", ["train", *pipeline_commands()["train"]])
    with pytest.raises(SystemExit) as info:
        run_stage(train.main)
    message = str(info.value.code)
    assert message.startswith(f"error: MLflow store {done / 'mlflow.db'}: file is not a database") and "move" in message
    assert "\n" not in message and "Iteration" not in capsys.readouterr().out  # one line, and no training
    assert snapshot(done) == before


@pytest.mark.parametrize("broken", ["artifacts", "model upload"])
def test_a_store_failure_after_training_keeps_the_model_and_fails_the_run(done: Path, monkeypatch, broken) -> None:
    marker = done / MARKER
    marker.unlink()
    before = snapshot(done)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    mlflow.set_tracking_uri(resolve_store().uri)
    mlflow.MlflowClient().delete_model_version("mnist-cnn", "1")  # so that this result logs its model again
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as info:
        if broken == "artifacts":
            patch.setattr(shutil, "copy2", full)  # how MLflow copies artifacts into a local store
        else:
            patch.setattr(mlflow.MlflowClient, "log_model_artifacts", full)
        record_main(patch)
    message = str(info.value.code)
    assert message.startswith("error: MLflow store sqlite:///") and "\n" not in message
    assert "No space left on device" in message and "rerun the same `dvc repro`" in message
    assert snapshot(done) == before and not marker.exists()  # the model and reports are kept, not recorded
    failed = runs()[-1]
    assert failed.info.status == "FAILED"
    models = mlflow.search_logged_models(experiment_ids=[failed.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{failed.info.run_id}'")
    assert [m.status for m in models] == [LoggedModelStatus.FAILED]  # the model, logged first, is not left PENDING

    record_main(monkeypatch)  # once the store is fixed, the same command records the result
    assert runs()[-1].info.status == "FINISHED" and marker.exists()


def test_a_registered_version_whose_files_are_gone_is_logged_again_and_uncrowned(done: Path, monkeypatch,
                                                                                 capsys) -> None:
    # `rm -rf mlartifacts`: the registry still lists version 1, the champion, and `models:/...` cannot load it.
    mlflow.set_tracking_uri(resolve_store().uri)
    assert champion()[0] == "1"
    shutil.rmtree(done / "mlartifacts")
    (done / MARKER).unlink()
    capsys.readouterr()
    record_main(monkeypatch)  # the stage's main: the store check first, then the record
    checked = capsys.readouterr()
    assert "store: 1 registered model version(s) in sqlite:///" in checked.err
    assert "have lost their files (mnist-cnn/1; was " in checked.err
    assert "version 2 (logged again: version 1, the same model, has lost its files)" in checked.out
    assert "mnist-cnn@champion is now version 2" in checked.out
    images, _ = load_mnist(done / "data/raw", "t10k")
    assert len(mlflow.pyfunc.load_model("models:/mnist-cnn@champion").predict(images[:5])) == 5
    lost = mlflow.MlflowClient().get_model_version("mnist-cnn", "1")
    assert "train.best_val_acc" not in lost.tags and "version 2 holds the same model" in lost.tags["files_lost"]

    # One run for the result: the one whose model cannot load stays (deleting a run takes a team server's admin), no
    # longer tagged with the result's key; its replacement holds it.
    old, kept = runs()
    assert kept.data.tags["model.version"] == "mnist-cnn/2" and kept.data.tags["result_key"]
    assert "result_key" not in old.data.tags and old.data.tags["replaced_by"] == kept.info.run_id
    assert old.data.tags["replaced_result_key"] == kept.data.tags["result_key"]
    assert f"lost its model files: tagged replaced_by={kept.info.run_id}" in checked.out

    (done / MARKER).unlink()  # the same result again: recorded already, version 2 is whole
    record_main(monkeypatch)
    again = capsys.readouterr()
    assert "lost their files" not in again.err
    assert again.out == f"record: already recorded as run 'workspace' ({kept.info.run_id}) in {resolve_store().uri}\n"
    assert [r.info.run_id for r in runs()] == [old.info.run_id, kept.info.run_id]


def champion() -> tuple[str, float]:
    """The version `models:/mnist-cnn@champion` serves, and the validation accuracy it was chosen by."""
    version = mlflow.MlflowClient().get_model_version_by_alias("mnist-cnn", "champion")
    return str(version.version), float(version.tags["train.best_val_acc"])


def another_result(nudge: int, val_acc: float) -> None:
    """Make the workspace's result another one: its model (one bias nudged) and best validation accuracy changed."""
    import torch

    state = torch.load("models/model.pt", weights_only=True)
    bias = [key for key in state if key.endswith("bias")][-1]
    torch.save({**state, bias: state[bias] + nudge * 1e-6}, "models/model.pt")
    summary = json.loads(Path("reports/train.json").read_text())
    summary["train"]["best_val_acc"] = val_acc
    Path("reports/train.json").write_text(json.dumps(summary))
    MARKER.unlink(missing_ok=True)


def set_params(section: str, **values: object) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params[section].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_champion_is_the_best_validation_accuracy_whatever_the_order(done: Path, monkeypatch, capsys) -> None:
    shutil.rmtree("mlartifacts")  # a new store: the tiny pipeline's own result is not part of this story
    Path("mlflow.db").unlink()
    another_result(1, 0.5)
    record_main(monkeypatch)
    assert champion() == ("1", 0.5)
    kept = {path: path.read_bytes() for path in (Path("models/model.pt"), Path("reports/train.json"))}

    another_result(2, 0.75)
    record_main(monkeypatch)
    assert champion() == ("2", 0.75)  # a better model registered: the alias moves

    # The worse model back in the workspace (as `dvc exp apply` would bring it), with a plot-only change: a new
    # result, whose run points at the version registered for that model. The alias stays.
    for path, data in kept.items():
        path.write_bytes(data)
    set_params("plot", n_images=4)
    MARKER.unlink()
    capsys.readouterr()
    record_main(monkeypatch)
    assert runs()[-1].data.tags["model.version"] == "mnist-cnn/1"
    assert champion() == ("2", 0.75)
    assert "mnist-cnn@champion" not in capsys.readouterr().out  # nothing moved, nothing said
    # Test accuracy plays no part: the tags hold train.json's validation accuracy, not metrics.json's test one.
    versions = mlflow.MlflowClient().search_model_versions("name = 'mnist-cnn'")
    assert sorted(float(v.tags["train.best_val_acc"]) for v in versions) == [0.5, 0.75]


def run_stages(names: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """These stages' main(), in this process, as dvc.yaml calls them."""
    for name in names:
        monkeypatch.setattr(sys, "argv", [name, *pipeline_commands()[name]])
        run_stage(importlib.import_module(f"stages.{name}").main)


def test_a_model_trained_on_deskewed_digits_is_served_deskewing_them(done: Path, monkeypatch) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mnist_pipeline.data import load_mnist
    from mnist_pipeline.digits import deskew, to_tensor
    from mnist_pipeline.model import Net
    from mnist_pipeline.training import load_state_dict

    plain_model = hashlib.sha256(Path("models/model.pt").read_bytes()).hexdigest()  # the tiny pipeline's
    set_params("train", deskew=True)
    monkeypatch.setenv(live_run.SWITCH_ENV, "off")  # record makes the run
    run_stages(["train", "evaluate", "plot", "record"], monkeypatch)
    val_acc = json.loads(Path("reports/train.json").read_text())["train"]["best_val_acc"]
    assert hashlib.sha256(Path("models/model.pt").read_bytes()).hexdigest() != plain_model, "train ignored deskew"
    net = Net()
    load_state_dict("models/model.pt", net)

    def logits(images: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return net(to_tensor(images)).double()

    # train validated on deskewed digits: its best validation accuracy is the saved model's on them.
    train_images, train_labels = load_mnist("data/raw", "train")
    val = np.load("data/split/val.npy")
    val_labels = torch.from_numpy(train_labels[val].astype(np.int64))
    val_correct = logits(deskew(train_images[val])).argmax(1) == val_labels
    assert val_correct.double().mean().item() == pytest.approx(val_acc)
    # evaluate scored deskewed test digits: its loss is the cross-entropy of the network on them.
    images, labels = load_mnist("data/raw", "t10k")
    as_trained, raw = logits(deskew(images)), logits(images)
    loss = json.loads(Path("reports/metrics.json").read_text())["test"]["loss"]
    expected_loss = F.cross_entropy(as_trained, torch.from_numpy(labels.astype(np.int64))).item()
    assert loss == pytest.approx(expected_loss, abs=1e-4)
    assert not torch.allclose(torch.softmax(as_trained, 1), torch.softmax(raw, 1), atol=1e-3), "deskew changes nothing"
    # The registered model deskews what it is sent, as training and evaluation did.
    version = runs()[-1].data.tags["model.version"].split("/")[1]
    served = mlflow.pyfunc.load_model(f"models:/mnist-cnn/{version}").predict(images.astype(object))
    assert np.allclose(np.stack(served["probabilities"]), torch.softmax(as_trained, 1).numpy(), atol=1e-6)
    with pytest.raises(mlflow.exceptions.MlflowException, match="model_config deskew: expected true or false"):
        mlflow.pyfunc.load_model(f"models:/mnist-cnn/{version}", model_config={"deskew": "false"})

    # The served config is part of what a version is: the same weights recorded with deskew off are another
    # version, which serves the digits as they come.
    set_params("train", deskew=False)
    MARKER.unlink()
    record_main(monkeypatch)
    plain = runs()[-1].data.tags["model.version"].split("/")[1]
    assert plain != version
    client = mlflow.MlflowClient()
    assert client.get_model_version("mnist-cnn", plain).tags["model_sha256"] == client.get_model_version(
        "mnist-cnn", version).tags["model_sha256"]
    served = mlflow.pyfunc.load_model(f"models:/mnist-cnn/{plain}").predict(images.astype(object))
    assert np.allclose(np.stack(served["probabilities"]), torch.softmax(raw, 1).numpy(), atol=1e-6)


def test_the_served_model_reads_what_its_package_writes_and_record_starts_without_torch() -> None:
    from mnist_pipeline import served_model, served_package

    # The names the served model reads, as its package writes them.
    assert (served_package.WEIGHTS, served_package.DESKEW) == (served_model.WEIGHTS, served_model.DESKEW)
    params = load_params(REPO / "params.yaml")
    config = served_config(params)
    assert set(config) == {served_model.DESKEW}  # the key the served model reads
    # Without importing torch, or MLflow for a result recorded before: a plot-only result's record stage must not
    # pay for torch (docs/performance.md), a result recorded before not for either.
    check = ("import sys, stages.record, mnist_pipeline.served_package as r; "
             "from mnist_pipeline.params import load_params; "
             "from mnist_pipeline.machine import trained_on; from pathlib import Path; "
             "r.served_code_sha256(r.served_config(load_params())); trained_on(Path('models/.trained-on.json'), 'a'); "
             "print('torch' in sys.modules or 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
