"""The run that watches a training (mnist_pipeline/tracking/live_run.py), with the real stages on the tiny data."""

from __future__ import annotations

import contextlib
import csv
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from mnist_pipeline.tracking import live_run
from tests.conftest import REPO, copy_workdir, get_json, mlflow_server, pipeline_commands, project_env
from tests.test_faults import runs, snapshot

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


def train_long(root: Path) -> None:
    """Set the copy's training to go on until it is stopped, reporting every 4 iterations, on one thread (two
    trainings share the test machine's cores)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=1000, log_every=4, num_threads=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow  # two trainings in processes of their own
def test_a_running_training_shows_its_curves_and_a_killed_or_stopped_one_where_it_stopped(
    pipeline: Path, built_pipeline: Path, tmp_path: Path
) -> None:
    """Two trainings at once, each in its own copy of the tiny pipeline: one killed without a word (SIGKILL: the
    helper sees its pipe close), one stopped (SIGTERM: the stage tells the helper). Both runs end KILLED."""
    stopped = copy_workdir(built_pipeline, tmp_path / "stopped")
    for root in (pipeline, stopped):
        train_long(root)
    before = {root: snapshot(root) for root in (pipeline, stopped)}
    process = subprocess_train(pipeline)
    terminated = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=stopped, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(stopped), PYTHONUNBUFFERED="1"),
    )
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

        while (line := terminated.stdout.readline()) and "Iteration 8 statistics" not in line:
            pass
        terminated.send_signal(signal.SIGTERM)
        terminated.communicate(timeout=120)
    finally:
        process.kill()
        terminated.kill()
    assert watched.info.status == "KILLED" and watched.data.tags["training"] == "killed"
    assert "killed" in watched.data.tags["failure"]
    steps = [step for step, _ in history(watched.info.run_id, "val_acc")]
    assert len(steps) >= 2 and steps == sorted(set(steps))  # where it stopped, each report once
    assert snapshot(pipeline) == before[pipeline]  # the outputs as DVC left them

    assert terminated.returncode != 0
    assert snapshot(stopped) == before[stopped]  # the old model and reports kept
    watched, recorded = runs(stopped)  # the run that watched the training shows where it stopped
    assert watched.info.status == "KILLED" and watched.data.tags["training"] == "killed"
    assert "SIGTERM" in watched.data.tags["failure"] and "val_acc" in watched.data.metrics
    assert recorded.info.status == "FINISHED"


@pytest.mark.slow  # a training in a process of its own
def test_sigterm_stops_a_training_without_live_curves_in_one_line_keeping_the_outputs(pipeline: Path) -> None:
    """The one SIGTERM path (errors.run_stage) whatever MNIST_LIVE_CURVES says: with no live run, SIGTERM still
    ends the stage in one line, exit code 1, its temporary files gone and the outputs as DVC left them."""
    train_long(pipeline)
    before = snapshot(pipeline)
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=pipeline, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(pipeline), PYTHONUNBUFFERED="1", MNIST_LIVE_CURVES="off"),
    )
    try:
        while (line := process.stdout.readline()) and "Iteration 8 statistics" not in line:
            pass
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1
    assert err.strip().splitlines()[-1] == ("interrupted (stopped by signal SIGTERM): outputs not yet written are "
                                            "left as they were"), err
    assert "Traceback" not in err
    assert snapshot(pipeline) == before and runs(pipeline)[0].info.status == "FINISHED"  # the recorded one


@pytest.mark.slow  # `mlflow server` and a training, each in a process of its own
def test_a_training_killed_under_a_tracking_server_leaves_its_run_killed(pipeline: Path, tmp_path: Path) -> None:
    """SIGKILL of the train stage, recording to a real `mlflow server`: MLflow prints its "View run" line to the
    helper's stdout as it ends a run there; with that pipe's reader dead, the line must not cost the run its end."""
    train_long(pipeline)
    with mlflow_server(tmp_path) as base:
        process = subprocess.Popen([sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=pipeline,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(pipeline),
                                                   PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=base))
        try:
            while (line := process.stdout.readline()) and "Iteration 8 statistics" not in line:
                pass
            assert line, process.stderr.read()
            process.kill()  # the stage alone, as an OOM kill would: the helper, in its own session, lives on
            process.wait()
            search = f"{base}/api/2.0/mlflow/runs/search"
            deadline = time.monotonic() + 60
            while (run := get_json(search, {"experiment_ids": ["1"]})["runs"][0])["info"]["status"] == "RUNNING":
                assert time.monotonic() < deadline, "the killed training's run stayed RUNNING"
                time.sleep(0.5)
        finally:
            process.kill()
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    assert run["info"]["status"] == "KILLED" and tags["training"] == "killed", run


def command_line(pid: Path) -> str:
    """A process's command line, or "" for one that ended meanwhile."""
    try:
        return (pid / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_training_refused_after_its_helper_started_makes_no_run_and_leaves_nothing(pipeline: Path) -> None:
    """The helper starts before the stage loads torch, and loads MLflow meanwhile: a training refused after that (a
    batch larger than the training split) ends in the stage's one line, its helper gone with it, quietly, having
    made no run, and its report folder gone."""
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["train"]["batch_size"] = 60000
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs_before = len(runs(pipeline))
    process = subprocess.Popen([sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=pipeline,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(pipeline)))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: params.yaml: train.batch_size: 60000 is larger than the"), err
    assert len(runs(pipeline)) == runs_before
    assert not [pid for pid in Path("/proc").glob("[0-9]*") if f"{live_run.LIVE_FOLDER_PREFIX}{process.pid}-" in
                command_line(pid)], "the helper outlived its stage"
    folders = (pipeline / ".dvc/tmp", Path(tempfile.gettempdir()))
    assert [f for folder in folders for f in folder.glob(f"{live_run.LIVE_FOLDER_PREFIX}{process.pid}-*")] == []


def subprocess_train(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(root)))


