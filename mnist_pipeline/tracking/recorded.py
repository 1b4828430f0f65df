"""Is this result recorded? One answer, with one set of conditions, whether MLflow or a local store's SQLite file
is asked.

A result is recorded when its experiment holds a FINISHED run tagged with the result's key whose registered model
version still loads; the first made wins, should a race have made two. record asks MLflow when it writes, and the
SQLite file alone first (no MLflow start-up, seconds) to learn that there is nothing to write. That quick read
knows MLflow's private schema: it checks the tables and columns it reads (SCHEMA) and says so in one line, asking
MLflow instead, when an MLflow upgrade changes them; tests/test_recorded.py fails naming the table.
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from mnist_pipeline.tracking import tag
from mnist_pipeline.tracking.heartbeat import dead_because
from mnist_pipeline.tracking.store import files_gone, read_only

FINISHED = "FINISHED"
# What the quick read takes from MLflow's SQLite schema, table by table.
SCHEMA = {
    "experiments": {"experiment_id", "name", "lifecycle_stage"},
    "runs": {"run_uuid", "name", "status", "start_time", "lifecycle_stage", "experiment_id"},
    "tags": {"key", "value", "run_uuid"},
    "model_versions": {"name", "version", "current_stage", "storage_location"},
}


@dataclass(frozen=True)
class StoredRun:
    """A run as the question needs it, from either reader; `loads`: its registered model version still loads."""

    run_id: str
    name: str
    status: str
    start_time: int
    tags: dict[str, str] = field(default_factory=dict)
    loads: bool = False


def recorded_run(runs: list[StoredRun], key: str | None = None) -> StoredRun | None:
    """The run that records the result `key` (any result, when None), among an experiment's runs: the conditions, in
    one place."""
    complete = [r for r in runs if r.status == FINISHED and tag.RESULT_KEY in r.tags and r.loads
                and (key is None or r.tags[tag.RESULT_KEY] == key)]
    return min(complete, key=lambda r: r.start_time, default=None)


def awaits_record(run: StoredRun) -> bool:
    """Whether a run that watched a training (tracking/live_run.py) still waits for record to complete or end it."""
    if run.tags.get(tag.TRAINING) == tag.REPEAT or tag.REPLACED_BY in run.tags:  # ended as a repeat, or replaced
        return False
    return not (run.status == FINISHED and tag.RESULT_KEY in run.tags)


def mlflow_runs(experiment_id: str, key: str, run_ids: tuple[str, ...] = ()) -> list[StoredRun]:
    """sqlite_runs' runs, asked of MLflow (any store): those with the key, those named, the RUNNING ones."""
    import mlflow

    client = mlflow.MlflowClient()
    # Searched within the experiment, a named run of another store or experiment is simply not found (get_run would
    # answer 403 on a team server for one this account may not read).
    filters = [f"tags.{tag.RESULT_KEY} = '{key}'", "attributes.status = 'RUNNING'"]
    if run_ids:
        filters.append(f"attributes.run_id IN ({', '.join(repr(r) for r in run_ids)})")
    found = {r.info.run_id: r for where in filters
             for r in client.search_runs([experiment_id], filter_string=where, max_results=1000)}
    return [StoredRun(r.info.run_id, r.info.run_name, r.info.status, r.info.start_time, dict(r.data.tags),
                      r.info.status == FINISHED and r.data.tags.get(tag.RESULT_KEY) == key and _mlflow_version_loads(
                          r.data.tags.get(tag.MODEL_VERSION, ""))) for r in found.values()]


def recorded_model(experiment_id: str, model_sha256: str, params: dict[str, str]) -> StoredRun | None:
    """The run of a result recorded before from this model file and these params (so from the same data and code),
    by recorded_run's conditions: what a training that just made this file repeats. The live run's helper asks it,
    knowing no result key."""
    import mlflow

    found = mlflow.MlflowClient().search_runs(
        [experiment_id], max_results=100,
        filter_string=f"tags.{tag.MODEL_SHA256} = '{model_sha256}' and attributes.status = '{FINISHED}'")
    # Every param the training had; the result's run has more (MLflow logs the served model's model_config too).
    same = [r for r in found if tag.RESULT_KEY in r.data.tags and all(r.data.params.get(k) == v
                                                                       for k, v in params.items())]
    return recorded_run([StoredRun(r.info.run_id, r.info.run_name, r.info.status, r.info.start_time, dict(r.data.tags),
                                   _mlflow_version_loads(r.data.tags.get(tag.MODEL_VERSION, ""))) for r in same])


