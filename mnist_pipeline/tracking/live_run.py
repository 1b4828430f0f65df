"""Training curves in MLflow while train runs: a helper process that owns the result's run and tails the reports.

The train stage starts the helper first thing, so that MLflow loads there while torch loads in the stage (a second
or more each, in parallel on two cores), and waits until the run exists before its loop, so that MLflow's start-up
does not share the CPU with the loop. The first training process appends each report to a file; the helper logs
what appears there every half second, with a heartbeat (tracking/heartbeat.py). The stage tells the helper how the
training ended; a stage that dies without a word (SIGKILL) closes its pipe, and the helper ends the run KILLED.
The helper runs in a session of its own so that a signal to the stage's process group does not take it too. When
the store stops answering, the helper says so in one line and keeps the reports; when it answers again, the curves
resume. record later completes the run with the test metrics, figures and model: one run per result (train notes
the run's id beside the model, machine.LIVE_RUN_ENV). Train itself never imports MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_pipeline.errors import first_line, interrupted
from mnist_pipeline.machine import LIVE_RUN_ENV

if TYPE_CHECKING:
    from mnist_pipeline.reports import LogRow

REPORTS_ENV = "MNIST_LIVE_REPORTS"  # the file the first training process appends its reports to
# A second file the reports are appended to, live run or not: a sweep worker feeds its pruner from it (tools/sweep.py)
REPORTS_COPY_ENV = "MNIST_REPORTS_COPY"
SWITCH_ENV = "MNIST_LIVE_CURVES"  # "off": no run during training (record makes the run afterwards)
# How long the stage waits for the helper's run before it trains without one: MLflow's start and a run's creation
# take seconds; a store that takes connections and never answers would hold the training for MLflow's retries.
START_TIMEOUT_S = 60
END_TIMEOUT_S = 60  # how long the stage waits for the helper to end the run (it retries a silent store for 30 s)
LIVE_FOLDER_PREFIX = "mnist-live-"  # then the training's pid: a folder whose process is gone is a left-over
PROJECT = str(Path(__file__).resolve().parents[2])  # where the helper imports this package from, whatever the cwd


def append_report(row: LogRow) -> None:
    """Hand one report to the helper, if this process trains for a live run (the first process only), and to the
    file REPORTS_COPY_ENV names, if set."""
    # To the 6 decimals of reports/train_log.csv: MLflow's curves are the numbers `dvc plots` draws.
    values = {key: float(f"{value:.6f}") if isinstance(value, float) else value for key, value in asdict(row).items()}
    for path in filter(None, (os.environ.get(REPORTS_ENV), os.environ.get(REPORTS_COPY_ENV))):
        with open(path, "a") as file:
            file.write(json.dumps(values) + "\n")


class Helper:
    """The helper process, started before the stage loads torch: it loads MLflow, then waits for the run's details."""

    def __init__(self, folder: Path) -> None:
        self.reports = folder / "reports.jsonl"
        self.reports.touch()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline.tracking.live_helper", str(self.reports)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PROJECT, os.environ.get("PYTHONPATH")]))},
        )
        self.told = False  # sent the run's details: from then on it may have a run, which it ends as told

    def tell(self, message: dict[str, object]) -> bool:
        """One line to the helper; False when it is gone (its MLflow failed to load, an OOM kill)."""
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Gone. A helper never told of a training (the stage failed first) has made no run: killed at once, not
        waited for while MLflow loads; one told ends with its stdin, after it ended its run."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if not self.told:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # its session: MLflow's own children go too
        try:
            self.process.wait(timeout=END_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process.stdout.close()


@contextmanager
def helper_started() -> Iterator[Helper | None]:
    """The live run's helper, loading MLflow from now on, for the block; None when MNIST_LIVE_CURVES=off."""
    if os.environ.get(SWITCH_ENV, "").lower() == "off":
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"{LIVE_FOLDER_PREFIX}{os.getpid()}-", dir=live_folders()) as folder:
        helper = Helper(Path(folder))
        try:
            yield helper
        finally:
            helper.close()


