"""Hyper-parameter sweeps on Optuna: every trial a DVC experiment of this clone, with its one MLflow run.

    python -m tools.sweep run --study lr-wd --trials 8          # here, the study in optuna.db (git-ignored)
    python -m tools.sweep run --study lr-wd --trials 8 --storage postgresql+psycopg2://optuna@10.0.0.5:5433/optuna
    python -m tools.sweep best --study lr-wd --figures sweep-figures

The search space is a committed file (sweep.yaml). Each trial is `dvc exp run --temp -n <study>-t<number>` with the
trial's params as -S: the workspace never changes, so a stopped trial leaves nothing behind in it. The train stage
copies each report to a file this worker reads (MNIST_REPORTS_COPY): the validation accuracy feeds Optuna's pruner,
and a pruned trial's training is stopped by SIGTERM. The objective is `train.best_val_acc`, never the test accuracy.
The budget is the study's, not the worker's: it ends with exactly that many COMPLETE + PRUNED trials, however many
workers join (docs/sweeps.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import PipelineError, first_line, interrupt, text_lines
from mnist_pipeline.search_space import SPACE_FILE, Space, load_space
from mnist_pipeline.tracking import tag
from mnist_pipeline.tracking.live_run import REPORTS_COPY_ENV
from mnist_pipeline.tracking.result import RUN_TAGS_ENV

STORAGE_ENV = "MNIST_SWEEP_STORAGE"
LOCAL_STORAGE = "sqlite:///optuna.db"  # in the repo root, git-ignored like mlflow.db
OBJECTIVE = "train.best_val_acc"
POLL_S = 0.5
STOP_TIMEOUT_S = 60
HEARTBEAT_S, GRACE_S = 10, 30
MAX_RETRY = 3  # a trial whose worker died is run again at most this often


class SweepError(PipelineError):
    """A sweep that cannot go on, in one line."""


class TrialFailed(SweepError):
    """A trial whose `dvc exp run` failed (a recipe that does not learn, a stage's error): FAIL in the study, not
    counted in the budget; the worker goes on, unless MAX_FAILURES trials in a row failed so."""


MAX_FAILURES = 3


# ---- the storage and its lock --------------------------------------------------------------------------------------
def shown(url: str) -> str:
    """A storage URL as messages show it: never with a password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class BudgetLock:
    """One worker at a time between counting the study's trials and creating the next one: a PostgreSQL advisory
    lock on the study's database (every machine), a file lock beside a SQLite study (one machine)."""

    def __init__(self, url: str, study: str) -> None:
        from sqlalchemy.engine import make_url

        self.url, self.key, self.held = make_url(url), f"mnist-sweep:{study}", False
        self.connection: Any = None
        if self.url.get_backend_name() == "sqlite":
            from filelock import FileLock

            self.file = FileLock(f"{self.url.database}.lock")

    def acquire(self) -> None:
        if self.url.get_backend_name() == "sqlite":
            self.file.acquire()
        else:
            import psycopg2

            deadline = time.monotonic() + 60
            while True:
                try:
                    if self.connection is None or self.connection.closed:
                        u = self.url  # the password from ~/.pgpass or PGPASSFILE, as libpq reads it
                        self.connection = psycopg2.connect(host=u.host, port=u.port, user=u.username,
                                                           dbname=u.database, password=u.password, connect_timeout=10)
                        self.connection.autocommit = True
                    with self.connection.cursor() as cursor:
                        cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", (self.key,))
                    break
                except psycopg2.Error as err:
                    if self.connection is not None:
                        self.connection.close()
                    if not unreachable(err) or time.monotonic() > deadline:  # a restart is waited out for 60 s
                        raise SweepError(f"study storage {shown(str(self.url))}: "
                                         f"{' '.join(str(err).split())}") from None
                    time.sleep(1)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.url.get_backend_name() == "sqlite":
            self.file.release()
        else:
            import psycopg2

            try:
                with self.connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.key,))
            except psycopg2.Error:  # the connection is gone: so is the lock, with the session that held it
                self.connection.close()


