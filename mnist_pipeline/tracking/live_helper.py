"""The live run's helper process (tracking/live_run.py starts it): create the run, log the reports as they come with
a heartbeat, end the run as told; say it in one line when the store stops answering and when it answers again."""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from pathlib import Path

from mnist_pipeline import import_gc

# Asked once per call, not MLflow's minutes of retries: a store that does not answer is said at once and asked again.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
if __name__ == "__main__":  # the training waits for this process's run: MLflow loads with the collector paused
    import_gc.pause()

import mlflow  # noqa: E402 - after the variables above, which MLflow reads as it loads
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from mnist_pipeline.errors import first_line  # noqa: E402
from mnist_pipeline.tracking import mlflow_store, tag  # noqa: E402
from mnist_pipeline.tracking.heartbeat import BEAT_EVERY_S, beat, end_dead_runs  # noqa: E402
from mnist_pipeline.tracking.recorded import recorded_model  # noqa: E402
from mnist_pipeline.tracking.recording import mark_repeat  # noqa: E402
from mnist_pipeline.tracking.result import run_name, run_tags  # noqa: E402
from mnist_pipeline.tracking.store import resolve_store  # noqa: E402

POLL_S = 0.5
RETRY_S = 5.0  # how often a store that stopped answering is asked again
END_TRIES_S = 30.0  # how long the end of the run is retried before the helper leaves it to record
CURVES = ("train_acc", "train_loss", "val_acc")
END_TAGS = {"FINISHED": tag.TRAINED, "FAILED": tag.FAILED, "KILLED": tag.KILLED}
BATCH_METRICS = 900  # under MLflow's 1000 entries per log_batch, with room for the tags


def say(line: str) -> None:
    """One line to the stage's output (stderr, which the helper shares with it); none once the stage is gone."""
    try:
        print(f"train: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass


class Curves:
    """What the helper owes the run: the reports not yet in the store, the heartbeat; and whether the store answers."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str, reports: Path, note: str, where: str) -> None:
        self.client, self.run_id, self.reports, self.note, self.where = client, run_id, reports, note, where
        self.read_to, self.partial, self.pending = 0, "", []
        self.beaten = self.asked = 0.0
        self.down: str | None = None  # why the store stopped answering, while it does not answer

    def read(self) -> None:
        """The reports appended since the last read, as metrics waiting for the store."""
        with self.reports.open() as file:
            file.seek(self.read_to)
            self.partial += file.read()
            self.read_to = file.tell()
        *lines, self.partial = self.partial.split("\n")  # a line not yet complete waits
        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(row[key]), now, int(row["iteration"]))
                         for row in map(json.loads, lines) for key in CURVES]

    def send(self, tags: list[RunTag] | None = None, now: bool = False) -> bool:
        """Send what waits, with a heartbeat when due; whether all of it is in the store. A store that is down is
        asked again every RETRY_S (at once when `now`)."""
        clock = time.monotonic()
        if self.down and not now and clock - self.asked < RETRY_S:
            return False
        tags = list(tags or [])
        if self.down or now or clock - self.beaten >= BEAT_EVERY_S:
            tags.append(RunTag(tag.HEARTBEAT, beat()))
        try:
            if self.down:
                self.reopen()
            while self.pending or tags:
                self.client.log_batch(self.run_id, metrics=self.pending[:BATCH_METRICS], tags=tags)
                self.pending, tags = self.pending[BATCH_METRICS:], []
        except mlflow_store.STORE_ERRORS as err:
            self.asked = clock
            if not self.down:
                self.down = first_line(str(err))[:200] or type(err).__name__
                say(f"the MLflow store {self.where} stopped answering ({self.down}): the training goes on and keeps "
                    "its model; the curves wait here and go to the store when it answers; record needs it")
            return False
        self.beaten = clock
        if self.down:
            self.down = None
            say(f"the MLflow store {self.where} answers again: the curves resume in run {self.run_id}")
        return True

    def reopen(self) -> None:
        """A run that another command ended meanwhile (its heartbeat looked dead) is this training's again."""
        run = self.client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.log_batch(self.run_id, tags=[RunTag(tag.TRAINING, tag.RUNNING), RunTag(tag.NOTE, self.note)])
            if tag.FAILURE in run.data.tags:
                self.client.delete_tag(self.run_id, tag.FAILURE)


def start_run(start: dict[str, object]) -> tuple[mlflow.MlflowClient, str, str, str, dict[str, str]]:
    """Create the live run: (client, experiment id, run id, run name, its first tags)."""
    store = resolve_store()
    with mlflow_store.store_errors(store, "the training curves go to MLflow once the result is recorded"):
        experiment_id = mlflow_store.configure(store, str(start["experiment"]))
        client = mlflow.MlflowClient()
        tags = {**run_tags([Path(p) for p in start["outputs"]]), **start["tags"], tag.TRAINING: tag.RUNNING,
                tag.HEARTBEAT: beat()}
        name = run_name(tags)
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        params = [Param(k, v) for k, v in start["params"].items()]
        for first in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[first:first + 100])
    return client, experiment_id, run.info.run_id, name, tags