def _mlflow_version_loads(version: str) -> bool:
    """Whether a registered version ("name/version") exists and its files are in the artifact store."""
    from mlflow.exceptions import MlflowException

    from mnist_pipeline.tracking.registry import files_present

    name, _, number = version.partition("/")
    try:
        return bool(number) and files_present(name, number)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # the version itself was deleted
            return False
        raise


def schema_problems(connection: sqlite3.Connection) -> list[str]:
    """What the quick read needs and the store lacks, a line per table: empty when MLflow's schema is as read here."""
    problems = []
    for table, columns in SCHEMA.items():
        have = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if not have:
            problems.append(f"table {table} is missing")
        elif columns - have:
            problems.append(f"table {table} lacks column(s) {', '.join(sorted(columns - have))}")
    return problems


class SchemaChanged(Exception):
    """The local store's schema is not the one the quick read knows (an MLflow upgrade): ask MLflow."""


def sqlite_runs(database: Path, experiment: str, key: str, run_ids: tuple[str, ...] = ()) -> list[StoredRun]:
    """The runs of `experiment` in a local store that carry the result key `key`, or whose id is in `run_ids`,
    and the experiment's RUNNING runs; read from the SQLite file alone. Raises SchemaChanged."""
    if not database.exists():
        return []
    marks = ", ".join("?" * len(run_ids)) or "''"
    query = ("SELECT r.run_uuid, r.name, r.status, r.start_time FROM runs AS r JOIN experiments AS e "
             "ON e.experiment_id = r.experiment_id WHERE e.name = ? AND e.lifecycle_stage = 'active' "
             "AND r.lifecycle_stage = 'active' AND (r.status = 'RUNNING' OR r.run_uuid IN "
             f"({marks}) OR EXISTS (SELECT 1 FROM tags AS t WHERE t.run_uuid = r.run_uuid AND t.key = ? "
             "AND t.value = ?))")
    with closing(read_only(database)) as connection:
        try:
            rows = connection.execute(query, (experiment, *run_ids, tag.RESULT_KEY, key)).fetchall()
        except sqlite3.OperationalError:
            problems = schema_problems(connection)
            if not problems:
                raise
            raise SchemaChanged("; ".join(problems)) from None
        runs = []
        for run_id, name, status, start_time in rows:
            tags = dict(connection.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())
            runs.append(StoredRun(run_id, name, status, start_time or 0, tags,
                                  _version_loads(connection, tags.get(tag.MODEL_VERSION, ""))))
    return runs


def _version_loads(connection: sqlite3.Connection, version: str) -> bool:
    """Whether a registered version ("name/version") of a local store exists and its files are there."""
    name, _, number = version.partition("/")
    if not number.isdigit():
        return False
    row = connection.execute("SELECT storage_location FROM model_versions WHERE name = ? AND version = ? "
                             "AND current_stage != 'Deleted_Internal'", (name, int(number))).fetchone()
    return row is not None and not files_gone(str(row[0]))


def schema_of(database: Path) -> list[str]:
    """schema_problems of a local store's file (tests/test_recorded.py reads a store the installed MLflow made)."""
    with closing(read_only(database)) as connection:
        return schema_problems(connection)


def dead_running(runs: list[StoredRun], now: float | None = None) -> list[StoredRun]:
    """The RUNNING runs among `runs` that tracking/heartbeat.py would end (its rule, read without MLflow)."""
    return [r for r in runs if r.status == "RUNNING"
            and dead_because(r.tags, r.start_time, now) is not None]


def recorded_locally(database: Path, experiment: str, key: str, entry: str,
                     live_run_id: str | None) -> StoredRun | None:
    """record's quick path: the result's run, when a local store holds it under this DVC name and nothing is left to
    write (no training of it waits for record, no run of the experiment is left RUNNING by a dead process); read from
    the SQLite file alone, without MLflow's start-up. None: MLflow must look (and write)."""
    try:
        runs = sqlite_runs(database, experiment, key, (live_run_id,) if live_run_id else ())
    except SchemaChanged as err:
        print(f"record: {database} is not laid out as this project reads it ({err}; was MLflow upgraded?): asking "
              "MLflow instead, which is slower; update mnist_pipeline/tracking/recorded.py", file=sys.stderr)
        return None
    found = recorded_run(runs, key)
    live = next((r for r in runs if r.run_id == live_run_id), None)
    if (found is None or entry not in found.tags.get(tag.NAMES, "").splitlines() or dead_running(runs)
            or (live is not None and live.run_id != found.run_id and awaits_record(live))):
        return None
    return found
