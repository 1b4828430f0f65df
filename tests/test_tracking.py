"""MLflow bookkeeping with real processes: concurrent writers on one SQLite store, run end states, tags."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from filelock import FileLock
from mlflow.exceptions import MlflowException

from mnist_pipeline.tracking import mlflow_store, result
from mnist_pipeline.tracking.store import StoreError, resolve_store
from tests.conftest import GIT_IDENTITY, REPO

WRITER = textwrap.dedent("""
    import mlflow
    from mlflow.entities import Metric
    from mnist_pipeline.tracking import registry, mlflow_store, tag
    from mnist_pipeline.tracking.store import resolve_store
    experiment = mlflow_store.configure(resolve_store(), "mnist")
    with mlflow_store.tracked_run(experiment_id=experiment) as run:
        mlflow.log_params({"writer": "{name}"})
        for step in range(150):
            mlflow.MlflowClient().log_batch(run.info.run_id,
                                            metrics=[Metric("a", step, 0, step), Metric("b", 2 * step, 0, step)])
""")


def python(code: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    environ.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def runs(root: Path) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist")
    return mlflow.search_runs([experiment.experiment_id], output_format="list")


@pytest.mark.slow  # processes of their own that import MLflow
def test_two_processes_write_one_new_store_at_once(tmp_path: Path) -> None:
    writers = [python(WRITER.replace("{name}", name), tmp_path, DVC_ROOT=str(tmp_path)) for name in "xy"]
    for writer in writers:
        output, _ = writer.communicate(timeout=300)
        assert writer.returncode == 0, output
    found = runs(tmp_path)
    assert sorted(r.data.params["writer"] for r in found) == ["x", "y"]
    client = mlflow.MlflowClient()
    for run in found:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "b")] == list(range(150))


HOLDER = textwrap.dedent("""
    import sqlite3, sys, time
    store = sqlite3.connect(sys.argv[1], isolation_level=None)
    store.execute("BEGIN EXCLUSIVE")  # what a writer holds while it commits, held here for seconds
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    store.execute("COMMIT")
""")


@pytest.mark.slow  # waits out a 6 s hold of the store
def test_a_write_waits_while_another_process_holds_the_store(workdir: Path) -> None:
    """SQLite's busy timeout, no retries: MLflow's sessions wait up to 20 s for the store, past pysqlite's 5 s."""
    store = resolve_store()
    experiment = mlflow_store.configure(store, "mnist")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.database), "6"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with mlflow_store.tracked_run(experiment_id=experiment):
        mlflow.log_param("writer", "waited")
    waited = time.monotonic() - start
    assert holder.wait(timeout=60) == 0
    assert waited > 5  # it overlapped the hold, longer than the 5 s default
    (run,) = runs(workdir)
    assert run.info.status == "FINISHED" and run.data.params == {"writer": "waited"}


def test_a_store_locked_past_the_timeout_is_one_line_naming_it(workdir: Path) -> None:
    store = resolve_store()
    # What MLflow raises when SQLite's busy timeout runs out: SQLAlchemy's message, its statement and a link.
    locked = MlflowException("(sqlite3.OperationalError) database is locked\n[SQL: INSERT INTO runs (run_uuid) "
                             "VALUES (?)]\n[parameters: ('5cef',)]\n(Background on this error at: "
                             "https://sqlalche.me/e/20/e3q8)")
    with pytest.raises(StoreError) as info, mlflow_store.store_errors(store, "the result is not recorded"):
        raise locked
    assert str(info.value) == (f"MLflow store {store.uri}: (sqlite3.OperationalError) database is locked; "
                               "the result is not recorded")


def test_configure_gives_up_on_a_held_store_lock_in_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = resolve_store()
    lock = store.database.with_name(f"{store.database.name}.lock")
    monkeypatch.setattr(mlflow_store, "STORE_LOCK_TIMEOUT_S", 0.2)
    with FileLock(lock), pytest.raises(StoreError) as info:
        mlflow_store.configure(store, "mnist")
    assert str(info.value).startswith(f"MLflow store {store.uri}: another process has held {lock} for 0.2 s")
    assert f"`fuser {lock}`" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_run_ends_failed_or_killed(workdir: Path, error: BaseException, status: str) -> None:
    experiment = mlflow_store.configure(resolve_store(), "mnist")
    with pytest.raises(type(error)), mlflow_store.tracked_run(experiment_id=experiment):
        raise error
    (run,) = runs(workdir)
    assert run.info.status == status
    assert mlflow.active_run() is None


@pytest.mark.slow  # processes of their own that import MLflow
def test_sigterm_ends_the_run_as_killed(tmp_path: Path) -> None:
    """In a stage, as every stage runs (errors.run_stage: the one SIGTERM path)."""
    code = textwrap.dedent("""
        import time
        from mnist_pipeline.tracking import registry, mlflow_store, tag
        from mnist_pipeline.errors import run_stage
        from mnist_pipeline.tracking.store import resolve_store

        def main():
            with mlflow_store.tracked_run(experiment_id=mlflow_store.configure(resolve_store(), "mnist")):
                print("running", flush=True)
                time.sleep(60)

        run_stage(main)
    """)
    process = python(code, tmp_path, DVC_ROOT=str(tmp_path))
    while (line := process.stdout.readline()) and line.strip() != "running":
        pass  # MLflow's own log lines come first
    assert line.strip() == "running"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode != 0
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"


def test_tags_tie_a_run_to_git_and_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    for name, text in {"params.yaml": "seed: 1\n", "dvc.lock": "a\n", "reports/metrics.json": "{}\n",
                       "reports/figures/a.png": "png"}.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text)
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(["git", "commit", "-qm", "x"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    outputs = [Path("reports/metrics.json"), Path("reports/figures")]
    tags = result.run_tags(outputs)
    assert tags["mlflow.source.git.commit"] == head and tags["git.dirty"] == "false"
    assert "dvc.exp_name" not in tags

    # What DVC does during any `dvc repro`: delete and rewrite outputs, update dvc.lock. Not dirty.
    Path("reports/metrics.json").unlink()
    Path("reports/figures/a.png").write_text("other")
    Path("dvc.lock").write_text("b\n")
    assert result.git_dirty(outputs) is False
    # A changed param (or code) is.
    Path("params.yaml").write_text("seed: 2\n")
    monkeypatch.setenv("DVC_EXP_NAME", "hasty-kite")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", head)
    tags = result.run_tags(outputs)
    assert tags["git.dirty"] == "true"
    assert tags["dvc.exp_name"] == "hasty-kite" and tags["dvc.exp_baseline_rev"] == head
    assert "dvc exp apply hasty-kite" in tags["mlflow.note.content"]


def test_flat_metrics_names() -> None:
    report = {"test": {"accuracy": 0.99, "per_class_accuracy": {"0": 1.0}, "note": "text"}}
    # The names `dvc metrics show` prints, so a query written with them works in MLflow.
    assert mlflow_store.flat_metrics(report) == {"test.accuracy": 0.99, "test.per_class_accuracy.0": 1.0}
