"""Sweeps (tools/sweep.py, docs/sweeps.md): Optuna studies whose trials are DVC experiments with one MLflow run each.

The fast tier checks the refusals that come before any training. The slow tier runs real sweeps on tiny generated
MNIST files (download's output committed with `dvc commit`, so DVC trains on them): the local default study with its
pruner, and a team of two workers in two clones on a real team server (PostgreSQL, mlflow server), one SIGKILLed
mid-trial, then PostgreSQL restarted under a worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml

from mnist_pipeline.search_space import SpaceError, load_space
from tests.conftest import (
    REPO, built_once, committed_params_text, copy_project, copy_workdir, dvc, free_port, get_json, idx_bytes,
    program, project_env, serving, shrunk_params, tiny_arrays,
)
from mnist_pipeline.tracking import tag
from tools.sweep import SweepError, open_study

SPACE = {
    "fixed": {"train.epochs": 3},
    "search": {"train.lr": {"low": 1e-6, "high": 0.03, "log": True}, "train.batch_size": {"choices": [32, 64]}},
}
# Trainings of a few seconds, long enough to be killed mid-way, every one of which learns (none fails its check).
TEAM_SPACE = {"fixed": {"train.epochs": 8}, "search": {"train.lr": {"low": 1e-3, "high": 0.03, "log": True},
                                                       "train.batch_size": {"choices": [32, 64]}},
              "pruner": {"kind": "none"}}
ADMIN_PASSWORD = "admin-password-of-the-sweep-tests"
SELF_STOP_S = 1800  # the team server started here stops itself after this long, should the teardown never run


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# ---- fast: refused before any training -------------------------------------------------------------------------------
@pytest.mark.parametrize(("search", "words"), [
    ({"train.lrr": {"low": 0.001, "high": 0.01}}, "train.lrr: not a param of"),
    ({"train.lr": {"low": 0.01, "high": 0.001}}, "empty or inverted range: low 0.01 must be below high 0.001"),
    ({"train.lr": {"low": 0.01, "high": 0.01}}, "empty or inverted range"),
    ({"train.lr": {"low": -0.1, "high": 0.1}}, "-0.1 is not a valid train.lr: must be in (0, 10], got -0.1"),
    ({"train.lr": {"low": 0, "high": 0.1, "log": True}}, "a log range must start above 0, got low 0"),
    ({"train.batch_size": {"choices": [32, 0]}}, "0 is not a valid train.batch_size: must be in [1, 60000]"),
    ({"train.batch_size": {"choices": [32, 128]}}, "batch size 128 is larger than the 100 training images"),
    ({"train.batch_size": {"choices": []}}, "choices must be a non-empty list"),
    ({"train.optimizer": {"choices": ["adamw", "lion"]}}, "'lion' is not a valid train.optimizer: must be one of"),
    ({"train.num_threads": {"choices": [1, 2]}}, "set it under fixed:, one value for the whole study"),
    ({"mlflow.experiment": {"choices": ["a", "b"]}}, "the MLflow section is the study's bookkeeping"),
])
def test_a_bad_search_space_is_refused_in_one_line(tmp_path: Path, search: dict, words: str) -> None:
    (tmp_path / "params.yaml").write_text(committed_params_text())
    split = tmp_path / "split"
    split.mkdir()
    np.save(split / "train.npy", np.arange(100))
    space = write_space(tmp_path / "space.yaml", {"fixed": {"train.epochs": 1}, "search": search})
    with pytest.raises(SpaceError) as refused:
        load_space(space, tmp_path / "params.yaml", split)
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert str(refused.value).startswith(f"{space}: ")


def test_the_committed_space_is_valid_and_first_points_must_lie_in_it(tmp_path: Path) -> None:
    space = load_space(REPO / "sweep.yaml", REPO / "params.yaml")
    assert set(space.search) >= {"train.lr", "train.weight_decay", "train.batch_size"}
    assert space.fixed["train.epochs"] == 1
    (tmp_path / "params.yaml").write_text(committed_params_text())
    bad = write_space(tmp_path / "space.yaml", {**SPACE, "first": [{"train.lr": 0.5}]})
    with pytest.raises(SpaceError, match=r"first\[0\]\.train\.lr: 0\.5 is outside its search"):
        load_space(bad, tmp_path / "params.yaml")


def test_the_command_refuses_a_bad_space_before_any_study_or_training(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "repo")
    write_space(root / "space.yaml", {"search": {"train.lr": {"low": 0.1, "high": 0.01}}})
    result = subprocess.run([sys.executable, "-m", "tools.sweep", "run", "--study", "s", "--trials", "2", "--space",
                             "space.yaml"], cwd=root, env=project_env(), capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "sweep: space.yaml: search.train.lr: empty or inverted range: low 0.1 must be below high 0.01"]
    assert not (root / "optuna.db").exists() and not (root / ".dvc" / "tmp" / "sweep").exists()


def test_a_study_name_reused_with_another_space_or_budget_is_refused(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(committed_params_text())
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = load_space(write_space(tmp_path / "a.yaml", SPACE), tmp_path / "params.yaml")
    other = {**SPACE, "search": {**SPACE["search"], "train.lr": {"low": 1e-4, "high": 0.03, "log": True}}}
    second = load_space(write_space(tmp_path / "b.yaml", other), tmp_path / "params.yaml")
    study = open_study(url, "s", first, 4)
    assert study.user_attrs["budget"] == 4
    assert open_study(url, "s", first, None).user_attrs["budget"] == 4  # joining: the budget is the study's
    with pytest.raises(SweepError, match=r"study 's' in sqlite:///.* was made with another search space "
                                         r"\(differs in train\.lr\); name a new study"):
        open_study(url, "s", second, None)
    with pytest.raises(SweepError, match="study 's' has a budget of 4 trials, not 6"):
        open_study(url, "s", first, 6)
    with pytest.raises(SweepError, match="a password in the URL"):
        open_study("postgresql+psycopg2://optuna:secret@127.0.0.1:1/optuna", "s", first, 4)


# ---- slow: real sweeps on tiny data --------------------------------------------------------------------------------
def tiny_repo(folder: Path) -> Path:
    """A clone whose download output is tiny generated MNIST (committed with `dvc commit`), reproduced and committed:
    trials train for a few seconds. One thread per training: two workers share the 2 cores of the test machines."""
    root = copy_project(folder / "repo")
    params = shrunk_params(epochs=3, log_every=10, num_threads=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in tiny_arrays(n_train=2000, n_test=100).items():
        (raw / name).write_bytes(idx_bytes(array))
    dvc(root, "commit", "-f", "download")
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "tiny baseline")
    return root


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    return built_once(tmp_path_factory, worker_id, "sweep-tiny-baseline", tiny_repo)


def git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, env=project_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"git {args}: {result.stderr}"
    return result.stdout


def sweep(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.sweep", *args], cwd=root, env=project_env(**env),
                          capture_output=True, text=True)


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def by_state(trials: list[optuna.trial.FrozenTrial], *states: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state.name in states]


def sweep_runs(experiment: str, study: str) -> list[mlflow.entities.Run]:
    found = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([found.experiment_id], filter_string=f"tags.`{tag.SWEEP_STUDY}` = '{study}'",
                              output_format="list")


def check_runs(trials: list[optuna.trial.FrozenTrial], runs: list[mlflow.entities.Run]) -> None:
    """One FINISHED run per complete trial, the one its user attrs name; pruned ones KILLED and saying so; none
    RUNNING; no second run of a trial."""
    complete = by_state(trials, "COMPLETE")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["sweep.trial"] for r in finished) == sorted(str(t.number) for t in complete)
    assert {r.info.run_id for r in finished} == {t.user_attrs["mlflow_run_id"] for t in complete}
    assert all("result_key" in r.data.tags for r in finished)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for trial in by_state(trials, "PRUNED"):
        (run,) = [r for r in runs if r.data.tags["sweep.trial"] == str(trial.number)]
        assert run.info.status == "KILLED" and run.data.tags["sweep.pruned"] == "true"
        assert run.data.tags["mlflow.note.content"].startswith("Pruned by the sweep's pruner")


@pytest.mark.slow
def test_the_local_default_study_prunes_a_loser_and_its_best_applies_up_to_date(tiny_baseline: Path,
                                                                             tmp_path: Path) -> None:
    root = copy_workdir(tiny_baseline, tmp_path / "repo")
    space = {**SPACE, "first": [{"train.lr": 0.01, "train.batch_size": 32}, {"train.lr": 1e-6, "train.batch_size": 32}],
             "pruner": {"kind": "median", "startup_trials": 1}}
    write_space(root / "space.yaml", space)
    git(root, "add", "space.yaml")
    git(root, "commit", "-qm", "space")
    started = time.monotonic()
    result = sweep(root, "run", "--study", "local", "--trials", "3", "--space", "space.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"local study of 3 trials: {time.monotonic() - started:.0f} s")
    url = f"sqlite:///{root / 'optuna.db'}"
    trials = trials_of(url, "local")
    assert len(by_state(trials, "COMPLETE", "PRUNED")) == 3 and not by_state(trials, "RUNNING", "WAITING")
    pruned = trials[1]  # lr 1e-6: at chance while the first trial is far above it
    assert pruned.state.name == "PRUNED" and pruned.user_attrs["stopped_in_s"] < 10
    names = {t.user_attrs["dvc_experiment"] for t in by_state(trials, "COMPLETE")}
    assert names == {f"local-t{t.number}" for t in by_state(trials, "COMPLETE")}
    assert set(dvc(root, "exp", "list", "--name-only").stdout.split()) == names  # a pruned trial is no experiment
    assert git(root, "status", "--porcelain") == ""  # --temp: the workspace never changed
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    check_runs(trials, sweep_runs("mnist", "local"))

    shown = sweep(root, "best", "--study", "local", "--figures", "figures")
    assert shown.returncode == 0, shown.stderr
    best = max(by_state(trials, "COMPLETE"), key=lambda t: t.value)
    assert f"best: trial {best.number}, train.best_val_acc {best.value:.6f}" in shown.stdout
    assert f"MLflow run: {best.user_attrs['mlflow_run_id']}" in shown.stdout
    for figure in ("optimization_history", "param_importances"):
        assert (root / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Optuna's dashboard on the same storage, as docs/sweeps.md starts it: it lists the study and its trials.
    port = free_port()
    dashboard = [str(Path(sys.executable).with_name("optuna-dashboard")), "sqlite:///optuna.db", "--host",
                 "127.0.0.1", "--port", str(port)]
    with serving(["timeout", "300", *dashboard], port, "/api/studies", root, project_env()) as url:
        (summary,) = get_json(f"{url}/api/studies")["study_summaries"]
        assert summary["study_name"] == "local"
        listed = get_json(f"{url}/api/studies/{summary['study_id']}?after=0")["trials"]
        assert sorted(t["number"] for t in listed) == [t.number for t in trials]

    dvc(root, "exp", "apply", best.user_attrs["dvc_experiment"])
    out = dvc(root, "repro").stdout
    assert "Running stage 'train'" not in out
    assert "Data and pipelines are up to date." in dvc(root, "status").stdout


@pytest.mark.slow
def test_ctrl_c_on_a_worker_ends_its_trial_cleanly_and_the_study_resumes(tiny_baseline: Path, tmp_path: Path) -> None:
    root = copy_workdir(tiny_baseline, tmp_path / "repo")
    write_space(root / "space.yaml", TEAM_SPACE)
    git(root, "add", "space.yaml")
    git(root, "commit", "-qm", "space")
    args = ["--study", "stop", "--space", "space.yaml"]
    worker = start_worker(root, tmp_path / "w.log", *args, "--trials", "1")
    try:
        wait_for("the first report", lambda: training_reported(root))
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl+C: the terminal signals the worker's whole process group
        assert worker.wait(timeout=60) == 1
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    assert (tmp_path / "w.log").read_text().strip().splitlines()[-1] == (
        "sweep: interrupted: the running trial ended FAILED in the study and its MLflow run KILLED; the study is "
        "intact: run the same command to go on")
    url = f"sqlite:///{root / 'optuna.db'}"
    (stopped,) = trials_of(url, "stop")
    assert stopped.state.name == "FAIL"
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = sweep_runs("mnist", "stop")
    assert run.info.status == "KILLED" and run.data.tags["failure"].startswith("interrupted")
    assert git(root, "status", "--porcelain") == "" and dvc(root, "exp", "list", "--name-only").stdout == ""
    resumed = sweep(root, "run", *args)  # the same command, without the budget: the study's
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = trials_of(url, "stop")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    check_runs(trials, [r for r in sweep_runs("mnist", "stop") if r.data.tags["sweep.trial"] != "0"])


# ---- the team ----------------------------------------------------------------------------------------------------
def team_server(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.team_server", *args], cwd=REPO,
                          env=project_env(**env), capture_output=True, text=True)


@pytest.fixture(scope="module")
def server() -> Iterator[dict]:
    """A team server of these tests' own (tools.team_server on its own ports and folder): its MLflow login, its
    study storage and the pgpass file a teammate joins with."""
    program("initdb")
    data = Path(tempfile.mkdtemp(prefix="mnist-sweep-team-"))  # PostgreSQL runs as `postgres` under root
    data.chmod(0o711)
    port, db_port = free_port(), free_port()
    try:
        started = team_server("start", "--data", str(data), "--port", str(port), "--db-port", str(db_port),
                              "--stop-after", str(SELF_STOP_S), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
        assert started.returncode == 0, started.stdout + started.stderr
        storage = f"postgresql+psycopg2://optuna@127.0.0.1:{db_port}/optuna"
        assert f"sweep studies: --storage {storage}; a teammate puts the line of {data / 'sweep.pgpass'}" in (
            started.stdout)
        assert ADMIN_PASSWORD not in started.stdout
        pgpass = Path(tempfile.mkdtemp()) / "pgpass"  # a teammate's ~/.pgpass: the one line, mode 600
        shutil.copyfile(data / "sweep.pgpass", pgpass)
        pgpass.chmod(0o600)
        yield {"data": data, "storage": storage,
               "env": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "admin",
                       "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD, "PGPASSFILE": str(pgpass)}}
    finally:
        team_server("stop", "--data", str(data))
        shutil.rmtree(data, ignore_errors=True)


def team_clone(origin: Path, remote: Path, dest: Path, **env: str) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True, env=project_env())
    dvc(dest, "remote", "modify", "--local", "origin", "url", str(remote))
    dvc(dest, "pull", **env)
    return dest


def start_worker(clone: Path, log: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """A worker in a session of its own: its process group is what a crash takes down."""
    with log.open("w") as out:
        # Ctrl+C's signal as a terminal delivers it, whatever this test's caller ignored (a shell's background job
        # ignores SIGINT, and its children inherit that).
        return subprocess.Popen([sys.executable, "-m", "tools.sweep", "run", *args], cwd=clone,
                                env=project_env(**env), stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(what: str, check: object, timeout_s: float = 300) -> object:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.3)
    return found


def training_reported(clone: Path) -> bool:
    """Whether the worker's trial has trained up to its first report (its copy of the reports has a line)."""
    return any(path.stat().st_size > 0 for path in (clone / ".dvc" / "tmp" / "sweep").glob("sweep-*/reports.jsonl"))


