"""One DVC result, one complete MLflow run, with the real `dvc` and `mlflow` commands on the real data."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from mnist_pipeline import machine
from tests.conftest import (
    REPO, copy_workdir, doc_commands, dvc, free_port, get_json, mounted, one_epoch_params, project_env, serving,
)
from tests.test_environment import bump

pytestmark = pytest.mark.slow
BASELINE = one_epoch_params()


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True,
                          env=project_env()).stdout


@pytest.fixture
def repo(real_baseline: Path, tmp_path: Path) -> Path:
    """This test's own copy of the session's baseline repo (conftest's `real_baseline`: git, DVC cache, MLflow
    store): no other test's runs in it."""
    return copy_workdir(real_baseline, tmp_path / "repo")


def runs(root: Path, name: str | None = None) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist")
    found = mlflow.search_runs([experiment.experiment_id], output_format="list",
                               order_by=["attributes.start_time ASC"])
    return [r for r in found if name is None or r.info.run_name == name]


def exp_names(root: Path) -> set[str]:
    rows = csv.DictReader(io.StringIO(dvc(root, "exp", "show", "--csv").stdout))
    return {row["Experiment"] for row in rows if row["Experiment"]}


def artifact_bytes(root: Path, run: mlflow.entities.Run) -> dict[str, bytes]:
    folder = Path(run.info.artifact_uri.removeprefix("file://"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_baseline_run_is_complete_and_clean(repo: Path) -> None:
    (run,) = runs(repo)  # the baseline's `dvc repro`
    assert run.info.run_name == "workspace" and run.info.status == "FINISHED"
    assert run.data.tags["git.dirty"] == "false"
    assert run.data.tags["train.device"] == "cpu" and run.data.tags["train.world_size"] == "1"
    # The machine and kernels it was trained with, as tags only: DVC's outputs stay machine-independent.
    tags = machine.provenance()
    assert {k: v for k, v in run.data.tags.items() if k.startswith("machine.")} == tags
    outputs = "".join((repo / path).read_text() for path in ("dvc.lock", "reports/train.json", "reports/metrics.json"))
    assert tags["machine.cpu"] not in outputs and "machine.cpu" not in outputs
    assert run.data.metrics["train.world_size"] == 1
    metrics = json.loads((repo / "reports/metrics.json").read_text())["test"]
    assert run.data.metrics["test.accuracy"] == metrics["accuracy"]
    assert run.data.params["train.epochs"] == "1"
    stored = artifact_bytes(repo, run)
    assert stored["figures/predictions.png"] == (repo / "reports/figures/predictions.png").read_bytes()
    assert stored["reports/train_log.csv"] == (repo / "reports/train_log.csv").read_bytes()
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [*range(100, 165, 100), 165]  # 42,000 / 256 -> 165 iterations
    name, version = run.data.tags["model.version"].split("/")
    assert mlflow.MlflowClient().get_model_version(name, version).run_id == run.info.run_id


def test_every_listed_experiment_has_a_run_found_by_dvc_metric_names_and_gone_ones_are_deleted_restorably(
    repo: Path
) -> None:
    command = [sys.executable, "-m", "tools.gone_runs", "--min-age", "0"]
    env = project_env(PYTHONPATH=str(repo))
    dvc(repo, "exp", "run", "--temp", "-n", "to-remove", "-S", "plot.n_images=4")
    dvc(repo, "exp", "run", "--temp", "-n", "to-keep", "-S", "plot.n_images=5")
    names = exp_names(repo)
    assert {"to-remove", "to-keep"} <= names
    assert names <= {r.info.run_name for r in runs(repo)}
    # The name `dvc metrics show` prints finds the runs in MLflow: equal matches, greater does not.
    accuracy = float(json.loads((repo / "reports/metrics.json").read_text())["test"]["accuracy"])
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    equal = mlflow.search_runs(experiment_names=["mnist"], filter_string=f"metrics.`test.accuracy` = {accuracy}",
                               order_by=["metrics.`test.accuracy` DESC"], output_format="list")
    assert {r.info.run_name for r in equal} == {"workspace", "to-remove", "to-keep"}
    assert not mlflow.search_runs(experiment_names=["mnist"], filter_string=f"metrics.`test.accuracy` > {accuracy}",
                                  output_format="list")

    # Gone experiments: listed once DVC no longer has them, then deleted, restorably.
    listed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert "to-remove" not in listed.stdout and "to-keep" not in listed.stdout  # both still exist
    dvc(repo, "exp", "remove", "to-remove")
    (gone,) = runs(repo, "to-remove")
    listed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert f"{gone.info.run_id}  to-remove  FINISHED" in listed.stdout.splitlines()
    assert "to-keep" not in listed.stdout
    (gone,) = runs(repo, "to-remove")
    assert "no longer exists" in gone.data.tags["mlflow.note.content"]
    assert "dvc exp apply to-remove" not in gone.data.tags["mlflow.note.content"]

    subprocess.run([*command, "--delete"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert runs(repo, "to-remove") == []
    assert runs(repo, "to-keep")  # runs of existing experiments stay
    subprocess.run([sys.executable, "-m", "mlflow", "runs", "restore", "--run-id", gone.info.run_id], cwd=repo,
                   env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}"), check=True,
                   capture_output=True)
    assert runs(repo, "to-remove")

    # A run that watched a training (its live run, which record completed) carries this account too, so the
    # default, this account's runs, finds it once its experiment is gone.
    dvc(repo, "exp", "run", "--temp", "-n", "trained", "-S", "train.lr=0.00123")
    dvc(repo, "exp", "remove", "trained")
    (trained,) = runs(repo, "trained")
    assert trained.data.tags["training"] == "trained" and trained.data.tags["account"] == getpass.getuser()
    listed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert f"{trained.info.run_id}  trained  FINISHED" in listed.stdout.splitlines(), listed.stdout


def test_mlflow_shows_an_experiment_running_with_its_curves_then_one_run_and_a_plot_only_one_is_its_own(
    repo: Path
) -> None:
    port = free_port()
    ui = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
          "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}"]
    with serving(ui, port, "/health", repo, project_env()) as base:
        experiment = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mnist")["experiment"]
        search = {"experiment_ids": [experiment["experiment_id"]], "filter": "attributes.status = 'RUNNING'"}
        # One epoch reported every 20 iterations: the first validation point comes early, the training goes on.
        process = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "-n", "curves", "-S",
                                    "train.log_every=20"], cwd=repo, env=project_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 600
            while True:  # what the REST API (and so `mlflow ui`) says while it trains
                assert time.monotonic() < deadline and process.poll() is None, "no RUNNING run with a validation point"
                running = get_json(f"{base}/api/2.0/mlflow/runs/search", search).get("runs", [])
                if running:
                    run_id = running[0]["info"]["run_id"]
                    points = get_json(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=val_acc")
                    if points.get("metrics"):
                        break
                time.sleep(1)
            assert running[0]["info"]["run_name"] == "curves"
            out, _ = process.communicate(timeout=900)
        finally:
            process.kill()
        assert process.returncode == 0, out
    (curves,) = runs(repo, "curves")  # the same run, completed: curves, test metrics, figures, model
    assert curves.info.run_id == run_id and curves.info.status == "FINISHED"
    assert "test.accuracy" in curves.data.metrics
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_acc")]
    assert steps == [*range(20, 165, 20), 165]  # each report once: 42,000 / 256 -> 165 iterations
    assert curves.data.tags["model.version"].startswith("mnist-cnn/")

    # A plot-only experiment on top of it: a run of its own, pointing at the trained one's model, which it leaves be.
    curves_files = artifact_bytes(repo, curves)
    out = dvc(repo, "exp", "run", "-n", "plot-only", "-S", "plot.n_images=9").stdout
    for stage in ("train", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Running stage 'plot'" in out and "Running stage 'record'" in out
    (curves_after,) = runs(repo, "curves")
    (plot_only,) = runs(repo, "plot-only")
    assert ((curves_after.info.status, curves_after.data.params, curves_after.data.tags)
            == (curves.info.status, curves.data.params, curves.data.tags))
    assert artifact_bytes(repo, curves_after) == curves_files  # its figures were not rewritten
    assert plot_only.data.params["plot.n_images"] == "9" and curves.data.params["plot.n_images"] == "25"
    assert plot_only.data.params["train.log_every"] == curves.data.params["train.log_every"] == "20"
    assert plot_only.data.tags["model.run_id"] == curves.info.run_id
    assert plot_only.data.tags["model.version"] == curves.data.tags["model.version"]
    assert artifact_bytes(repo, plot_only)["figures/predictions.png"] != curves_files["figures/predictions.png"]
    assert plot_only.data.metrics["test.accuracy"] == curves.data.metrics["test.accuracy"]


def test_a_corrupt_store_stops_dvc_exp_run_before_training(repo: Path) -> None:
    database = repo / "mlflow.db"
    saved = database.read_bytes()
    database.write_bytes(b"garbage" * 1000)
    try:
        result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=0.0007"], cwd=repo,
                                env=project_env(), capture_output=True, text=True)
    finally:
        database.write_bytes(saved)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: MLflow store {database}: file is not a database; move {database} aside "
                      "(MLflow starts a new one) or restore it from a backup"], result.stderr
    assert "Iteration" not in result.stdout and "Traceback" not in result.stderr
    # What the docs say to do: the bad run's params and DVC's deletions are undone from git and the cache.
    assert not (repo / "models/model.pt").exists()
    for command in doc_commands("git checkout HEAD --"):
        subprocess.run(command, shell=True, cwd=repo, env=project_env(), check=True, capture_output=True)
    assert (repo / "models/model.pt").exists()
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout


def test_the_readme_recovery_after_a_killed_exp_run_restores_the_params_index_included(repo: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=0.0009"], cwd=repo,
                               env=project_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while (line := process.stdout.readline()) and "Iteration 100 statistics" not in line:
        pass
    assert line, "training never reported"
    os.killpg(process.pid, signal.SIGKILL)  # DVC and the stage, as a closed terminal does
    process.wait()
    assert "params.yaml" in git(repo, "diff", "--cached", "--name-only")  # what the killed run left behind

    for command in doc_commands("git checkout HEAD --"):  # the docs' words, exactly
        subprocess.run(command, shell=True, cwd=repo, env=project_env(), check=True, capture_output=True)
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""  # index and files as committed
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout
    # The next experiment runs on the committed params, not on the killed run's lr.
    dvc(repo, "exp", "run", "-n", "after-kill", "-S", "plot.n_images=10")  # its results land in the workspace
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["lr"] == BASELINE["train"]["lr"] and params["plot"]["n_images"] == 10


# Runs in its own mount namespace (`unshare -rm`): the repo is moved onto a small tmpfs, which a filler file then
# fills to the last byte; the namespace, and the tmpfs with it, end with the script.
DISK_FULL = """
set -eu
mount -t tmpfs -o size=512m tmpfs "$DISK"
mkdir "$DISK/repo" && cp -a "$REPO/." "$DISK/repo/" && mount --bind "$DISK/repo" "$REPO" && cd "$REPO"
cat /dev/zero > "$DISK/filler" 2>/dev/null || true
"$PYTHON" -m dvc exp run -S train.lr=0.0011 > "$OUT/full.log" 2>&1 || echo $? > "$OUT/full.rc"
rm "$DISK/filler"
eval "$RECOVERY"
git status --porcelain > "$OUT/status"
"$PYTHON" -m dvc status > "$OUT/dvc-status"
"$PYTHON" -m dvc exp run -S plot.n_images=10 > "$OUT/next.log" 2>&1
cp params.yaml "$OUT/params.yaml"
"""


def test_the_readme_recovery_after_dvc_met_a_full_disk(repo: Path, tmp_path: Path) -> None:
    (disk := tmp_path / "disk").mkdir()
    (out := tmp_path / "out").mkdir()
    recovery = "\n".join(doc_commands("git checkout HEAD --"))  # the docs' words, exactly
    result = subprocess.run(["unshare", "-rm", "bash", "-c", DISK_FULL], capture_output=True, text=True,
                            env=project_env(DISK=str(disk), REPO=str(repo), OUT=str(out), PYTHON=sys.executable,
                                            RECOVERY=recovery))
    next_log = (out / "next.log").read_text() if (out / "next.log").exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{next_log}"
    full = (out / "full.log").read_text()
    assert (out / "full.rc").read_text().strip() != "0" and "Iteration" not in full
    # DVC failed before any stage ran, with one of the messages docs/troubleshooting.md names.
    message = next(line for line in full.splitlines() if line.startswith("ERROR: "))
    page = " ".join((REPO / "docs" / "troubleshooting.md").read_text().split())
    assert message in page, full
    assert (out / "status").read_text() == ""  # index, files and DVC's leftovers as committed
    assert "Data and pipelines are up to date." in (out / "dvc-status").read_text()
    params = yaml.safe_load((out / "params.yaml").read_text())  # the next experiment ran on the committed lr
    assert params["train"]["lr"] == BASELINE["train"]["lr"] and params["plot"]["n_images"] == 10


def test_dependencies_are_exact(repo: Path) -> None:
    def changed_stages() -> set[str]:
        return set(json.loads(dvc(repo, "status", "--json").stdout))

    computing = {"split", "train", "evaluate", "plot", "record"}
    assert changed_stages() == set()
    try:
        for path, expected in (("mnist_pipeline/params.py", computing),
                               ("mnist_pipeline/tracking/mlflow_store.py", {"record"}),
                               ("mnist_pipeline/tracking/recording.py", {"record"}),
                               ("mnist_pipeline/tracking/live_run.py", {"record"}),  # bookkeeping: never retrains
                               ("mnist_pipeline/cpu_kernels.py", {"train", "evaluate", "record"}),
                               ("stages/__init__.py", {"train", "evaluate", "record"})):
            with (repo / path).open("a") as file:
                file.write("\n# an edit\n")
            assert changed_stages() == expected, path
            git(repo, "checkout", path)
        # Only the computing libraries' pins decide the bytes: a test tool's bump reruns nothing, numpy's does.
        bump(repo / "requirements.txt", "pytest")
        assert changed_stages() == set()
        bump(repo / "requirements/compute.txt", "numpy")
        assert changed_stages() == computing
    finally:
        git(repo, "checkout", ".")


def test_a_store_failure_after_training_keeps_the_model_and_says_how_to_record(repo: Path) -> None:
    # A damaged artifact tree: the check before training passes, logging the new model fails.
    models = repo / "mlartifacts/models"
    models.rename(models.with_name("models.aside"))
    models.write_text("not a folder")
    command = [sys.executable, "-m", "dvc", "exp", "run", "-n", "broken", "-S", "train.lr=0.0011"]
    result = subprocess.run(command, cwd=repo, env=project_env(), capture_output=True, text=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    store = f"sqlite:///{repo / 'mlflow.db'}"
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow store {store}: "), result.stderr
    assert "the trained model and reports are kept" in errors[0] and "Traceback" not in result.stderr
    assert "Running stage 'train'" in result.stdout and (repo / "models/model.pt").exists()
    (failed,) = runs(repo, "broken")
    assert failed.info.status == "FAILED"

    models.unlink()  # the store is fixed; the same command records without training
    models.with_name("models.aside").rename(models)
    out = subprocess.run(command, cwd=repo, env=project_env(), capture_output=True, text=True, check=True).stdout
    assert "Running stage 'train'" not in out and "Running stage 'record'" in out
    finished = [r for r in runs(repo, "broken") if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["model_sha256"] == failed.data.tags["model_sha256"]


def test_a_store_that_would_lose_runs_is_refused_before_training(repo: Path) -> None:
    uri = "mlruns"  # each kind of store refused, and why, is tests/test_store.py's: here, through `dvc exp run --temp`
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "train.lr=0.0013"], cwd=repo,
                            env=project_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
    assert result.returncode != 0 and "Iteration" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLFLOW_TRACKING_URI={uri}: "), result.stderr


def test_a_full_disk_in_download_is_one_line(repo: Path, real_mnist: Path) -> None:
    data = repo / "data"
    shutil.rmtree(data / "raw")
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=data):
        # Not from the run-cache: the stage itself must meet the full disk.
        result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--no-run-cache", "download"],
                                cwd=repo, env=project_env(MNIST_MIRROR=str(real_mnist)), capture_output=True, text=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot write data/raw: No space left on device; free space in {data}, then rerun "
                      "(no other source was tried: it would fail the same way)"], result.stderr
    assert "trying the next source" not in result.stderr
