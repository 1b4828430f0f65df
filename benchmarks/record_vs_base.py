"""The cost of recording a result, this checkout's code against a base commit's, measured in pairs.

Used by benchmarks/bench.py (section `record`). The base commit is checked out beside this repository
(`git archive` into a temporary folder; a git clone where DVC needs one) and both record stages run on
this workspace's outputs, one after the other, in alternating order: machines of this project differ ~2x
in speed from one day to the next, so only ratios of such pairs count. Each figure is the median over
`repeats` pairs, with the spread (min, max) of the per-pair ratios.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.record import REPO, have_postgres, record_seconds, team_server
from benchmarks.turns import in_turns, ratio_spread

DEFAULT_BASE = "921a8ab"  # main before issue 21: a run per record, ~20 calls, a model logged after its metrics
# What the script that fills a store writes into each run: about what a real run holds, without a model.
FILLER = """
import sys, time
import mlflow
from mlflow.entities import Metric, Param, RunTag
from mnist_pipeline.tracking import mlflow_store, tag
from mnist_pipeline.tracking.store import resolve_store
experiment = mlflow_store.configure(resolve_store(), "mnist")
client = mlflow.MlflowClient()
now = int(time.time() * 1000)
for i in range(int(sys.argv[1])):
    run = client.create_run(experiment, run_name=f"filler-{i}", tags={tag.DVC_EXP_NAME: f"filler-{i}"})
    client.log_batch(run.info.run_id,
                     params=[Param(f"group.key{k}", str(i + k)) for k in range(30)],
                     metrics=[Metric(f"curve{c}", i / (s + 1), now, s) for c in range(3) for s in range(20)]
                     + [Metric(f"test.metric{k}", i / 1000, now, 0) for k in range(8)],
                     tags=[RunTag(tag.RESULT_KEY, f"{i:064x}"), RunTag(tag.MODEL_SHA256, f"{i:064x}")])
    client.set_terminated(run.info.run_id)
"""


def model_variants(folder: Path, count: int) -> list[Path]:
    """Copies of this workspace's model, each with one bias nudged: as many new models (new files) as needed."""
    import torch

    state = torch.load(REPO / "models/model.pt", weights_only=True)
    last_bias = [key for key in state if key.endswith("bias")][-1]
    folder.mkdir()
    paths = []
    for k in range(count):
        nudged = {**state, last_bias: state[last_bias] + (k + 1) * 1e-6}
        torch.save(nudged, folder / f"model-{k}.pt")
        paths.append(folder / f"model-{k}.pt")
    return paths


def check_seconds(tree: Path, store_root: Path, env: dict[str, str]) -> float:
    """The store check train makes before training, in a process of its own as train has it."""
    code = ("try:\n    from mnist_pipeline.tracking.store import check_store, resolve_store\n"
            "except ImportError:  # a base commit from before mnist_pipeline/tracking/\n"
            "    from mnist_pipeline.store import check_store, resolve_store\n"
            "check_store(resolve_store())")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, capture_output=True,
                   env={**env, "PYTHONPATH": str(tree), "DVC_ROOT": str(store_root)})
    return time.perf_counter() - start


def filled_store(folder: Path, runs: int, env: dict[str, str]) -> Path:
    """A local store holding `runs` finished runs, made by a script (this checkout's code)."""
    folder.mkdir()
    subprocess.run([sys.executable, "-c", FILLER, str(runs)], cwd=REPO, check=True, capture_output=True,
                   env={**env, "PYTHONPATH": str(REPO), "DVC_ROOT": str(folder)})
    return folder


def copy_store(store: Path, dest: Path) -> Path:
    """A copy of a local store; its experiment's artifact folder still points into the original, which is fine
    for timing: the original is kept until the end."""
    shutil.copytree(store, dest)
    return dest


def pairs(measure: Callable[[str, int], float], repeats: int) -> dict:
    """`measure(tree, i)` for both trees in `repeats` turns (benchmarks/turns.py); medians and ratios now / base."""
    times = in_turns(measure, ("now", "base"), repeats)
    return {"now_s": round(statistics.median(times["now"]), 2), "base_s": round(statistics.median(times["base"]), 2),
            **ratio_spread(times["now"], times["base"])}


def base_tree(base: str, folder: Path) -> Path:
    """The base commit's files, as `git archive` writes them."""
    archive = folder / "base.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), base], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "base", filter="data")
    return folder / "base"