@pytest.mark.slow
def test_two_workers_share_one_study_one_is_killed_and_the_budget_is_exact(server: dict, tiny_baseline: Path,
                                                                           tmp_path: Path) -> None:
    env = server["env"]
    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    solo = copy_workdir(tiny_baseline, tmp_path / "solo")
    write_space(solo / "space.yaml", TEAM_SPACE)
    git(solo, "add", "space.yaml")
    git(solo, "commit", "-qm", "space")
    git(solo, "remote", "add", "origin", str(origin))
    git(solo, "push", "-q", "origin", "HEAD:main")
    dvc(solo, "remote", "modify", "--local", "origin", "url", str(remote))
    dvc(solo, "push")
    subprocess.run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], cwd=origin, check=True)
    a, b = (team_clone(origin, remote, tmp_path / name) for name in ("a", "b"))
    args = ["--study", "team", "--storage", server["storage"], "--space", "space.yaml", "--heartbeat", "1",
            "--grace", "4"]
    started = time.monotonic()
    worker_a = start_worker(a, tmp_path / "a.log", *args, "--trials", "6", **env)
    wait_for("worker a's study", lambda: "budget 6 trials" in (tmp_path / "a.log").read_text(), 120)
    worker_b = start_worker(b, tmp_path / "b.log", *args, **env)  # joins: the budget is the study's
    try:
        wait_for("worker a's first report", lambda: training_reported(a))
        os.killpg(worker_a.pid, signal.SIGKILL)  # the worker, its dvc and its stage, as a crash takes them
        worker_a.wait()
        assert worker_b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()
    finally:
        for worker in (worker_a, worker_b):
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    print(f"team study of 6 trials, one worker killed: {time.monotonic() - started:.0f} s")
    log_b = (tmp_path / "b.log").read_text()
    assert "sweep: study 'team' has its 6 of 6 trials (6 complete, 0 pruned, 1 failed and not counted)" in log_b

    os.environ["PGPASSFILE"] = env["PGPASSFILE"]
    try:
        trials = trials_of(server["storage"], "team")
    finally:
        del os.environ["PGPASSFILE"]
    assert len(by_state(trials, "COMPLETE")) == 6
    (failed,) = by_state(trials, "FAIL")  # a's trial, failed by its stopped heartbeat
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == failed.params
    assert failed.user_attrs["machine"] and "mlflow_run_id" not in failed.user_attrs

    for key, value in env.items():
        os.environ[key] = value
    try:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])

        def ended() -> list[mlflow.entities.Run] | None:
            runs = sweep_runs("mnist", "team")
            return None if any(r.info.status == "RUNNING" for r in runs) else runs

        runs = wait_for("the killed trial's run to end", ended, 60)
        check_runs(trials, runs)
        (killed_run,) = [r for r in runs if r.data.tags["sweep.trial"] == str(failed.number)]
        assert killed_run.info.status == "KILLED"
    finally:
        for key in env:
            os.environ.pop(key, None)

    # A third clone pulls every trial's experiment from the team's remotes; the best applies, up to date.
    third = team_clone(origin, remote, tmp_path / "third", **env)
    names = [t.user_attrs["dvc_experiment"] for t in by_state(trials, "COMPLETE")]
    assert set(dvc(third, "exp", "list", "--name-only", "origin").stdout.split()) == set(names)
    for name in names:
        dvc(third, "exp", "pull", "origin", name)
    best = max(by_state(trials, "COMPLETE"), key=lambda t: t.value)
    dvc(third, "exp", "apply", best.user_attrs["dvc_experiment"])
    out = dvc(third, "repro", **env).stdout
    assert "Running stage 'train'" not in out and "record: already recorded as run" in out, out


