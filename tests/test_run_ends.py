"""Every run ends with its training, whatever fails: record SIGKILLed at each of its steps, the whole training tree
SIGKILLed, the tracking server stopped mid-training and back during it or after it. Real processes, a real server,
the real data; after the next `dvc repro`, no run is RUNNING, the champion loads and each result has one FINISHED run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from mnist_pipeline.data import load_mnist
from mnist_pipeline.tracking import tag
from tests.conftest import copy_workdir, dvc, free_port, mlflow_server, pipeline_commands, project_env, wait_until

pytestmark = pytest.mark.slow
RECORD_STEPS = {  # what record has just done when it is killed: the function that has just returned
    "run created": "mlflow.start_run",
    "model logged": "mlflow.pyfunc.log_model",
    "version registered": "mlflow.MlflowClient.create_model_version",
    "alias moved": "mlflow.MlflowClient.set_registered_model_alias",
    "run ended": "mlflow.end_run",
    "marker written": "mnist_pipeline.files.atomic_write_text",
}


@pytest.fixture
def repo(real_baseline: Path, tmp_path: Path) -> Path:
    """This test's copy of the session's baseline repo (one epoch of the real data, reproduced and recorded)."""
    return copy_workdir(real_baseline, tmp_path / "repo")


def all_runs(uri: str, experiment: str = "mnist") -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow.search_runs([found.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])


def assert_one_finished_run_per_result_and_none_running(uri: str) -> list[mlflow.entities.Run]:
    runs = all_runs(uri)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    keys = [r.data.tags[tag.RESULT_KEY] for r in runs if r.info.status == "FINISHED" and tag.RESULT_KEY in r.data.tags]
    assert len(keys) == len(set(keys)) and keys, [(r.info.run_name, r.info.status, r.data.tags) for r in runs]
    return runs


def assert_champion_loads(root: Path, uri: str) -> mlflow.entities.model_registry.ModelVersion:
    mlflow.set_tracking_uri(uri)
    champion = mlflow.MlflowClient().get_model_version_by_alias("mnist-cnn", "champion")
    images, _ = load_mnist(root / "data/raw", "t10k")
    assert len(mlflow.pyfunc.load_model("models:/mnist-cnn@champion").predict(images[:4])) == 4
    return champion


def longer_training(root: Path) -> None:
    """Three epochs reported every 20 iterations: a training of tens of seconds, its curves from the first seconds."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=3, log_every=20)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def live_run_with_curves(uri: str) -> mlflow.entities.Run | None:
    runs = [r for r in all_runs(uri) if r.data.tags.get(tag.TRAINING) == tag.RUNNING and "val_acc" in r.data.metrics]
    return runs[0] if runs else None


@pytest.mark.parametrize("step", RECORD_STEPS)
def test_record_killed_at_each_step_is_finished_by_the_next_repro(repo: Path, step: str) -> None:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    # A store that has never seen this result (a new teammate's, say): record writes everything.
    for stale in ("mlflow.db", "mlartifacts", "reports/.mlflow-recorded"):
        path = repo / stale
        subprocess.run(["rm", "-rf", str(path)], check=True)
    killed = subprocess.run(
        [sys.executable, "-m", "tests.killed_after", RECORD_STEPS[step], "-m", "stages.record",
         *pipeline_commands()["record"]],
        cwd=repo, env=project_env(PYTHONPATH=str(Path(__file__).parents[1])), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = dvc(repo, "repro").stdout
    # Killed once its marker was written, record had done everything: DVC takes the stage for done.
    assert ("Running stage 'record'" in out) == (step != "marker written") and "Running stage 'train'" not in out
    runs = assert_one_finished_run_per_result_and_none_running(uri)
    (run,) = runs  # the killed record's run, completed, not a second one
    champion = assert_champion_loads(repo, uri)
    assert champion.run_id == run.info.run_id and run.data.tags[tag.MODEL_VERSION] == "mnist-cnn/1"
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.status.name for m in models] == ["READY"]  # logged once, whichever step the kill came after
    assert run.data.metrics["test.accuracy"] > 0.5 and len(mlflow.MlflowClient().get_metric_history(
        run.info.run_id, "val_acc")) == 2
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout


