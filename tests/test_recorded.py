"""Is a result recorded: one answer whichever reader asks (MLflow, or the SQLite file alone), the quick read's schema
check against the MLflow installed, and the heartbeat rule that ends runs whose process is gone."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow

from mnist_pipeline.tracking import tag
from mnist_pipeline.tracking.heartbeat import DEAD_AFTER_S, dead_because, end_dead_runs
from mnist_pipeline.tracking.mlflow_store import configure
from mnist_pipeline.tracking.recorded import (
    SCHEMA,
    mlflow_runs,
    recorded_locally,
    recorded_run,
    schema_of,
    sqlite_runs,
)
from mnist_pipeline.tracking.store import resolve_store


def the_run(root: Path) -> mlflow.entities.Run:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return run


def test_both_readers_give_one_answer_with_the_same_conditions(pipeline: Path) -> None:
    run = the_run(pipeline)
    key, entry = run.data.tags[tag.RESULT_KEY], run.data.tags[tag.NAMES]
    experiment_id = configure(resolve_store(), "mnist")
    database = pipeline / "mlflow.db"

    def answers() -> tuple[str | None, str | None]:
        local = recorded_run(sqlite_runs(database, "mnist", key), key)
        asked = recorded_run(mlflow_runs(experiment_id, key), key)
        return (local and local.run_id), (asked and asked.run_id)

    assert answers() == (run.info.run_id, run.info.run_id)
    assert recorded_locally(database, "mnist", key, entry, None).run_id == run.info.run_id
    assert recorded_locally(database, "mnist", key, "abc123 another-name", None) is None  # a name to add: MLflow's
    assert recorded_run(sqlite_runs(database, "mnist", "another key"), "another key") is None
    # A registered model whose files are gone does not count, for either reader.
    shutil.rmtree(pipeline / "mlartifacts")
    assert answers() == (None, None)


def test_a_running_run_whose_process_is_gone_keeps_record_off_the_quick_path(pipeline: Path) -> None:
    run = the_run(pipeline)
    key, entry = run.data.tags[tag.RESULT_KEY], run.data.tags[tag.NAMES]
    experiment_id = configure(resolve_store(), "mnist")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    left = mlflow.MlflowClient().create_run(experiment_id, run_name="left", tags={
        tag.TRAINING: tag.RUNNING, tag.HEARTBEAT: f"{int(time.time())} {socket.gethostname()} {pid}"})
    database = pipeline / "mlflow.db"
    assert recorded_locally(database, "mnist", key, entry, None) is None  # a run to end: MLflow's way
    lines = end_dead_runs(experiment_id)
    assert lines == [f"MLflow run 'left' ({left.info.run_id}) was left RUNNING and is now KILLED: its process ({pid} "
                     f"on {socket.gethostname()}) is gone"]
    ended = mlflow.MlflowClient().get_run(left.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags[tag.TRAINING] == tag.KILLED
    assert "is gone" in ended.data.tags[tag.FAILURE]
    assert recorded_locally(database, "mnist", key, entry, None).run_id == run.info.run_id
    assert end_dead_runs(experiment_id) == []


def test_the_store_that_the_installed_mlflow_makes_has_the_schema_the_quick_read_knows(tmp_path: Path) -> None:
    """Fails, naming the table, when an MLflow upgrade changes a table or column that record's quick read uses."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.MlflowClient().search_experiments()  # MLflow creates its tables
    assert schema_of(tmp_path / "mlflow.db") == []


def test_a_changed_schema_is_said_in_one_line_and_mlflow_asked(pipeline: Path, capsys) -> None:
    run = the_run(pipeline)
    key, entry = run.data.tags[tag.RESULT_KEY], run.data.tags[tag.NAMES]
    database = pipeline / "mlflow.db"
    with closing(sqlite3.connect(database)) as db, db:
        db.execute("ALTER TABLE tags RENAME COLUMN value TO tag_value")
    assert schema_of(database) == ["table tags lacks column(s) value"]
    capsys.readouterr()
    assert recorded_locally(database, "mnist", key, entry, None) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(table tags lacks column(s) value; was MLflow upgraded?)" in err
    assert "tags" in SCHEMA


def test_the_heartbeat_rule() -> None:
    host, now = socket.gethostname(), time.time()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here_gone = {tag.HEARTBEAT: f"{int(now)} {host} {int(gone.stdout)}"}
    assert dead_because(here_gone, 0, now) == f"its process ({int(gone.stdout)} on {host}) is gone"
    # On this machine, a live process is alive however old its beat (a store that was down for a while).
    assert dead_because({tag.HEARTBEAT: f"{int(now) - 10 * DEAD_AFTER_S} {host} {os.getpid()}"}, 0, now) is None
    # Another machine's: by the clock alone.
    assert dead_because({tag.HEARTBEAT: f"{int(now) - 60} elsewhere 1"}, 0, now) is None
    assert "no heartbeat for 190 s" in dead_because({tag.HEARTBEAT: f"{int(now) - 190} elsewhere 1"}, 0, now)
    # A run of ours that never beat (made before heartbeats), by its start; someone's own run in the experiment: never.
    assert dead_because({tag.TRAINING: tag.RUNNING}, int(now - 200) * 1000, now).startswith("it stopped answering")
    assert dead_because({"mlflow.user": "someone"}, 0, now) is None
