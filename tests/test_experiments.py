"""Comparing runs as DVC and MLflow users do, with the real commands on the real data (1-epoch training).

The baseline is reproduced once; each test works in its own copy of it and makes the experiments it checks.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import (
    copy_workdir, doc_commands, dvc, free_port, get_json, one_epoch_params, program, project_env, queue_workers,
    serving, wait_for_queue,
)

pytestmark = pytest.mark.slow
BASELINE = one_epoch_params()  # the params of the session's real-data baseline
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--virtual-time-budget=15000",
]


def chromium(profile: Path) -> list[str]:
    """Debian's Chromium, headless, with a profile folder of its own."""
    return [program("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]


@pytest.fixture
def repo(real_baseline: Path, tmp_path: Path) -> Path:
    """This test's own copy of the session's baseline repo (conftest's `real_baseline`: git, DVC cache, MLflow
    store): no other test's runs in it."""
    return copy_workdir(real_baseline, tmp_path / "repo")


def report_steps() -> list[int]:
    """The iterations the shrunk training reports at: every log_every, and the last one."""
    train = BASELINE["train"]
    total = -(-42_000 // train["batch_size"]) * train["epochs"]
    return [*range(train["log_every"], total, train["log_every"]), total]


def exp_table(root: Path) -> dict[str, dict[str, str]]:
    """`dvc exp show --csv` as {experiment name: row}; the baseline row is keyed by its branch."""
    rows = csv.DictReader(io.StringIO(dvc(root, "exp", "show", "--csv").stdout))
    return {row["Experiment"] or row["rev"]: row for row in rows}


def mlflow_runs(root: Path) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist")
    return mlflow.search_runs([experiment.experiment_id], output_format="list")


def test_named_queued_and_temp_experiments_each_have_their_run_and_the_best_applies_up_to_date(
    repo: Path, tmp_path: Path
) -> None:
    """One scenario, so that each experiment trains once: a named run, a queued grid, a --temp run, what DVC and
    MLflow (its API and `mlflow ui`) show of them, `dvc exp apply` and `dvc exp branch` of the best, and a reverted
    change that DVC's run-cache brings back without training."""
    out = dvc(repo, "exp", "run", "-n", "lr-0001", "-S", "train.lr=0.001").stdout
    for stage in ("download", "split"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    for stage in ("train", "evaluate", "plot", "record"):
        assert f"Running stage '{stage}'" in out

    table = exp_table(repo)
    row, baseline = table["lr-0001"], table["main"] if "main" in table else table["master"]
    assert float(row["train.lr"]) == 0.001 and float(baseline["train.lr"]) == BASELINE["train"]["lr"]
    for column in ("test.accuracy", "test.loss", "train.best_val_acc"):
        assert 0 < float(row[column]) and 0 < float(baseline[column])

    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)["reports/metrics.json"]["test.accuracy"]
    assert diff["old"] == float(baseline["test.accuracy"]) and diff["new"] == float(row["test.accuracy"])
    assert diff["diff"] == pytest.approx(diff["new"] - diff["old"])

    (run,) = [r for r in mlflow_runs(repo) if r.data.tags.get("dvc.exp_name") == "lr-0001"]
    assert run.info.run_name == "lr-0001"
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.metrics["test.accuracy"] == float(row["test.accuracy"])
    assert run.data.tags["dvc.exp_baseline_rev"] == run.data.tags["mlflow.source.git.commit"]

    # A queued grid, two at a time, whose 0.001 repeats lr-0001 (restored from the run-cache while 0.002 trains);
    # then a --temp run, told MLflow's store by a relative URI, as a user who exported
    # MLFLOW_TRACKING_URI=sqlite:///mlflow.db would.
    dvc(repo, "exp", "run", "--queue", "-S", "train.lr=0.001,0.002")
    with queue_workers(repo, 2, repo.parent / "queue-start.log"):
        status = wait_for_queue(repo, 900)
    assert status.count("Success") == 2, status
    dvc(repo, "exp", "run", "--temp", "-n", "temp-run", "-S", "train.lr=0.003",
        MLFLOW_TRACKING_URI="sqlite:///mlflow.db")

    table = exp_table(repo)
    grid = {r["train.lr"]: r for r in table.values() if r["typ"] != "baseline" and r["Experiment"] != "lr-0001"}
    assert sorted(grid) == ["0.001", "0.002", "0.003"]
    assert all(float(r["test.accuracy"]) > 0.5 for r in grid.values())  # one epoch each: it learned

    # The copies in .dvc/tmp/exps are gone; the runs, their figures and models stay in the root store.
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*"))
    runs = mlflow_runs(repo)
    client = mlflow.MlflowClient()
    for name, row in table.items():
        if row["typ"] == "baseline":
            continue
        # Every experiment has its run; the grid's lr=0.001, which DVC restored from lr-0001's run-cache, is
        # lr-0001's result, so lr-0001's run, which names both.
        (run,) = [r for r in runs if any(line.endswith(f" {name}") for line in r.data.tags["dvc.names"].splitlines())]
        assert run.data.params["train.lr"] == row["train.lr"]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["test.accuracy"] == float(row["test.accuracy"])
        assert run.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
        figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert len(figures) == 3
        local = Path(client.download_artifacts(run.info.run_id, figures[0], str(tmp_path / "downloads" / name)))
        assert local.read_bytes()[:4] == b"\x89PNG"
    # One version per distinct model file, registered by the run that logged it; the restored run points at it.
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert sorted(v.tags["model_sha256"] for v in versions) == sorted({r.data.tags["model_sha256"] for r in runs})
    by_id = {r.info.run_id: r for r in runs}
    assert all(by_id[v.run_id].data.tags["model_sha256"] == v.tags["model_sha256"] for v in versions)
    (same,) = [r for r in runs if r.data.params["train.lr"] == "0.001"]
    assert same.info.run_name == "lr-0001" and len(same.data.tags["dvc.names"].splitlines()) == 2
    experiments = [name for name, row in table.items() if row["typ"] != "baseline"]
    assert len(runs) == 1 + len(experiments) - 1  # the baseline's run; lr-0001 and the grid's 0.001 share one
    # Whatever order the queue finished in, the champion is the version with the best validation accuracy.
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    best = max(r.data.metrics["train.best_val_acc"] for r in runs)
    assert by_id[champion.run_id].data.metrics["train.best_val_acc"] == best
    (temp,) = [r for r in runs if r.info.run_name == "temp-run"]
    assert temp.data.tags["dvc.exp_name"] == "temp-run"
    model = client.get_model_version("mnist-cnn", temp.data.tags["model.version"].split("/")[1])
    assert model.run_id == temp.info.run_id and model.tags["dvc.exp_name"] == "temp-run"

    # `mlflow ui` shows every one of these runs, with its curves and figures. In the repo root with no flags but
    # the port: the default store is the repo's.
    port = free_port()
    with serving(["mlflow", "ui", "--port", str(port)], port, "/health", repo, project_env()) as base:
        api = f"{base}/api/2.0/mlflow"
        experiments = get_json(f"{api}/experiments/search", {"max_results": 100})["experiments"]
        by_name = {e["name"]: e["experiment_id"] for e in experiments}
        found = get_json(f"{api}/runs/search", {"experiment_ids": [by_name["mnist"]], "max_results": 100})["runs"]
        assert len(found) == len(mlflow_runs(repo)) == len(runs)
        for experiment_id in set(by_name.values()) - {by_name["mnist"]}:
            assert not get_json(f"{api}/runs/search", {"experiment_ids": [experiment_id]}).get("runs")
        for run in found:
            run_id = run["info"]["run_id"]
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"seed", "train.lr", "split.val_fraction"} <= set(params)
            assert {"val_acc", "train_loss", "test.accuracy", "test.svm_loss", "train.best_val_acc"} <= metrics
            history = get_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=val_acc")["metrics"]
            assert [m["step"] for m in history] == report_steps()
            files = get_json(f"{api}/artifacts/list?run_id={run_id}&path=figures")["files"]
            assert len(files) == 3
        versions = get_json(f"{api}/model-versions/search?filter=name%3D%27mnist-cnn%27")["model_versions"]
        assert {v["run_id"] for v in versions} <= {r["info"]["run_id"] for r in found}

        dom = subprocess.run(
            [*chromium(tmp_path / "chromium"), "--dump-dom", f"{base}/#/experiments"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
        assert "mnist" in dom, dom[-2000:]

    # The best of these experiments, applied or made a branch, is up to date: nothing to reproduce.
    experiments = [r for r in table.values() if r["typ"] != "baseline"]
    best = max(experiments, key=lambda r: float(r["test.accuracy"]))["Experiment"]
    dvc(repo, "exp", "apply", best)
    assert "Data and pipelines are up to date." in dvc(repo, "repro").stdout
    applied = json.loads((repo / "reports/metrics.json").read_text())["test"]["accuracy"]
    assert applied == float(table[best]["test.accuracy"])

    env = project_env()
    subprocess.run(["git", "reset", "-q", "--hard"], cwd=repo, check=True, env=env)
    dvc(repo, "checkout")
    dvc(repo, "exp", "branch", best, "best")
    subprocess.run(["git", "checkout", "-q", "best"], cwd=repo, check=True, env=env)
    dvc(repo, "checkout")
    assert "Data and pipelines are up to date." in dvc(repo, "repro").stdout
    subprocess.run(["git", "checkout", "-q", "-"], cwd=repo, check=True, env=env)
    dvc(repo, "checkout")

    # A reverted change comes back from DVC's run-cache without training: lr-0001's params in the workspace
    # (trained above), then the committed ones again.
    before, versions = run_count(repo), len(client.search_model_versions("name = 'mnist-cnn'"))
    changed = {**BASELINE, "train": {**BASELINE["train"], "lr": 0.001}}
    (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert "Stage 'train' is cached - skipping run, checking out outputs" in dvc(repo, "repro").stdout
    subprocess.run(["git", "checkout", "params.yaml"], cwd=repo, check=True)
    out = dvc(repo, "repro").stdout
    for stage in ("train", "evaluate", "plot"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out
    assert_clean(repo)  # identical metrics, figures and lock
    # Nothing was trained, and each result was recorded already: no new run, no new version.
    assert "record: already recorded as run 'workspace' (" in out
    assert run_count(repo) == before
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == versions


def test_plots_show_and_diff_draw_in_chromium(repo: Path, tmp_path: Path) -> None:
    for command in (["plots", "show"], ["plots", "diff", "HEAD"]):
        out = tmp_path / command[1]
        dvc(repo, *command, "-o", str(out))
        dom = subprocess.run(
            [*chromium(tmp_path / "chromium"), "--dump-dom", (out / "index.html").as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
        # vega-embed replaces each plot's empty div with a canvas once the spec has been drawn.
        drawn = dom.count('class="marks"')
        assert drawn == 3, f"{command}: Vega drew {drawn} of 3 plots"
        for name in ("predictions", "misclassified", "confusion_matrix"):
            assert f"{name}.png" in dom
        assert all((out / "static" / p).stat().st_size > 10_000 for p in (out / "static").iterdir())


def run_count(repo: Path) -> int:
    return len(mlflow_runs(repo))


def assert_clean(repo: Path) -> None:
    """dvc.lock and the committed reports are byte for byte those of the baseline commit."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert status.stdout == "", status.stdout


def test_sigkill_during_training_then_a_forced_repro_reproduces_every_byte(repo: Path, real_mnist: Path) -> None:
    assert_clean(repo)
    runs_before = {r.info.run_id for r in mlflow_runs(repo)}
    env = project_env(PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "train"], cwd=repo, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while (line := process.stdout.readline()) and "Iteration 100 statistics" not in line:
        pass
    assert line, "training never reported"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    model = repo / "models/model.pt"
    # Never a partial model at the output path: DVC removed the old one, and ours is renamed in only when complete.
    assert not model.exists()
    # Every stage again, for real (a plain `dvc repro` may restore the outputs from DVC's cache instead).
    out = dvc(repo, "repro", "--force", MNIST_MIRROR=str(real_mnist)).stdout
    assert all(f"Running stage '{s}'" in out for s in ("download", "split", "train", "evaluate", "plot", "record"))
    assert_clean(repo)  # the same bytes as the baseline's run, which was never stopped
    assert "Data and pipelines are up to date." in dvc(repo, "repro").stdout
    # The same result, recorded already: no new FINISHED run; the killed training's run, and the forced one's,
    # which ended as a repeat of the result's run.
    assert "record: already recorded as run 'workspace' (" in out
    new_runs = [r for r in mlflow_runs(repo) if r.info.run_id not in runs_before]
    assert sorted((r.info.status, r.data.tags["training"]) for r in new_runs) == [("KILLED", "killed"),
                                                                                 ("KILLED", "repeat")]


def test_bad_params_through_dvc_repro_change_nothing(repo: Path) -> None:
    params = (repo / "params.yaml").read_text()
    bad = {**BASELINE, "train": {**BASELINE["train"], "lr": "fast"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=project_env(),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "error: params.yaml: train.lr: must be a number, got 'fast' (str)" in result.stderr
    diff = subprocess.run(["git", "diff", "--exit-code", "dvc.lock"], cwd=repo, capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    # DVC itself removes a stage's outputs before running it; the run-cache gives them back unchanged.
    (repo / "params.yaml").write_text(params)
    out = dvc(repo, "repro").stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out
    assert_clean(repo)


def test_a_killed_queued_experiment_stops_the_worker_and_the_readme_goes_on(repo: Path) -> None:
    dvc(repo, "exp", "run", "--queue", "-S", "train.lr=0.0021,0.0022")  # one killed, one left to run
    with queue_workers(repo, 1, repo.parent / "queue-start.log"):
        deadline = time.monotonic() + 300
        status = wait_for_queue(repo, 300, until=lambda out: "Running" in out, every_s=1)
        killed = next(line.split()[1] for line in status.splitlines() if "Running" in line)
        while "Iteration 100 statistics" not in dvc(repo, "queue", "logs", killed).stdout:  # training, as in the issue
            assert time.monotonic() < deadline
            time.sleep(1)
        dvc(repo, "queue", "kill", killed)
        # What the docs say happens: the worker stops (no worker process is left to pick anything up later), the
        # rest wait for one, and the killed row shows the baseline's metrics. DVC may report the worker gone a moment
        # before it marks the killed task, so wait for both.
        status = wait_for_queue(repo, deadline - time.monotonic(), every_s=1,
                                until=lambda out: "Worker status: 0 active, 0 idle" in out and "Running" not in out)
        assert status.count("Queued") == 1, status
        rows = exp_table(repo)
        assert rows[killed]["State"] == "Failed" and rows[killed]["train.lr"] == "0.0021"
        assert rows[killed]["test.accuracy"] == rows["master"]["test.accuracy"]

        start, hide, remove = doc_commands("dvc queue remove --failed")
        subprocess.run(start, shell=True, cwd=repo, env=project_env(), check=True, capture_output=True)
        status = wait_for_queue(repo, 600)
        assert status.count("Success") == 1, status
        shown = subprocess.run(hide, shell=True, cwd=repo, env=project_env(), check=True, capture_output=True,
                               text=True).stdout
        assert killed not in shown and "Failed" not in shown
        subprocess.run(remove, shell=True, cwd=repo, env=project_env(), check=True, capture_output=True)
        assert killed not in exp_table(repo)
