"""Wall times of the pipeline as a user runs it: a fresh clone's `dvc repro` stage by stage, and plot-only experiments.

Used by benchmarks/bench.py. It works in a temporary `git clone` of this repository with a cache of its own, so
nothing is restored from this workspace's run-cache and nothing is added to its experiments or MLflow store.
The MNIST files come from this workspace's data/raw as MNIST_MIRROR: the download stage's network time is left
out, since it measures the network, not the pipeline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNING = re.compile(r"Running stage '([^']+)'")
LOOP_DONE = re.compile(r"End of the training loop! ([0-9.]+) s on")  # printed by stages/train.py


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


def stage_seconds(total: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Each stage's share of a `dvc repro`: from its "Running stage" line to the next one's (or to the end).

    A stage's share includes DVC's work on its outputs (hashing, caching); DVC's start-up before the first
    stage is reported as `dvc_start`.
    """
    starts = [(at, match.group(1)) for at, line in lines if (match := RUNNING.search(line))]
    shares = {"dvc_start": starts[0][0] if starts else total}
    for (at, stage), (end, _) in zip(starts, [*starts[1:], (total, "")]):
        shares[stage] = end - at
    return {name: round(seconds, 2) for name, seconds in shares.items()}


def pipeline_times(repo: Path, plot_only_runs: int) -> dict:
    """A fresh clone's `dvc repro` (stage by stage, and without the training loop) and plot-only experiments.

    In a fresh clone, evaluate and plot do not run: training makes the committed model's bytes again, so DVC
    finds their committed outputs up to date. What is not training is DVC's own work, download, split, the
    train stage's start-up and saving, and record, which creates the clone's MLflow store and logs the model.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MNIST_MIRROR"] = str((repo / "data" / "raw").resolve())
    with tempfile.TemporaryDirectory(prefix="mnist-bench-clone-") as root:
        clone = Path(root) / "clone"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(Path(root) / "cache")],
                       cwd=clone, check=True, capture_output=True)
        total, lines = timed_lines([sys.executable, "-m", "dvc", "repro"], clone, env)
        stages = stage_seconds(total, lines)
        loop = next(float(match.group(1)) for _, line in lines if (match := LOOP_DONE.search(line)))
        plot_only = []
        for i in range(plot_only_runs):  # a new value each time: each is a new result, with its MLflow run
            seconds, _ = timed_lines([sys.executable, "-m", "dvc", "exp", "run", "-S", f"plot.n_images={9 + i}"],
                                     clone, env)
            plot_only.append(round(seconds, 2))
    return {"fresh_clone_repro_s": round(total, 2), "stages_s": stages, "training_loop_s": loop,
            "fresh_clone_without_training_loop_s": round(total - loop, 2),
            "plot_only_exp_s": plot_only, "plot_only_exp_median_s": sorted(plot_only)[len(plot_only) // 2]}
