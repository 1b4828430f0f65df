"""The run that watches a training (mnist_pipeline/live_run.py), with the real stages on the tiny data."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import REPO, pipeline_commands, project_env
from tests.test_faults import runs, snapshot, stage

STAGE_ARGS = pipeline_commands()


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_the_run_that_watched_the_training_is_the_results_run(pipeline: Path) -> None:
    (run,) = runs(pipeline)
    assert run.info.status == "FINISHED" and run.data.tags["training"] == "trained" and "result_key" in run.data.tags
    with (pipeline / "reports/train_log.csv").open() as file:
        log = list(csv.DictReader(file))
    for key in ("train_acc", "train_loss", "val_acc"):  # each report once: logged while training, not again
        assert history(run.info.run_id, key) == [(int(row["iteration"]), pytest.approx(float(row[key])))
                                                 for row in log]
    assert "test.accuracy" in run.data.metrics and run.data.tags["model.version"] == "mnist-cnn/1"


def test_a_running_training_shows_its_curves_and_a_killed_one_where_it_stopped(pipeline: Path) -> None:
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["train"].update(epochs=1000, log_every=4)
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = snapshot(pipeline)
    process = subprocess_train(pipeline)
    try:
        deadline = time.monotonic() + 120
        while True:  # what `mlflow ui` shows while it trains: a RUNNING run with validation points
            assert time.monotonic() < deadline and process.poll() is None
            watched = runs(pipeline)[0]
            if watched.info.status == "RUNNING" and len(history(watched.info.run_id, "val_acc")) >= 2:
                break
            time.sleep(0.5)
        os.kill(process.pid, signal.SIGKILL)  # no word to the helper: it sees its pipe close
        process.wait()
        deadline = time.monotonic() + 30
        while (watched := mlflow.MlflowClient().get_run(watched.info.run_id)).info.status == "RUNNING":
            assert time.monotonic() < deadline, "the killed training's run stayed RUNNING"
            time.sleep(0.5)
    finally:
        process.kill()
    assert watched.info.status == "KILLED" and watched.data.tags["training"] == "killed"
    assert "killed" in watched.data.tags["failure"]
    steps = [step for step, _ in history(watched.info.run_id, "val_acc")]
    assert len(steps) >= 2 and steps == sorted(set(steps))  # where it stopped, each report once
    assert snapshot(pipeline) == before  # the outputs as DVC left them


def subprocess_train(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(root)))


def test_a_retraining_of_a_recorded_result_leaves_one_run(pipeline: Path) -> None:
    (first,) = runs(pipeline)
    assert stage(pipeline, "train").returncode == 0  # the same bytes again, watched by a new run
    (pipeline / STAGE_ARGS["record"][-1]).unlink()
    recorded = stage(pipeline, "record")
    assert recorded.returncode == 0, recorded.stderr
    lines = recorded.stdout.splitlines()
    assert lines[0].startswith(f"record: already recorded as run 'workspace' ({first.info.run_id})")
    assert lines[1].startswith("record: run ") and "which watched this training, deleted" in lines[1]
    assert [r.info.run_id for r in runs(pipeline)] == [first.info.run_id]


def test_live_curves_off_trains_the_same_and_record_makes_the_run(pipeline: Path) -> None:
    before = snapshot(pipeline)
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlflow.db'}")
    mlflow.MlflowClient().delete_run(runs(pipeline)[0].info.run_id)  # so that record records it again
    assert stage(pipeline, "train", MNIST_LIVE_CURVES="off").returncode == 0
    assert snapshot(pipeline) == before and runs(pipeline) == []
    (pipeline / STAGE_ARGS["record"][-1]).unlink()
    assert stage(pipeline, "record").returncode == 0
    (run,) = runs(pipeline)
    assert "training" not in run.data.tags and len(history(run.info.run_id, "val_acc")) >= 2
