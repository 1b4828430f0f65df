"""Sweeps on the real data, side by side on one machine: a sweep's trial against a plain `dvc exp run` of the same
params, two workers of one thread against one of two, and Optuna's sampler against DVC's queue on one budget.

Section `sweep` of benchmarks/bench.py. Each side works in temporary `git clone`s of this repository's committed HEAD
(with DVC caches and MLflow stores of their own, download and split reproduced once from MNIST_MIRROR, else this
workspace's data/raw), so nothing is added to this workspace's experiments, studies or runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.turns import in_turns, ratio_spread
from mnist_pipeline.search_space import load_space

RAW = Path("data/raw")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MNIST_"))}
    mirror = os.environ.get("MNIST_MIRROR") or str(RAW.resolve())
    return {**base, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",
            "MNIST_MIRROR": mirror, "DVC_NO_ANALYTICS": "1", **extra}


def run(command: list[str], cwd: Path, **extra: str) -> float:
    """Run a command to its end; its wall time."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env(**extra), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark: `{' '.join(command)}` failed in {cwd}:\n{(result.stdout + result.stderr)[-2000:]}")
    return time.perf_counter() - start


def clone(source: Path, dest: Path) -> Path:
    """A clone of the committed HEAD with download and split reproduced (no training)."""
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True)
    run([sys.executable, "-m", "dvc", "repro", "split"], dest)
    return dest


def write_space(root: Path, space: dict, name: str = "bench-space.yaml") -> str:
    (root / name).write_text(yaml.safe_dump(space, sort_keys=False))
    return name


def sweep(root: Path, study: str, space: str, trials: int, storage: str | None = None) -> subprocess.Popen[str]:
    """A worker; every worker of a study names its budget (the same), so whichever starts first makes the study."""
    where = ["--storage", storage] if storage else []
    command = [sys.executable, "-m", "tools.sweep", "run", "--study", study, "--space", space, "--no-push",
               "--trials", str(trials), *where]
    return subprocess.Popen(command, cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def waited(process: subprocess.Popen[str]) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        sys.exit(f"benchmark: a sweep worker failed: {err.strip()[-2000:]}")


def trial_against_exp_run(root: Path, repeats: int) -> dict:
    """One trial of a sweep (a study of 1) against `dvc exp run --temp` of the same params, in turns. Each run nudges
    train.lr by 1e-5, so that every stage runs in both: a param that changes no byte of the model (momentum under adamw)
    let later runs restore evaluate and plot from DVC's run-cache, and the first run alone paid for them."""
    counter = itertools.count(1)

    def measure(side: str, turn: int) -> float:
        lr = round(0.015 + 1e-5 * next(counter), 6)
        if side == "trial":
            space = write_space(root, {"fixed": {"train.epochs": 1},
                                       "search": {"train.lr": {"choices": [lr]}}}, f"space-{turn}.yaml")
            start = time.perf_counter()
            waited(sweep(root, f"wall-{turn}", space, 1))
            return time.perf_counter() - start
        return run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", f"plain-{turn}", "-S", "train.epochs=1",
                    "-S", f"train.lr={lr}"], root)

    times = in_turns(measure, ("trial", "plain"), repeats)
    return {"trial_s": round(statistics.median(times["trial"]), 1),
            "plain_s": round(statistics.median(times["plain"]), 1), "repeats": repeats,
            **ratio_spread(times["trial"], times["plain"])}


def workers_per_hour(roots: list[Path], trials: int) -> dict:
    """A study of `trials` one-epoch trials run by two workers of 1 thread (two clones) and by one of 2 threads:
    trials per hour of each, and their ratio (one study each side, not a significance test)."""
    rates = {}
    for side, threads, workers in (("one_by_2", 2, roots[:1]), ("two_by_1", 1, roots)):
        space = {"fixed": {"train.epochs": 1, "train.num_threads": threads, "train.momentum": 0.8 + 0.01 * threads},
                 "search": {"train.lr": {"low": 0.003, "high": 0.03, "log": True}}, "pruner": {"kind": "none"}}
        name = None
        for root in workers:
            name = write_space(root, space, f"space-{side}.yaml")
        # One study for the workers of both clones: the first clone's SQLite file, and the budget lock beside it.
        storage = f"sqlite:///{workers[0].resolve() / 'optuna.db'}"
        start = time.perf_counter()
        open_first = sweep(workers[0], side, name, trials, storage)
        if workers[1:]:
            time.sleep(3)  # the first worker makes the study's tables: two processes creating one SQLite store fail
        processes = [open_first, *(sweep(root, side, name, trials, storage) for root in workers[1:])]
        for process in processes:
            waited(process)
        rates[f"{side}_per_hour"] = round(trials / (time.perf_counter() - start) * 3600, 1)
    rates["ratio_two_by_1_over_one_by_2"] = round(rates["two_by_1_per_hour"] / rates["one_by_2_per_hour"], 2)
    rates["trials"] = trials
    return rates


