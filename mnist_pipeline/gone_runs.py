"""List (and with --delete, delete restorably) the MLflow runs whose DVC experiment no longer exists.

Run it in the repo root: python -m mnist_pipeline.gone_runs [--delete]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import mlflow

from mnist_pipeline import tracking
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.store import resolve_store

GONE_NOTE = (
    "DVC experiment `{name}` no longer exists (removed with `dvc exp remove`, or it failed in a temporary "
    "copy): `dvc exp apply` cannot bring it back; its params, metrics, figures and model are in this run only."
)


def dvc_experiments() -> set[tuple[str, str]]:
    """(baseline commit, name) of every DVC experiment of every commit in this repo (`dvc exp list -A`).

    DVC keeps experiment names per baseline commit: the same name on another baseline is another experiment.
    """
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--all-commits"], capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise PipelineError(f"`dvc exp list` failed, so nothing is marked gone: {result.stderr.strip()}")
    found, baseline = set(), ""
    for line in result.stdout.splitlines():
        if line.strip() and not line[0].isspace() and line.endswith(":"):
            # A branch, a tag or a short commit, as the full commit DVC_EXP_BASELINE_REV holds.
            baseline = (tracking.git("rev-parse", "--verify", f"{line[:-1]}^{{commit}}") or "").strip()
        elif line.strip():
            name = line.strip()  # "<sha7> [<name>]", or "<name>"
            found.add((baseline, name.rsplit("[", 1)[1].rstrip("]") if name.endswith("]") else name))
    return found


def gone_runs(experiment_id: str, experiments: set[tuple[str, str]], min_age_s: float) -> list[mlflow.entities.Run]:
    """Finished runs of a DVC experiment that `dvc exp list` no longer knows (workspace runs are never gone).

    A run still RUNNING, or ended less than `min_age_s` ago, is left alone: DVC commits an experiment only
    after its last stage, so a queue may still be about to list it.
    """
    runs = tracking.retry_busy(
        mlflow.search_runs, experiment_ids=[experiment_id], filter_string="tags.`dvc.exp_name` != ''",
        output_format="list", order_by=["attributes.start_time ASC"],
    )
    settled = (time.time() - min_age_s) * 1000
    return [
        run for run in runs
        if run.info.status != "RUNNING" and (run.info.end_time or 0) < settled
        and (run.data.tags.get("dvc.exp_baseline_rev", ""), run.data.tags["dvc.exp_name"]) not in experiments
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delete", action="store_true",
                        help="delete them as MLflow does (restorable: `mlflow runs restore --run-id ID`)")
    parser.add_argument("--min-age", type=float, default=120, metavar="SECONDS",
                        help="leave alone runs that ended less than this long ago (a queue may be about to list them)")
    args = parser.parse_args()
    params = load_params()
    store = resolve_store()
    experiments = dvc_experiments()
    with tracking.store_errors(store, "fix the store and run this again"):
        experiment_id = tracking.configure(store, params.mlflow.experiment)
        client = mlflow.MlflowClient()
        runs = gone_runs(experiment_id, experiments, args.min_age)
        for run in runs:
            name = run.data.tags["dvc.exp_name"]
            # The note said `dvc exp apply <name>`: say instead that the experiment is gone.
            tracking.retry_busy(client.set_tag, run.info.run_id, "mlflow.note.content", GONE_NOTE.format(name=name))
            tracking.retry_busy(client.set_tag, run.info.run_id, "dvc.exp_gone", "true")
            if args.delete:
                tracking.retry_busy(client.delete_run, run.info.run_id)
            print(f"{run.info.run_id}  {name}  {run.info.status}{'  deleted' if args.delete else ''}")
    verb = "deleted (restore one with `mlflow runs restore --run-id ID`)" if args.delete else "found"
    print(f"{len(runs)} run(s) of gone DVC experiments {verb} in {store.uri}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
