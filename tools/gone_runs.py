"""List (and with --delete, delete restorably) the MLflow runs whose DVC experiment no longer exists anywhere.

Run it in the repo root: python -m tools.gone_runs [--delete]. An experiment exists while this
clone lists it (`dvc exp list -A`) or a git remote holds its ref (what `dvc exp push` sends), so a
teammate's experiment that this clone never pulled is not gone. Only this account's runs are touched
unless --all-accounts says otherwise; a tracking server is only touched with --team-server.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import mlflow

from mnist_pipeline.errors import PipelineError, run_stage, text_lines
from mnist_pipeline.params import load_params
from mnist_pipeline.tracking import mlflow_store, tag
from mnist_pipeline.tracking.heartbeat import end_dead_runs
from mnist_pipeline.tracking.result import WORKSPACE_RUN_NAME, git
from mnist_pipeline.tracking.store import account as store_account
from mnist_pipeline.tracking.store import resolve_store

GONE_NOTE = (
    "DVC experiment `{name}` no longer exists (removed with `dvc exp remove`, or it failed in a temporary "
    "copy): `dvc exp apply` cannot bring it back; its params, metrics, figures and model are in this run only."
)


def local_experiments() -> set[tuple[str, str]]:
    """(baseline commit, name) of every DVC experiment of every commit in this clone (`dvc exp list -A`).

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
            baseline = (git("rev-parse", "--verify", f"{line[:-1]}^{{commit}}") or "").strip()
        elif line.strip():
            name = line.strip()  # "<sha7> [<name>]", or "<name>"
            found.add((baseline, name.rsplit("[", 1)[1].rstrip("]") if name.endswith("]") else name))
    return found


def remote_experiments() -> set[tuple[str, str]]:
    """(baseline commit, name) of the experiments every git remote holds: refs/exps/<sha[:2]>/<sha[2:]>/<name>."""
    found = set()
    for remote in (git("remote") or "").split():
        listed = subprocess.run(["git", "ls-remote", remote, "refs/exps/*"], capture_output=True, text=True,
                                check=False, timeout=120)
        if listed.returncode != 0:
            why = (text_lines(listed.stderr) or ["no answer"])[-1]
            raise PipelineError(f"git remote {remote!r} did not list its experiments ({why}), so nothing is marked "
                                "gone: a teammate's experiment there would look gone; retry when it answers")
        for line in listed.stdout.splitlines():
            parts = line.split("\t")[-1].split("/")
            if len(parts) == 5 and parts[:2] == ["refs", "exps"]:
                found.add((parts[2] + parts[3], parts[4]))
    return found


def recorded_names(run: mlflow.entities.Run) -> set[tuple[str, str]]:
    """The (baseline or commit, name) pairs a run's result was recorded under."""
    tags = run.data.tags
    names = {tuple(line.split(" ", 1)) for line in tags.get(tag.NAMES, "").splitlines() if " " in line}
    if tag.DVC_EXP_NAME in tags:
        names.add((tags.get(tag.DVC_EXP_BASELINE, ""), tags[tag.DVC_EXP_NAME]))
    return names


def account_of(run: mlflow.entities.Run) -> str:
    """Who recorded a run: the tracking server login, else the computer's user."""
    return run.data.tags.get(tag.ACCOUNT) or run.data.tags.get(tag.MLFLOW_USER, "")


def gone_runs(experiment_id: str, experiments: set[tuple[str, str]], min_age_s: float,
              account: str | None) -> list[mlflow.entities.Run]:
    """Finished runs none of whose DVC names exists any more (a result also recorded in a workspace never is).

    A run still RUNNING, or ended less than `min_age_s` ago, is left alone: DVC commits an experiment only
    after its last stage, so a queue may still be about to list it. With `account`, only that account's runs.
    """
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string="tags.`dvc.exp_name` != ''",
        output_format="list", order_by=["attributes.start_time ASC"],
    )
    settled = (time.time() - min_age_s) * 1000
    return [
        run for run in runs
        if run.info.status != "RUNNING" and (run.info.end_time or 0) < settled
        and (account is None or account_of(run) == account)
        and not any(name == WORKSPACE_RUN_NAME for _, name in recorded_names(run))
        and not recorded_names(run) & experiments
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.gone_runs", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delete", action="store_true",
                        help="delete them as MLflow does (restorable: `mlflow runs restore --run-id ID`)")
    parser.add_argument("--min-age", type=float, default=120, metavar="SECONDS",
                        help="leave alone runs that ended less than this long ago (a queue may be about to list them)")
    parser.add_argument("--all-accounts", action="store_true",
                        help="also the runs other accounts recorded (by default only this account's)")
    parser.add_argument("--team-server", action="store_true",
                        help="allow a tracking server (MLFLOW_TRACKING_URI=http...): the whole team's runs are there")
    args = parser.parse_args()
    params = load_params()
    store = resolve_store()
    if store.database is None and not args.team_server:
        raise PipelineError(f"{store.uri} is a tracking server, which holds the whole team's runs: rerun with "
                            "--team-server to mark (or with --delete, delete) the gone ones of this account there")
    experiments = local_experiments() | remote_experiments()
    account = None if args.all_accounts else store_account()
    with mlflow_store.store_errors(store, "fix the store and run this again"):
        experiment_id = mlflow_store.configure(store, params.mlflow.experiment)
        client = mlflow.MlflowClient()
        for line in end_dead_runs(experiment_id):  # runs whose training was killed with everything (docs/runs.md)
            print(line, file=sys.stderr)
        runs = gone_runs(experiment_id, experiments, args.min_age, account)
        for run in runs:
            name = run.data.tags[tag.DVC_EXP_NAME]
            # The note said `dvc exp apply <name>`: say instead that the experiment is gone.
            client.log_batch(run.info.run_id, tags=[
                mlflow.entities.RunTag(tag.NOTE, GONE_NOTE.format(name=name)),
                mlflow.entities.RunTag(tag.DVC_EXP_GONE, "true")])
            if args.delete:
                client.delete_run(run.info.run_id)
            print(f"{run.info.run_id}  {name}  {run.info.status}{'  deleted' if args.delete else ''}")
    verb = "deleted (restore one with `mlflow runs restore --run-id ID`)" if args.delete else "found"
    whose = "any account's" if account is None else f"account {account!r}'s"
    print(f"{len(runs)} of {whose} run(s) of gone DVC experiments {verb} in {store.uri}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