def grid(space_file: Path) -> tuple[list[str], int]:
    """Two values of each searched param (a quarter and three quarters into its range, log-spaced for a log range;
    a list's first and last): DVC's queue gets `-S key=a,b` for each."""
    space = load_space(space_file)
    args = []
    for key, dim in space.search.items():
        if dim.choices:
            values = [dim.choices[0], dim.choices[-1]]
        elif dim.log:
            low, high = math.log(dim.low), math.log(dim.high)
            values = [round(math.exp(low + f * (high - low)), 6) for f in (0.25, 0.75)]
        else:
            values = [round(dim.low + f * (dim.high - dim.low), 6) for f in (0.25, 0.75)]
        args.append(["-S", f"{key}={','.join(str(v) for v in values)}"])
    fixed = [["-S", f"{k}={v}"] for k, v in space.fixed.items()]
    return [arg for pair in [*fixed, *args] for arg in pair], 2 ** len(space.search)


def sampler_against_queue(root_optuna: Path, root_queue: Path, space_file: Path) -> dict:
    """The same budget and ranges: Optuna's study (sampler and pruner) against DVC's queue of the grid; each side's
    best validation accuracy. One study each: a comparison, not a significance test."""
    args, budget = grid(space_file)
    shutil.copyfile(space_file, root_optuna / "bench-space.yaml")
    start = time.perf_counter()
    waited(sweep(root_optuna, "sampler", "bench-space.yaml", budget))
    optuna_s = time.perf_counter() - start
    import optuna

    study = optuna.load_study(study_name="sampler", storage=f"sqlite:///{root_optuna / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    start = time.perf_counter()
    run([sys.executable, "-m", "dvc", "exp", "run", "--queue", *args], root_queue)
    run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], root_queue)
    def queue_status() -> str:
        return subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], cwd=root_queue, env=env(),
                              capture_output=True, text=True).stdout

    while "Queued" in (status := queue_status()) or "Running" in status:
        time.sleep(10)
    queue_s = time.perf_counter() - start
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root_queue, env=env(),
                                      capture_output=True, text=True, check=True).stdout)
    accs = [exp["data"]["metrics"]["reports/train.json"]["data"]["train"]["best_val_acc"]
            for baseline in shown for run_ in baseline.get("experiments") or [] for exp in run_["revs"]
            if "reports/train.json" in ((exp.get("data") or {}).get("metrics") or {})]
    return {"budget": budget, "optuna_best_val_acc": round(study.best_value, 6),
            "optuna_complete": states.count("COMPLETE"), "optuna_pruned": states.count("PRUNED"),
            "optuna_s": round(optuna_s), "queue_best_val_acc": round(max(accs), 6), "queue_experiments": len(accs),
            "queue_s": round(queue_s), "space": str(space_file)}


PARTS = ("trial_vs_exp_run", "workers", "sampler_vs_queue")


def sweep_comparisons(repeats: int, trials: int, space_file: Path, parts: list[str], previous: dict | None) -> dict:
    """The three comparisons, or those in `parts` (the others kept from `previous`): each runs for minutes."""
    source = Path.cwd()
    report = dict(previous or {})
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        a, b = clone(source, Path(folder) / "a"), clone(source, Path(folder) / "b")
        measure = {"trial_vs_exp_run": lambda: trial_against_exp_run(a, repeats),
                   "workers": lambda: workers_per_hour([a, b], trials),
                   "sampler_vs_queue": lambda: sampler_against_queue(a, b, space_file)}
        for part in parts:
            report[part] = measure[part]()
    return report


def sweep_rows(report: dict | None) -> list[tuple[str, str]]:
    """Each comparison measured, n/a for the others."""
    report = report or {}
    rows = []
    if "trial_vs_exp_run" in report:
        t = report["trial_vs_exp_run"]
        rows.append((f"sweep: a trial / plain `dvc exp run --temp` (1 epoch, median of {t['repeats']} pairs)",
                     f"{t['trial_s']} s / {t['plain_s']} s = {t['ratio']}x ({t['ratio_min']}-{t['ratio_max']})"))
    if "workers" in report:
        w = report["workers"]
        rows.append((f"sweep: trials per hour, 2 workers x 1 thread / 1 worker x 2 threads ({w['trials']} trials each)",
                     f"{w['two_by_1_per_hour']} / {w['one_by_2_per_hour']} = {w['ratio_two_by_1_over_one_by_2']}x"))
    if "sampler_vs_queue" in report:
        q = report["sampler_vs_queue"]
        rows.append((f"sweep: best val acc over {q['budget']} trials, Optuna / DVC's queue (one study each)",
                     f"{q['optuna_best_val_acc']} ({q['optuna_complete']} complete, {q['optuna_pruned']} pruned, "
                     f"{q['optuna_s']} s) / {q['queue_best_val_acc']} ({q['queue_experiments']} experiments, "
                     f"{q['queue_s']} s)"))
    return rows + [(f"sweep: {part}", "n/a (not measured in this report)") for part in PARTS if part not in report]