@pytest.mark.slow
def test_postgresql_restarted_under_a_worker_counts_no_trial_twice(server: dict, tiny_baseline: Path,
                                                                   tmp_path: Path) -> None:
    env = server["env"]
    root = copy_workdir(tiny_baseline, tmp_path / "repo")
    write_space(root / "space.yaml", TEAM_SPACE)
    git(root, "add", "space.yaml")
    git(root, "commit", "-qm", "space")
    worker = start_worker(root, tmp_path / "w.log", "--study", "restart", "--storage", server["storage"], "--space",
                          "space.yaml", "--trials", "2", "--heartbeat", "1", "--grace", "8", **env)
    try:
        wait_for("the first report", lambda: training_reported(root))
        pg = server["data"] / "pg"
        # Its output to its log, as the team server starts it: the restarted server must not hold a pipe of ours.
        restart = [program("pg_ctl"), "restart", "-D", str(pg), "-m", "fast", "-w", "-t", "60", "-l",
                   str(pg / "postgres.log")]
        command = ["runuser", "-u", "postgres", "--", *restart] if os.geteuid() == 0 else restart
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        code = worker.wait(timeout=600)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    log = (tmp_path / "w.log").read_text()
    os.environ["PGPASSFILE"] = env["PGPASSFILE"]
    try:
        trials = trials_of(server["storage"], "restart")
    finally:
        del os.environ["PGPASSFILE"]
    print(f"PostgreSQL restarted under a worker: it exited {code}; its last line: {log.strip().splitlines()[-1]}")
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    if code == 0:  # reconnected: the study is whole
        assert len(by_state(trials, "COMPLETE")) == 2, log
    else:  # or stopped, in one line naming the database
        assert "Traceback" not in log, log
        last = log.strip().splitlines()[-1]
        assert last.startswith(f"sweep: study storage {server['storage']}"), log
        assert len(by_state(trials, "COMPLETE")) <= 2


def test_the_benchmark_gives_dvc_queue_the_grid_of_the_same_ranges() -> None:
    from benchmarks.sweep import grid

    args, budget = grid(REPO / "sweep.yaml")
    assert budget == 8  # two values of each of the three searched params
    assert args == ["-S", "train.epochs=1", "-S", "train.log_every=50",
                    "-S", "train.lr=0.00234,0.012819",  # a quarter and three quarters into the log range
                    "-S", "train.weight_decay=0.05,0.15", "-S", "train.batch_size=128,512"]