def in_process(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's main(), in this process, as dvc.yaml calls it."""
    monkeypatch.setattr(sys, "argv", [name, *STAGE_ARGS[name]])
    importlib.import_module(f"stages.{name}").main()


def test_a_retraining_of_a_recorded_result_leaves_one_finished_run_and_deletes_none(
    pipeline: Path, monkeypatch, capsys
) -> None:
    (first,) = runs(pipeline)
    # The same bytes again, watched by a new run: the training's end finds the result recorded and ends that run as
    # a repeat, whether record runs afterwards or not (DVC takes a result of the same bytes for up to date).
    in_process("train", monkeypatch)
    (repeat,) = [r for r in runs(pipeline) if r.info.run_id != first.info.run_id]
    (pipeline / STAGE_ARGS["record"][-1]).unlink()
    capsys.readouterr()
    in_process("record", monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    store = f"sqlite:///{pipeline}/mlflow.db"
    assert lines == [f"record: already recorded as run 'workspace' ({first.info.run_id}) in {store}"]
    assert repeat.info.status == "KILLED" and repeat.data.tags["training"] == "repeat"
    assert repeat.data.tags["repeat_of"] == first.info.run_id and "result_key" not in repeat.data.tags
    assert [r.info.run_id for r in runs(pipeline) if r.info.status == "FINISHED"] == [first.info.run_id]
    (pipeline / STAGE_ARGS["record"][-1]).unlink()  # record again: nothing waits for it, nothing changes
    in_process("record", monkeypatch)
    assert capsys.readouterr().out.splitlines() == lines[:1]


def test_live_curves_off_trains_the_same_and_record_makes_the_run(pipeline: Path, monkeypatch) -> None:
    before = snapshot(pipeline)
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / 'mlflow.db'}")
    mlflow.MlflowClient().delete_run(runs(pipeline)[0].info.run_id)  # so that record records it again
    monkeypatch.setenv("MNIST_LIVE_CURVES", "off")
    in_process("train", monkeypatch)
    assert snapshot(pipeline) == before and runs(pipeline) == []
    (pipeline / STAGE_ARGS["record"][-1]).unlink()
    in_process("record", monkeypatch)
    (run,) = runs(pipeline)
    assert "training" not in run.data.tags and len(history(run.info.run_id, "val_acc")) >= 2


def test_a_store_that_never_answers_delays_the_training_by_the_start_limit_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking server that takes connections and answers nothing (a hung proxy, a stopped process): the stage
    waits START_TIMEOUT_S for the helper's run, then trains without one, and the helper is gone."""
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)  # the accepting thread ends by itself

        def hold() -> None:
            with contextlib.suppress(OSError):
                for _ in range(8):  # bounded: MLflow's first requests, never answered
                    held.append(listener.accept()[0])

        threading.Thread(target=hold, daemon=True).start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(live_run, "START_TIMEOUT_S", 5)
        helper = live_run.Helper(tmp_path)
        started = time.monotonic()
        try:
            answer = live_run.LiveRun.start(helper, "mnist", [], {}, {})
            waited = time.monotonic() - started
            assert helper.process.poll() is not None  # killed with its session when the limit passed
        finally:
            helper.close()
    for connection in held:
        connection.close()
    assert answer == "the store made no run within 5 s" and 5 <= waited < 15, (answer, waited)
    assert live_run.REPORTS_ENV not in os.environ


def test_report_folders_left_by_trainings_killed_with_everything_go_with_the_next_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the repo's DVC temp folder (DVC_ROOT's): a left-over whose process is gone is removed, a running
    training's folder is kept."""
    (tmp_path / ".dvc").mkdir()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_over = tmp_path / ".dvc/tmp" / f"{live_run.LIVE_FOLDER_PREFIX}{dead.stdout.strip()}-abc"
    running = tmp_path / ".dvc/tmp" / f"{live_run.LIVE_FOLDER_PREFIX}{os.getpid()}-def"
    for folder in (left_over, running):
        folder.mkdir(parents=True)
        (folder / "reports.jsonl").write_text("{}\n")
    assert live_run.live_folders() == tmp_path / ".dvc/tmp"
    assert not left_over.exists() and running.exists()


@pytest.mark.slow  # a training in a process of its own
def test_a_training_whose_output_is_closed_ends_its_run_with_the_cause(pipeline: Path) -> None:
    """`dvc repro | head -3`, say: the reader of the stage's output goes away mid-training. The training stops on
    its next line, and its run ends FAILED with the cause, not RUNNING."""
    train_long(pipeline)
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *STAGE_ARGS["train"]], cwd=pipeline, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(pipeline), PYTHONUNBUFFERED="1"),
    )
    try:
        while (line := process.stdout.readline()) and "Iteration 8 statistics" not in line:
            pass
        process.stdout.close()  # the reader is gone
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0
    watched = runs(pipeline)[0]
    assert watched.info.status in ("FAILED", "KILLED") and "Broken pipe" in watched.data.tags["failure"], err
    assert watched.data.tags["training"] in ("failed", "killed") and "val_acc" in watched.data.metrics