def storage(url: str, heartbeat_s: int, grace_s: int) -> Any:
    """Optuna's RDB storage with heartbeats: a trial whose worker stops beating for grace_s is failed by the next
    worker that asks for a trial, and run again (RetryHeartbeatStaleTrialCallback)."""
    import optuna
    from sqlalchemy.engine import make_url

    if make_url(url).password:
        raise SweepError(f"study storage {shown(url)}: a password in the URL shows in `ps` and shell history; put it "
                         "in ~/.pgpass (mode 600) or the file PGPASSFILE names (tools.team_server writes that line)")
    kwargs = {"pool_pre_ping": True} if make_url(url).get_backend_name() == "postgresql" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            store = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the driver's errors: one line naming the database
            raise SweepError(f"study storage {shown(url)}: {first_line(str(err))[:300]}") from None
    beat = store.record_heartbeat
    # Optuna's heartbeat thread ends at its first error, and its trial would then be failed as stale while it runs:
    # a database restart is waited out for half the grace period instead.
    store.record_heartbeat = lambda trial_id: retrying(lambda: beat(trial_id), "heartbeat", url, grace_s / 2)
    return store


def database_cause(err: BaseException) -> BaseException | None:
    """The database driver's error behind an error (Optuna wraps SQLAlchemy's in StorageInternalError), if any."""
    from sqlalchemy.exc import DBAPIError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, DBAPIError):
            return seen.orig or seen
        seen = seen.__cause__ or seen.__context__
    return None


def unreachable(cause: BaseException) -> bool:
    """Whether a driver's error says the database cannot be reached now (restarting, down, connection lost)."""
    import psycopg2
    import sqlite3

    refused = ("authentication failed", "does not exist", "no password supplied", "permission denied")
    return (isinstance(cause, (psycopg2.OperationalError, psycopg2.InterfaceError))
            and not any(words in str(cause) for words in refused)) or (
        isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause))


def retrying(call: Callable[[], Any], what: str, url: str, patience_s: float = 60) -> Any:
    """A call to the study's database, tried again while the database is unreachable (a restart: SQLAlchemy's pool
    reconnects), for `patience_s`; then one line naming the database."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except Exception as err:
            cause = database_cause(err)
            if cause is None:
                raise
            if not unreachable(cause):
                raise SweepError(f"study storage {shown(url)}: {what}: {first_line(str(cause))}") from None
            if time.monotonic() > deadline:
                raise SweepError(f"study storage {shown(url)}: unreachable for {patience_s:.0f} s ({what}): "
                                 f"{first_line(str(cause))}") from None
            time.sleep(1)


def make_pruner(space: Space) -> Any:
    import optuna

    p = space.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_iterations)
    if p.kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, n_warmup_steps=p.warmup_iterations)
    return optuna.pruners.NopPruner()


def open_study(url: str, name: str, space: Space | None, budget: int | None, heartbeat_s: int = HEARTBEAT_S,
               grace_s: int = GRACE_S) -> Any:
    """The study `name`, created with this space and budget, or joined: a study made with another space or budget
    is refused in one line."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its lines for failed trials repeat ours, with tracebacks
    store = storage(url, heartbeat_s, grace_s)
    if space is None:  # reading it only
        try:
            return optuna.load_study(study_name=name, storage=store)
        except KeyError:
            raise SweepError(f"study storage {shown(url)}: no study {name!r}") from None
    study = optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(n_startup_trials=3), pruner=make_pruner(space))
    lock = BudgetLock(url, name)
    lock.acquire()  # two workers creating one study: the first writes its space and budget, the second compares
    try:
        attrs = study.user_attrs
        if "space" not in attrs:
            if budget is None:
                raise SweepError(f"study {name!r} is new: give its budget with --trials")
            study.set_user_attr("space", space.fingerprint())
            study.set_user_attr("budget", budget)
            for point in space.first:
                study.enqueue_trial(point, skip_if_exists=True)
        elif attrs["space"] != space.fingerprint():
            theirs, ours = json.loads(attrs["space"]), json.loads(space.fingerprint())
            differ = sorted(k for part in ("fixed", "search") for k in {**theirs[part], **ours[part]}
                            if theirs[part].get(k) != ours[part].get(k))
            raise SweepError(f"study {name!r} in {shown(url)} was made with another search space (differs in "
                             f"{', '.join(differ)}); name a new study, or use the space it was made with")
        elif budget is not None and budget != attrs["budget"]:
            raise SweepError(f"study {name!r} has a budget of {attrs['budget']} trials, not {budget}; leave out "
                             "--trials to join it")
    finally:
        lock.release()
    return study


def counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


# ---- one trial ------------------------------------------------------------------------------------------------------
def suggest(trial: Any, space: Space) -> dict[str, Any]:
    values = dict(space.fixed)
    for key, dim in space.search.items():
        if dim.choices:
            values[key] = trial.suggest_categorical(key, list(dim.choices))
        elif isinstance(dim.low, int) and isinstance(dim.high, int):
            values[key] = trial.suggest_int(key, dim.low, dim.high, log=dim.log)
        else:
            values[key] = trial.suggest_float(key, float(dim.low), float(dim.high), log=dim.log)
    return values


def stage_processes(root: int) -> list[Any]:
    """The pipeline's stage processes under `root` (python -m stages.<name>): not DVC, not its shell, not the live
    run's helper, which ends the run as the stage tells it."""
    import psutil

    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd[:-1] and cmd[cmd.index("-m") + 1].startswith("stages."):
            found.append(child)
    return found


def stop_trial(process: subprocess.Popen[str]) -> float:
    """Stop a trial's training as Ctrl+C would (SIGTERM to its stage: its live run ends KILLED, its temporary files
    go) and wait for DVC to end; the seconds it took."""
    start = time.monotonic()
    for child in stage_processes(process.pid):
        try:
            child.send_signal(signal.SIGTERM)
        except Exception:  # noqa: BLE001 - gone already
            pass
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return time.monotonic() - start


def read_reports(path: Path, done: int) -> tuple[list[dict], int]:
    """The complete report lines after byte `done`, and where they end."""
    try:
        with path.open() as file:
            file.seek(done)
            text = file.read()
    except FileNotFoundError:
        return [], done
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], done + len(complete.encode())