class LiveRun:
    """The stage's side: learn the helper's run, tell it the end."""

    def __init__(self, helper: Helper, run_id: str, name: str) -> None:
        self.helper, self.run_id, self.name = helper, run_id, name

    @classmethod
    def start(cls, helper: Helper, experiment: str, outputs: list[Path], params: dict[str, object],
              tags: dict[str, str]) -> LiveRun | str:
        """The live run, or why there is none (one line; training goes on and record makes the run later)."""
        process, helper.told = helper.process, True
        if not helper.tell({"experiment": experiment, "outputs": [str(p) for p in outputs], "tags": tags,
                            "params": {k: str(v) for k, v in params.items()}}):
            return "its helper process ended without a word"
        try:
            answered = select.select([process.stdout], [], [], START_TIMEOUT_S)[0]
        except KeyboardInterrupt as err:  # Ctrl+C or SIGTERM while the store makes the run: it ends KILLED, saying so
            helper.tell({"end": "KILLED", "cause": interrupted(err), "model_sha256": ""})
            raise
        if not answered:
            os.killpg(process.pid, signal.SIGKILL)  # its session: MLflow's own children go too
            process.wait()
            return f"the store made no run within {START_TIMEOUT_S} s"
        answer = process.stdout.readline().split()
        if answer[:1] != ["ready"]:
            process.kill()
            process.wait()
            return " ".join(answer[1:]) or "its helper process ended without a word"
        os.environ[REPORTS_ENV] = str(helper.reports)  # torchrun's processes inherit it
        os.environ[LIVE_RUN_ENV] = answer[1]
        return cls(helper, answer[1], answer[2])

    def where(self) -> str:
        return f"MLflow run '{self.name}' ({self.run_id})"

    def end(self, status: str, cause: str = "", model_sha256: str = "") -> None:
        """Tell the helper how the training ended (FINISHED, FAILED, KILLED) and wait for it to log the rest.

        A finished training names its model file, by which record finds this run to complete it.
        """
        if self.helper.process.stdin.closed:  # told already
            return
        # A helper gone already (its store failed) has nothing more to hear: tell() says False, and close() reaps it.
        self.helper.tell({"end": status, "cause": cause, "model_sha256": model_sha256})
        self.helper.close()
        os.environ.pop(REPORTS_ENV, None)
        os.environ.pop(LIVE_RUN_ENV, None)


def live_folders() -> Path:
    """Where the live runs' report files go: the repo's DVC temp folder (DVC_ROOT's, so a --temp or queued
    experiment's too), else the system's; left-overs of trainings killed with everything (SIGKILL of the whole
    tree) are removed here, by the next training, once the process that made them is gone."""
    dvc_tmp = Path(os.environ.get("DVC_ROOT") or os.getcwd()) / ".dvc" / "tmp"
    parent = dvc_tmp if dvc_tmp.parent.is_dir() else Path(tempfile.gettempdir())
    parent.mkdir(exist_ok=True)
    for stale in parent.glob(f"{LIVE_FOLDER_PREFIX}*-*"):
        pid = stale.name.removeprefix(LIVE_FOLDER_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return parent


@contextmanager
def live_run(experiment: str, outputs: list[Path], params: dict[str, object], tags: dict[str, str],
             helper: Helper | None) -> Iterator[LiveRun | None]:
    """A live run around a training, made by `helper` (helper_started): FINISHED when the block completes, KILLED or
    FAILED when it raises.

    None when there is no helper (MNIST_LIVE_CURVES=off), or when the store cannot take a run now (said in one
    line: the training goes on, and record makes the run once the result is complete).
    """
    if helper is None:
        yield None
        return
    live = LiveRun.start(helper, experiment, outputs, params, tags)
    if isinstance(live, str):
        print(f"train: no live curves in MLflow ({live}); record logs them with the result", file=sys.stderr)
        yield None
        return
    try:
        yield live
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM as errors.run_stage raises it
        live.end("KILLED", interrupted(err))
        raise
    except BaseException as err:
        live.end("FAILED", first_line(str(err)) or type(err).__name__)
        raise
    live.end("FINISHED")