def baseline_clones(trees: dict[str, Path], root: Path, env: dict[str, str]) -> dict[str, Path]:
    """A git clone of each tree, its baseline (one epoch) reproduced on this workspace's data and committed."""
    clones = {}
    for name, tree in trees.items():
        clone = root / f"clone-{name}"
        shutil.copytree(tree, clone, ignore=shutil.ignore_patterns(".venv", "data", "models", "mlflow.db*",
                                                                    "mlartifacts", ".dvc"))
        shutil.copytree(tree / ".dvc", clone / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
        params = (clone / "params.yaml").read_text()
        (clone / "params.yaml").write_text(params.replace("epochs: ", "epochs: 1  # ", 1))
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "baseline"],
                        [sys.executable, "-m", "dvc", "repro"], ["git", "add", "-A"], [*git, "commit", "-qm", "ran"]):
            subprocess.run(command, cwd=clone, check=True, capture_output=True,
                           env={**env, "MNIST_MIRROR": str(REPO / "data/raw")})
        clones[name] = clone
    return clones


def plot_only_pairs(trees: dict[str, Path], root: Path, env: dict[str, str], repeats: int) -> dict:
    """`dvc exp run -S plot.n_images=N` in a clone of each tree whose baseline (one epoch) is reproduced."""
    clones = baseline_clones(trees, root, env)

    def one(name: str, i: int) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", f"plot.n_images={10 + i}"],
                       cwd=clones[name], check=True, capture_output=True, env=env)
        return time.perf_counter() - start

    return pairs(one, repeats)


def team_server_pairs(env: dict[str, str], repeats: int, root: Path) -> dict | None:
    """Each tree's record stage against a team server over the same work into a local store: ratio server/local."""
    if not have_postgres():
        return None
    trees = {"now": REPO, "base": root / "base"}
    with team_server(env) as client:
        remote = {**env, **client}
        models = iter(model_variants(root / "team-models", 2 * repeats))

        def one(name: str, i: int) -> tuple[float, float]:
            # The same work on both stores: a model new to each (a nudged copy), so both log and register it.
            model = next(models)
            local = record_seconds(trees[name], root / f"team-{name}-local-{i}", env, model)
            return local, record_seconds(trees[name], root / f"team-{name}-server-{i}", remote, model)

        times = in_turns(one, ("now", "base"), repeats)
    result = {}
    for name, measured in times.items():
        local, server = [t[0] for t in measured], [t[1] for t in measured]
        result[name] = {"local_s": round(statistics.median(local), 2), "server_s": round(statistics.median(server), 2),
                        **ratio_spread(server, local)}
    return result


def record_comparison(base: str, repeats: int) -> dict:
    """Every figure of issue 21's item 5, this checkout against `base`, measured in pairs on this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    with tempfile.TemporaryDirectory(prefix="mnist-bench-record-") as folder:
        root = Path(folder)
        trees = {"now": REPO, "base": base_tree(base, root)}
        report: dict = {"base": base}

        def new_store(name: str, i: int) -> float:
            return record_seconds(trees[name], root / f"new-{name}-{i}", env)

        def again(name: str, i: int) -> float:  # the same result once more: a known model, or recorded already
            store = root / f"new-{name}-{i}"
            (store / "recorded").unlink(missing_ok=True)
            return record_seconds(trees[name], store, env)

        report["new_model_new_store"] = pairs(new_store, repeats)
        report["same_result_again"] = pairs(again, repeats)
        for runs in (10, 1000):
            filled = filled_store(root / f"filled-{runs}", runs, env)

            def existing(name: str, i: int, filled: Path = filled, runs: int = runs) -> float:
                return record_seconds(trees[name], copy_store(filled, root / f"filled-{runs}-{name}-{i}"), env)

            def check(name: str, i: int, filled: Path = filled) -> float:
                return check_seconds(trees[name], filled, env)

            report[f"new_model_store_of_{runs}_runs"] = pairs(existing, repeats)
            report[f"check_before_training_{runs}_runs"] = pairs(check, repeats)
        for what in ("new_model_store_of", "check_before_training"):
            small, large = report[f"{what}_10_runs"], report[f"{what}_1000_runs"]
            report[f"{what}_growth_1000_over_10"] = {
                tree: round(large[f"{tree}_s"] / small[f"{tree}_s"], 2) for tree in ("now", "base")}
        report["plot_only_dvc_exp_run"] = plot_only_pairs(trees, root, env, repeats)
        report["team_server"] = team_server_pairs(env, repeats, root)
    return report