def git_out(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def experiment_value(name: str) -> float:
    """train.best_val_acc of the experiment `name` as its commit holds it (reports/train.json)."""
    refs = [r for r in git_out("for-each-ref", "--format=%(refname)", "refs/exps").split() if r.endswith(f"/{name}")]
    if not refs:
        raise SweepError(f"experiment {name}: DVC made no commit of it (see its log)")
    summary = json.loads(git_out("show", f"{refs[0]}:reports/train.json"))
    return float(summary["train"]["best_val_acc"])


def mlflow_client(experiment: str) -> tuple[Any, str]:
    import logging

    import mlflow

    from mnist_pipeline.tracking import mlflow_store
    from mnist_pipeline.tracking.store import resolve_store

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    store = resolve_store()
    with mlflow_store.store_errors(store, "the trial's run is not tagged"):
        return mlflow.MlflowClient(), mlflow_store.configure(store, experiment)


def trial_runs(experiment: str, study: str, number: int) -> list[Any]:
    client, experiment_id = mlflow_client(experiment)
    return client.search_runs([experiment_id], filter_string=(f"tags.`{tag.SWEEP_STUDY}` = '{study}' and "
                                                             f"tags.`{tag.SWEEP_TRIAL}` = '{number}'"))


# What the record stage prints (tracking/recording.py, stages/record.py): the run's id, without MLflow's start-up here.
RECORD_LINE = re.compile(r"^record: (?:MLflow run|already recorded as run) '[^']*' \(([0-9a-f]{32})\)", re.M)


def recorded_run(experiment: str, study: str, number: int, name: str, log: Path) -> str | None:
    """The FINISHED run of a completed trial: as record printed it in the trial's log; else the one tagged with the
    trial, or (a result recorded before, restored from DVC's run-cache) the run whose dvc.names lists its experiment."""
    printed = RECORD_LINE.findall(log.read_text(errors="replace"))
    if printed:
        return printed[-1]
    finished = [r for r in trial_runs(experiment, study, number) if r.info.status == "FINISHED"
                and tag.RESULT_KEY in r.data.tags]
    if finished:
        return finished[0].info.run_id
    client, experiment_id = mlflow_client(experiment)
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{tag.NAMES}` LIKE '% {name}%'"):
        if any(line.split(" ", 1)[-1] == name for line in run.data.tags[tag.NAMES].splitlines()):
            return run.info.run_id
    return None


def mark_pruned(experiment: str, study: str, number: int, iteration: int, value: float) -> str | None:
    """Tag the trial's run as pruned (it ended KILLED when its stage stopped); its id."""
    client, _ = mlflow_client(experiment)
    runs = trial_runs(experiment, study, number)
    for run in runs:
        if run.info.status == "RUNNING":  # the stage had not handed it over yet: it ends here
            client.set_terminated(run.info.run_id, "KILLED")
        note = (f"Pruned by the sweep's pruner: trial {number} of study `{study}` stopped at iteration {iteration} "
                f"(validation accuracy {value:.4f}); not recorded, no model registered.")
        client.set_tag(run.info.run_id, tag.SWEEP_PRUNED, "true")
        client.set_tag(run.info.run_id, tag.NOTE, note)
    return runs[0].info.run_id if runs else None


class Worker:
    """Runs trials of one study in this clone, one at a time."""

    def __init__(self, study: Any, space: Space, experiment: str, push: bool, log_dir: Path, url: str,
                 say: Callable[[str], None] = print) -> None:
        self.study, self.space, self.experiment, self.push, self.log_dir = study, space, experiment, push, log_dir
        self.url = url
        self.say = say
        self.failures: list[str] = []  # the trials that failed in a row, in words
        self.lock: BudgetLock | None = None

    def objective(self, trial: Any) -> float:
        import optuna

        if self.lock is not None:
            self.lock.release()  # the trial exists (RUNNING): the next worker may count it and ask
        name = f"{self.study.study_name}-t{trial.number}"
        values = suggest(trial, self.space)
        trial.set_user_attr("dvc_experiment", name)
        trial.set_user_attr("machine", socket.gethostname())
        with tempfile.TemporaryDirectory(prefix="sweep-", dir=self.log_dir) as folder:
            reports = Path(folder) / "reports.jsonl"
            log = self.log_dir / f"{name}.log"
            env = {**os.environ, REPORTS_COPY_ENV: str(reports),
                   RUN_TAGS_ENV: json.dumps({tag.SWEEP_STUDY: self.study.study_name,
                                             tag.SWEEP_TRIAL: str(trial.number)}),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name,
                       *[arg for k, v in values.items() for arg in ("-S", f"{k}={v}")]]
            shown_values = ", ".join(f"{k}={v}" for k, v in values.items() if k in self.space.search)
            self.say(f"sweep: trial {trial.number} ({name}) starts: {shown_values}")
            with log.open("w") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
            done, pruned_at = 0, None
            try:
                while process.poll() is None:
                    time.sleep(POLL_S)
                    rows, done = read_reports(reports, done)
                    for row in rows:
                        retrying(lambda: trial.report(float(row["val_acc"]), int(row["iteration"])), "report",
                                 self.url)
                        if retrying(trial.should_prune, "pruner", self.url):
                            pruned_at = row
                            break
                    if pruned_at is not None:
                        seconds = stop_trial(process)
                        trial.set_user_attr("stopped_in_s", round(seconds, 2))
                        break
                if pruned_at is None:  # the reports made after the last look: the trial's whole curve in Optuna
                    for row in read_reports(reports, done)[0]:
                        retrying(lambda: trial.report(float(row["val_acc"]), int(row["iteration"])), "report",
                                 self.url)
            except BaseException:  # Ctrl+C, SIGTERM, a storage error: the training stops with the worker
                stop_trial(process)
                raise
        if pruned_at is not None:
            self.failures.clear()
            run_id = mark_pruned(self.experiment, self.study.study_name, trial.number, int(pruned_at["iteration"]),
                                 float(pruned_at["val_acc"]))
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
            self.say(f"sweep: trial {trial.number} ({name}) pruned at iteration {pruned_at['iteration']} "
                     f"(val acc {pruned_at['val_acc']:.4f}), stopped in {seconds:.1f} s; its MLflow run ended KILLED")
            raise optuna.TrialPruned(f"val_acc {pruned_at['val_acc']} at iteration {pruned_at['iteration']}")
        if process.returncode != 0:
            lines = text_lines(log.read_text(errors="replace"))
            # A stage's own one line (`error: ...`) says why; DVC's ERROR lines only say which stage failed.
            why = next((line for line in lines if line.startswith("error:")), None) or next(
                (line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no output")
            self.failures.append(f"trial {trial.number} ({name}): dvc exp run failed: {why} (log: {log})")
            self.say(f"sweep: {self.failures[-1]}; the trial is FAIL, not counted")
            raise TrialFailed(self.failures[-1])
        self.failures.clear()
        value = experiment_value(name)
        run_id = recorded_run(self.experiment, self.study.study_name, trial.number, name, log)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        pushed = ""
        if self.push:
            # No prompt for a login (a public clone's origin): git fails at once, and the trial says it in one line.
            result = subprocess.run([sys.executable, "-m", "dvc", "exp", "push", "origin", name], capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PATH": env["PATH"], "GIT_TERMINAL_PROMPT": "0"})
            pushed = "; pushed to origin" if result.returncode == 0 else (
                f"; NOT pushed ({first_line(result.stderr or result.stdout)}): `dvc exp push origin {name}` later")
            trial.set_user_attr("pushed", result.returncode == 0)
        self.say(f"sweep: trial {trial.number} ({name}) complete: {OBJECTIVE} {value:.6f}, MLflow run {run_id}{pushed}")
        return value

    def work(self, budget: int, wait_s: float = 2.0) -> dict[str, int]:
        """Trials until the study holds `budget` COMPLETE + PRUNED ones. Counting and asking happen under the
        budget lock, and a trial RUNNING elsewhere holds its place: workers wait for it (or fail it when its
        heartbeat stops, and run it again) rather than start one past the budget."""
        import optuna

        url = self.url
        self.lock = BudgetLock(url, self.study.study_name)
        while True:
            self.lock.acquire()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retrying(lambda: optuna.storages.fail_stale_trials(self.study), "failing stale trials", url)
                now = retrying(lambda: counts(self.study), "counting trials", url)
                finished = now["COMPLETE"] + now["PRUNED"]
                if finished >= budget:
                    return now
                if finished + now["RUNNING"] < budget:
                    self.study.optimize(self.objective, n_trials=1, catch=(TrialFailed,))  # it releases the lock
                    if len(self.failures) >= MAX_FAILURES:
                        raise SweepError(f"{len(self.failures)} trials in a row failed, the last: {self.failures[-1]}")
                    continue
            finally:
                self.lock.release()
            time.sleep(wait_s)  # the last trials run elsewhere


def in_repo_root() -> None:
    if not Path("dvc.yaml").is_file() or not Path(".git").exists():
        raise SweepError("run it in the root of a clone of the project (where dvc.yaml is)")


def has_origin() -> bool:
    return subprocess.run(["git", "remote", "get-url", "origin"], capture_output=True).returncode == 0


def run_command(args: argparse.Namespace) -> None:
    from mnist_pipeline.params import load_params

    in_repo_root()
    space = load_space(args.space, split=Path("data/split"))
    params = load_params()
    url = args.storage or os.environ.get(STORAGE_ENV) or LOCAL_STORAGE
    study = open_study(url, args.study, space, args.trials, args.heartbeat, args.grace)
    budget = int(study.user_attrs["budget"])
    log_dir = Path(".dvc/tmp/sweep").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    push = has_origin() and not args.no_push
    worker = Worker(study, space, params.mlflow.experiment, push, log_dir, url,
                    say=lambda line: print(line, flush=True))
    print(f"sweep: study {args.study!r} in {shown(url)}: budget {budget} trials; this worker on "
          f"{socket.gethostname()} (pid {os.getpid()})", flush=True)
    now = worker.work(budget)
    print(f"sweep: study {args.study!r} has its {now['COMPLETE'] + now['PRUNED']} of {budget} trials "
          f"({now['COMPLETE']} complete, {now['PRUNED']} pruned, {now['FAIL']} failed and not counted)")


def best_command(args: argparse.Namespace) -> None:
    url = args.storage or os.environ.get(STORAGE_ENV) or LOCAL_STORAGE
    study = open_study(url, args.study, None, None)
    now = counts(study)
    try:
        best = study.best_trial
    except ValueError:
        raise SweepError(f"study {args.study!r}: no complete trial yet ({now['RUNNING']} running)") from None
    print(f"study {args.study!r} in {shown(url)}: {now['COMPLETE']} complete, {now['PRUNED']} pruned, "
          f"{now['FAIL']} failed, {now['RUNNING']} running; budget {study.user_attrs.get('budget')}")
    print(f"best: trial {best.number}, {OBJECTIVE} {best.value:.6f}")
    for key, value in best.params.items():
        print(f"  {key} = {value}")
    print(f"  DVC experiment: {best.user_attrs.get('dvc_experiment')} (`dvc exp apply "
          f"{best.user_attrs.get('dvc_experiment')}`)")
    print(f"  MLflow run: {best.user_attrs.get('mlflow_run_id')}")
    if args.figures:
        for line in write_figures(study, args.figures):
            print(line)


