"""Wall times of the pipeline as a user runs it: a fresh clone's `dvc repro` stage by stage, plot-only experiments,
each stage's start-up, and a `dvc repro` with nothing to do.

Sections `pipeline`, `startup_s` and `noop_dvc_repro_s` of benchmarks/bench.py. The first works in a temporary
`git clone` of this repository's committed HEAD (not of uncommitted changes) with a DVC cache of its own, so nothing
is restored from this workspace's run-cache and nothing is added to its experiments or MLflow store. The MNIST files
come from this workspace's raw data folder as MNIST_MIRROR: the download stage's network time is left out, since it
measures the network, not the pipeline.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnist_pipeline.data import MNIST_FILES
from tools.stage_commands import stage_commands

# DVC's lines that start a stage's share of the wall time; a skipped stage's share is DVC's check of it.
EVENT = re.compile(r"Running stage '([^']+)'|Stage '([^']+)' didn't change, skipping")
LOOP_DONE = re.compile(r"End of the training loop! ([0-9.]+) s on")  # printed by train_job.py at the train stage's end


def timed_lines(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, list[tuple[float, str]]]:
    """Run `command`, stamping each line of its output with the seconds since the start; its total wall time."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
    if process.wait() != 0:
        tail = "\n".join(line for _, line in lines[-5:])
        sys.exit(f"benchmark: `{' '.join(command)}` failed in {cwd}:\n{tail}")
    return time.perf_counter() - start, lines


def stage_seconds(total: float, lines: list[tuple[float, str]]) -> dict:
    """A `dvc repro`'s wall time split by stage: each stage's share runs from its line to the next stage's line.

    A stage's share includes DVC's work on its outputs (hashing, caching, the lock file); a skipped stage's share
    is DVC's check of it, listed under `skipped`. DVC's start-up before the first stage is `dvc_start`.
    """
    events = [(at, m.group(1) or m.group(2), m.group(1) is not None) for at, line in lines if (m := EVENT.search(line))]
    if not events:
        raise ValueError("no \"Running stage\" or \"didn't change\" line in DVC's output: has its wording changed?")
    ran, skipped = {}, {}
    for (at, stage, running), (end, _, _) in zip(events, [*events[1:], (total, "", False)]):
        (ran if running else skipped)[stage] = round(end - at, 2)
    return {"dvc_start": round(events[0][0], 2), "ran": ran, "skipped": skipped}


def plot_only_values(current: int, runs: int) -> list[int]:
    """plot.n_images for each plot-only experiment: 9, 10, ... as one would type, never the current value."""
    return [n for n in range(9, 9 + runs + 1) if n != current][:runs]


def pipeline_times(repo: Path, raw: Path, n_images: int, plot_only_runs: int) -> dict:
    """A fresh clone's `dvc repro` (stage by stage, and without the training loop) and plot-only experiments.

    In a fresh clone, evaluate and plot do not run: training makes the committed model's bytes again, so DVC
    finds their committed outputs up to date. What is not training is DVC's own work, download, split, the
    train stage's start-up and saving, and record, which creates the clone's MLflow store and logs the model.
    """
    missing = [file.name for file in MNIST_FILES if not (raw / file.name).is_file()]
    if missing:  # else download would quietly fetch them over the network, and time the network
        sys.exit(f"benchmark: {raw} lacks {', '.join(missing)}: run `dvc repro` first")
    # The clone's store and remote are its own: the user's MLFLOW_* and DVC_* settings would point it elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MNIST_MIRROR"] = str(raw.resolve())
    with tempfile.TemporaryDirectory(prefix="mnist-bench-clone-") as root:
        clone = Path(root) / "clone"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(Path(root) / "cache")],
                       cwd=clone, check=True, capture_output=True)
        total, lines = timed_lines([sys.executable, "-m", "dvc", "repro"], clone, env)
        loop = next((float(m.group(1)) for _, line in lines if (m := LOOP_DONE.search(line))), None)
        if loop is None:
            sys.exit("benchmark: the train stage printed no \"End of the training loop! <seconds> s on\" line")
        plot_only = []
        for n in plot_only_values(n_images, plot_only_runs):  # each a new result, with its own MLflow run
            seconds, exp_lines = timed_lines(
                [sys.executable, "-m", "dvc", "exp", "run", "-S", f"plot.n_images={n}"], clone, env)
            plot_only.append({"n_images": n, "seconds": round(seconds, 2), **stage_seconds(seconds, exp_lines)})
    return {"fresh_clone_repro_s": round(total, 2), "stages": stage_seconds(total, lines), "training_loop_s": loop,
            "fresh_clone_without_training_loop_s": round(total - loop, 2), "plot_only_exps": plot_only,
            "plot_only_exp_median_s": round(statistics.median(run["seconds"] for run in plot_only), 2)}


def startup_seconds() -> dict[str, float]:
    """Seconds each stage takes to start (imports and argument parsing, via --help), best of two."""
    result = {}
    for stage in stage_commands():
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], check=True, capture_output=True)
            runs.append(time.perf_counter() - start)
        result[stage] = round(min(runs), 2)
    return result


def noop_repro_seconds() -> float | None:
    """Wall time of `dvc repro` when nothing changed; None if the pipeline is not up to date here."""
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], capture_output=True, text=True)
    if "up to date" not in status.stdout:
        return None
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro"], check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)
