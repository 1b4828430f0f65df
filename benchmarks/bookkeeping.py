"""What the bookkeeping around a training costs, this checkout against 817411a (before issue 31), in pairs.

Section `bookkeeping` of benchmarks/bench.py: a new-model record into a new store, and a one-epoch `dvc exp run`
outside its training loop (its wall time minus the loop's, as the train stage prints it), each side by side with
817411a's code `git archive`d beside this checkout (benchmarks/record_vs_base.py); where a new-model record's time
goes, measured with perf_counter and process_time around its parts in one process, medians of the repeats (no
profiler: cProfile inflates the many small calls of imports several-fold); and what pausing the garbage collector
while torch and MLflow load saves a process (mnist_pipeline/import_gc.py), against Python's own collector, in pairs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.pipeline_times import LOOP_DONE
from benchmarks.record import REPO, record_args, record_seconds
from benchmarks.record_vs_base import base_tree, baseline_clones, pairs

BASE = "817411a"  # main before issue 31: record imported torch twice over, live runs without heartbeats
# One process recording a new model, each part timed: the imports first (what `-X importtime` sums), then the
# stage's own steps, each wrapped where it is called.
PARTS = r'''
import functools, io, json, contextlib, sys, time
from mnist_pipeline import import_gc
import_gc.pause()  # as `python -m stages.record` does (stages/__init__.py), and run_stage's resume() below
parts = {}
def timed(label, owner, name):
    original = getattr(owner, name)
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            part = parts.setdefault(label, [0.0, 0.0])
            part[0] += time.perf_counter() - wall
            part[1] += time.process_time() - cpu
    setattr(owner, name, wrapper)
def imported(label, module):
    wall, cpu = time.perf_counter(), time.process_time()
    __import__(module)
    parts[label] = [time.perf_counter() - wall, time.process_time() - cpu]
imported("MLflow's: import mlflow (and its pyfunc, models)", "mlflow.pyfunc")
imported("MLflow's (its input-example check runs our served model): import torch", "torch")
import mlflow.models.utils
from mnist_pipeline import training
from mnist_pipeline.tracking import mlflow_store, recording, registry
import stages.record as stage
timed("ours: the result's key (SHA-256 of params, data, outputs)", stage, "result_key")
timed("MLflow's: opening a new store (tables, migrations)", mlflow_store, "configure")
timed("ours: the result's runs (2 searches), dead runs (1)", recording, "mlflow_runs")
timed("MLflow's: the input-example check (load, predict)", mlflow.models.utils, "_validate_serving_input")
timed("log_model, all of it (the two above included)", recording, "log_model")
timed("ours: the weights check (load into the network)", training, "load_state_dict")
timed("ours: register the version (MLflow calls)", recording, "register")
timed("ours: crown (MLflow calls)", registry, "crown_champion")
timed("ours: params, tags, metrics (MLflow calls)", recording, "_batches")
timed("ours: reports and figures (MLflow call)", recording, "_log_files")
sys.argv = ["stages.record", *sys.argv[1:]]
wall, cpu = time.perf_counter(), time.process_time()
import_gc.resume()
with contextlib.redirect_stdout(io.StringIO()):
    stage.main()
parts["the stage's main(), all of it"] = [time.perf_counter() - wall, time.process_time() - cpu]
print(json.dumps({k: [round(w, 2), round(c, 2)] for k, (w, c) in parts.items()}))
'''


def record_parts(folder: Path, env: dict[str, str], repeats: int) -> dict[str, list[float]]:
    """Each part of a new-model record of this checkout, [wall s, CPU s], each the median over `repeats` records,
    each into a new store under `folder` (one process's parts vary by half a second from run to run here)."""
    measured = []
    for i in range(repeats):
        store_root = folder / f"store-{i}"
        store_root.mkdir(parents=True)
        result = subprocess.run([sys.executable, "-c", PARTS, *record_args(REPO, store_root / "recorded", None)],
                                cwd=REPO, capture_output=True, text=True,
                                env={**env, "PYTHONPATH": str(REPO), "DVC_ROOT": str(store_root)})
        if result.returncode != 0:
            sys.exit(f"benchmark: the record parts failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        measured.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {part: [round(statistics.median(m[part][k] for m in measured), 2) for k in (0, 1)] for part in measured[0]}


def load_and_exit_seconds(collector: str, env: dict[str, str]) -> float:
    """A process that loads torch and MLflow and exits, its collector `paused` as our programs run it
    (mnist_pipeline/import_gc.py) or as Python has it (`base`)."""
    paused = "from mnist_pipeline import import_gc; import_gc.pause(); "
    code = f"{paused if collector == 'now' else ''}import torch, mlflow.pyfunc; import mnist_pipeline.import_gc as g; "
    code += "g.resume(); g.before_exit()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**env, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start


def outside_loop_seconds(clone: Path, lr: float, env: dict[str, str]) -> float:
    """A one-epoch `dvc exp run` of a new result (its own lr) in `clone`: wall time minus its training loop's."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", f"train.lr={lr}"], cwd=clone,
                            capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    loop = next((float(m.group(1)) for m in [LOOP_DONE.search(result.stdout)] if m), None)
    if result.returncode != 0 or loop is None:
        sys.exit(f"benchmark: `dvc exp run` in {clone} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return wall - loop


def bookkeeping_cost(repeats: int) -> dict:
    """This checkout against BASE: a new-model record, a one-epoch `dvc exp run` outside its loop; the parts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    with tempfile.TemporaryDirectory(prefix="mnist-bench-bookkeeping-") as folder:
        root = Path(folder)
        trees = {"now": REPO, "base": base_tree(BASE, root)}
        report: dict = {"base": BASE}
        report["new_model_record"] = pairs(
            lambda name, i: record_seconds(trees[name], root / f"new-{name}-{i}", env), repeats)
        clones = baseline_clones(trees, root, env)
        report["exp_run_outside_loop"] = pairs(
            lambda name, i: outside_loop_seconds(clones[name], 0.001 + (i + 1) * 1e-5, env), repeats)
        report["record_parts"] = record_parts(root / "parts", env, repeats)
        report["load_torch_mlflow_and_exit"] = pairs(lambda name, i: load_and_exit_seconds(name, env), repeats)
    return report