def main(reports: Path) -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a new store's INFO lines are not the stage's output
    line = sys.stdin.readline()
    if not line.strip():  # the stage ended before its training (a refused input, Ctrl+C): no run to make
        return
    start = json.loads(line)
    try:
        client, experiment_id, run_id, name, tags = start_run(start)
    except Exception as err:  # noqa: BLE001 - any failure is the one line the stage prints
        print(f"error {' '.join(str(err).split())}", flush=True)
        return
    print(f"ready {run_id} {name}", flush=True)
    import_gc.resume()  # MLflow and the store's modules are loaded: collections as usual while the training runs
    # Nothing more goes to stdout. MLflow prints "View run ... at" as it ends a run on a tracking server, before
    # it writes the status: into the stage's pipe, whose reader a killed stage took with it, that would raise
    # BrokenPipeError and leave the run RUNNING for good.
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
    os.dup2(sys.stdout.fileno(), 1)
    curves = Curves(client, run_id, reports, tags.get(tag.NOTE, ""), resolve_store().uri)
    try:  # runs that trainings killed with everything around them left RUNNING: ended now (tracking/heartbeat.py)
        for line in end_dead_runs(experiment_id, keep=(run_id,)):
            say(line)
    except mlflow_store.STORE_ERRORS:
        pass  # the curves below say it if the store is gone

    end = {"end": "KILLED", "cause": "the train stage stopped without a word (killed)"}
    while True:
        told, _, _ = select.select([sys.stdin], [], [], POLL_S)
        curves.read()
        curves.send()
        if told:
            line = sys.stdin.readline()
            end = json.loads(line) if line.strip() else end
            break
    curves.read()
    status = end["end"]
    end_tags = [RunTag(tag.TRAINING, END_TAGS[status])]
    if end.get("model_sha256"):
        end_tags.append(RunTag(tag.MODEL_SHA256, end["model_sha256"]))
    if end["cause"]:
        end_tags += [RunTag(tag.FAILURE, end["cause"]), RunTag(tag.NOTE, f"Training failed: {end['cause']}")]
    deadline = time.monotonic() + END_TRIES_S
    while not curves.send(end_tags, now=True):
        if time.monotonic() > deadline:
            later = ("record completes it once the store answers (train noted it beside the model)"
                     if status == "FINISHED" else "the next pipeline command ends it KILLED once the store answers")
            say(f"the MLflow store {curves.where} still does not answer: run {run_id} stays open; {later}")
            return
        time.sleep(RETRY_S)
    try:
        trained = status == "FINISHED" and end.get("model_sha256")
        found = recorded_model(experiment_id, end["model_sha256"], start["params"]) if trained else None
        if found is not None:  # the same bytes as a result recorded before: ended here, whether record runs or not
            say(mark_repeat(client, run_id, found.run_id, found.name))
        else:
            client.set_terminated(run_id, status)
    except mlflow_store.STORE_ERRORS as err:
        say(f"the MLflow store {curves.where} did not end run {run_id} ({first_line(str(err))[:200]}); record "
            "completes it once the store answers")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    import_gc.before_exit()
