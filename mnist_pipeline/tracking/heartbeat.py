"""Runs that outlive their process: each open run of ours beats a heartbeat tag, and the next command ends the dead.

A training killed with everything around it (SIGKILL of the tree, a closed terminal, an OOM kill, the machine
gone) leaves no process to end its run. Its helper (tracking/live_run.py) and record's run (tracking/recording.py)
write tag.HEARTBEAT, "<unix seconds> <host> <pid>", when they open the run and every BEAT_EVERY_S after. The next
pipeline command that opens the store on any machine (a training's helper, record, tools.gone_runs) ends a RUNNING
run KILLED: at once when it was opened on this machine and its process is gone, else once its heartbeat is older
than DEAD_AFTER_S (a run of another machine).
"""

from __future__ import annotations

import os
import socket
import time

from mnist_pipeline.tracking import tag

BEAT_EVERY_S = 30
# The bound: six missed beats. A store down for longer makes a live training look dead; its helper reopens the run
# when the store answers again (tracking/live_run.py), and record completes it either way.
DEAD_AFTER_S = 180


def beat(pid: int | None = None) -> str:
    """This process's heartbeat, as tag.HEARTBEAT holds it."""
    return f"{int(time.time())} {socket.gethostname()} {pid or os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def dead_because(tags: dict[str, str], start_time_ms: int, now: float | None = None) -> str | None:
    """Why a RUNNING run with these tags and start time is taken for dead, in words; None while it may be alive, or
    when it is not the pipeline's (someone's own run in the experiment). Without MLflow: record's quick read
    (tracking/recorded.py) applies the same rule."""
    if not {tag.HEARTBEAT, tag.TRAINING, tag.RESULT_KEY} & tags.keys():  # runs before heartbeats had these
        return None
    now = time.time() if now is None else now
    seconds, host, pid = (tags.get(tag.HEARTBEAT, "").split() + ["", "", ""])[:3]
    if host == socket.gethostname() and pid.isdigit():  # on this machine the process itself says
        return None if _alive(int(pid)) else f"its process ({pid} on {host}) is gone"
    last = int(seconds) if seconds.isdigit() else start_time_ms // 1000
    if now - last > DEAD_AFTER_S:
        return f"it stopped answering: no heartbeat for {int(now - last)} s (the bound is {DEAD_AFTER_S} s)"
    return None


def end_dead_runs(experiment_id: str, keep: tuple[str, ...] = ()) -> list[str]:
    """End KILLED, saying why, every RUNNING run of the experiment whose process is dead; the lines to print.

    `keep`: runs the caller is about to complete itself (record's own unfinished run of its result).
    """
    import mlflow
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    lines = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200):
        why = None if run.info.run_id in keep else dead_because(run.data.tags, run.info.start_time)
        if why is None:
            continue
        cause = f"ended by the next pipeline command: {why}"
        tags = [RunTag(tag.FAILURE, cause), RunTag(tag.NOTE, f"Ended KILLED: {cause}.")]
        if run.data.tags.get(tag.TRAINING) == tag.RUNNING:
            tags.append(RunTag(tag.TRAINING, tag.KILLED))
        try:
            client.log_batch(run.info.run_id, tags=tags)
            client.set_terminated(run.info.run_id, "KILLED")
        except MlflowException as err:
            if err.error_code != "PERMISSION_DENIED":
                raise
            lines.append(f"MLflow run '{run.info.run_name}' ({run.info.run_id}) was left RUNNING ({why}); this account "
                         "may not end it: its owner's next command, or an admin, does")
            continue
        lines.append(f"MLflow run '{run.info.run_name}' ({run.info.run_id}) was left RUNNING and is now KILLED: {why}")
    return lines