def test_record_killed_while_completing_the_run_that_watched_the_training(repo: Path) -> None:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    for stale in ("mlflow.db", "mlartifacts"):
        subprocess.run(["rm", "-rf", str(repo / stale)], check=True)
    dvc(repo, "repro", "-f", "-s", "train")  # the same bytes again, watched by a live run in the new store
    (live,) = all_runs(uri)
    assert live.data.tags[tag.TRAINING] == tag.TRAINED
    (repo / "reports/.mlflow-recorded").unlink()  # as before any record that DVC runs on a new result
    killed = subprocess.run(
        [sys.executable, "-m", "tests.killed_after", RECORD_STEPS["version registered"], "-m", "stages.record",
         *pipeline_commands()["record"]],
        cwd=repo, env=project_env(PYTHONPATH=str(Path(__file__).parents[1])), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    (left,) = all_runs(uri)
    assert left.info.status == "RUNNING" and left.info.run_id == live.info.run_id
    out = dvc(repo, "repro").stdout
    (run,) = assert_one_finished_run_per_result_and_none_running(uri)
    assert run.info.run_id == live.info.run_id and "trained here" in out
    assert assert_champion_loads(repo, uri).run_id == run.info.run_id


def test_sigkill_of_the_whole_training_tree_is_ended_by_the_next_training(repo: Path) -> None:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    longer_training(repo)
    training = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=project_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        live = wait_until("live run with curves", lambda: live_run_with_curves(uri), training)
        helper = int(live.data.tags[tag.HEARTBEAT].split()[2])
        # Everything, as an OOM kill or a closed terminal's hang-up to the whole session does: DVC, the stage, the
        # helper (in a session of its own).
        os.killpg(training.pid, signal.SIGKILL)
        os.kill(helper, signal.SIGKILL)
    finally:
        training.kill()
        training.wait()
    time.sleep(1)
    (left,) = [r for r in all_runs(uri) if r.info.run_id == live.info.run_id]
    assert left.info.status == "RUNNING" and left.info.end_time is None  # nobody was left to end it
    assert list((repo / ".dvc/tmp").glob("mnist-live-*"))

    result = dvc(repo, "repro")
    assert (f"train: MLflow run '{left.info.run_name}' ({left.info.run_id}) was left RUNNING and is now KILLED: its "
            f"process ({helper} on ") in result.stderr + result.stdout
    ended = mlflow.MlflowClient().get_run(left.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags[tag.TRAINING] == tag.KILLED
    assert "ended by the next pipeline command: its process" in ended.data.tags[tag.FAILURE]
    assert_one_finished_run_per_result_and_none_running(uri)
    assert assert_champion_loads(repo, uri)
    assert list((repo / ".dvc/tmp").glob("mnist-live-*")) == []


@pytest.mark.parametrize("back", ["during the training", "after the training"])
def test_a_tracking_server_stopped_mid_training(repo: Path, tmp_path: Path, back: str) -> None:
    """The curves stop with one line at once; back during the training, they resume in the same run; back only after
    it, record fails in one line, and the next `dvc repro` completes that same run. One FINISHED run either way."""
    longer_training(repo)
    port, server = free_port(), tmp_path / "server"
    server.mkdir()
    with mlflow_server(server, port) as uri:
        training = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo,
                                    env=project_env(MLFLOW_TRACKING_URI=uri), text=True,
                                    stdout=(tmp_path / "out.txt").open("w"), stderr=subprocess.STDOUT)
        live = wait_until("live run with curves", lambda: live_run_with_curves(uri), training)

    def output() -> str:
        return (tmp_path / "out.txt").read_text()

    try:
        wait_until("the line that the store stopped answering", lambda: "stopped answering" in output(), training)
        if back == "during the training":
            with mlflow_server(server, port):
                assert training.wait(timeout=600) == 0, output()[-3000:]
            assert "answers again: the curves resume in run " + live.info.run_id in output()
        else:
            assert training.wait(timeout=600) != 0
            assert f"still does not answer: run {live.info.run_id} stays open; record completes it" in output()
            errors = [line for line in output().splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "the MLflow server does not answer" in errors[0], output()[-3000:]
            with mlflow_server(server, port):
                out = dvc(repo, "repro", MLFLOW_TRACKING_URI=uri).stdout
                assert "Running stage 'train'" not in out and "Running stage 'record'" in out
        with mlflow_server(server, port):
            lines = [line for line in output().splitlines() if "stopped answering" in line]
            assert len(lines) == 1, lines  # said once, however long the store was away
            runs = [r for r in assert_one_finished_run_per_result_and_none_running(uri)
                    if r.info.start_time >= live.info.start_time]
            (run,) = runs
            assert run.info.run_id == live.info.run_id and run.info.status == "FINISHED"
            steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
            logged = [int(line.split(",")[0]) for line in (repo / "reports/train_log.csv").read_text().splitlines()[1:]]
            assert sorted(set(steps)) == logged  # every report, none twice
            assert len(steps) == len(logged)
    finally:
        training.kill()