def write_figures(study: Any, folder: Path) -> list[str]:
    """The optimisation history and the params' importances (Optuna's fANOVA) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        for name, draw in (("optimization_history", plots.plot_optimization_history),
                           ("param_importances", plots.plot_param_importances)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:
                lines.append(f"{name}: not drawn ({first_line(str(err))})")
                continue
            path = folder / f"{name}.png"
            axes.figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
            lines.append(f"wrote {path}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "best"))
    parser.add_argument("--study", required=True, help="the study's name; trials are DVC experiments <study>-t<n>")
    parser.add_argument("--storage", help=f"Optuna storage URL (or ${STORAGE_ENV}; default {LOCAL_STORAGE})")
    parser.add_argument("--space", type=Path, default=Path(SPACE_FILE), help="the search space file")
    parser.add_argument("--trials", type=int, help="run: the study's budget, when it is new")
    parser.add_argument("--no-push", action="store_true", help="run: do not `dvc exp push origin` each trial")
    parser.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, help="run: seconds between heartbeats")
    parser.add_argument("--grace", type=int, default=GRACE_S,
                        help="run: seconds without a heartbeat after which a trial is failed and run again")
    parser.add_argument("--figures", type=Path, help="best: write the study's figures (PNG) into this folder")
    args = parser.parse_args()
    if args.trials is not None and args.trials < 1:
        raise SweepError(f"--trials must be at least 1, got {args.trials}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        run_command(args) if args.command == "run" else best_command(args)
    except PipelineError as err:  # a bad space, a study that cannot be joined, a store's error: one line
        sys.exit(f"sweep: {err}")
    except Exception as err:  # Optuna's own calls to the database (asking for a trial, telling its result)
        from optuna.exceptions import UpdateFinishedTrialError

        url = args.storage or os.environ.get(STORAGE_ENV) or LOCAL_STORAGE
        if isinstance(err, UpdateFinishedTrialError):
            sys.exit(f"sweep: study storage {shown(url)}: {first_line(str(err))}: another worker failed this trial "
                     "while its heartbeat could not reach the database; it is run again, its result not counted")
        cause = database_cause(err)
        if cause is None:
            raise
        sys.exit(f"sweep: study storage {shown(url)}: {first_line(str(cause))[:300]}")
    except KeyboardInterrupt:
        sys.exit("sweep: interrupted: the running trial ended FAILED in the study and its MLflow run KILLED; the study "
                 "is intact: run the same command to go on")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
