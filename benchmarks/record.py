"""What tracking costs: the record stage into a fresh store or a team server, and training with its live MLflow run.

Sections `record_s`, `live_curves` and `team_server` of benchmarks/bench.py; benchmarks/record_vs_base.py times
the same record stage against a base commit's. Each stage runs in a process of its own on this workspace's outputs,
its marker and local store in a temporary folder (DVC_ROOT), so the workspace's own are left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from benchmarks.pipeline_times import LOOP_DONE
from benchmarks.turns import in_turns, ratio_spread
from mnist_pipeline.errors import PipelineError
from tools.local_server import free_port
from tools.stage_commands import stage_commands
from tools.team_server import pg_bin

REPO = Path(__file__).resolve().parents[1]


def record_args(tree: Path, marker: Path, model: Path | None) -> list[str]:
    """The record stage's arguments in `tree`'s dvc.yaml, on this workspace's outputs (absolute paths)."""
    args = stage_commands(tree / "dvc.yaml")["record"]
    given = {"--marker": marker, "--model": model}
    return [arg if arg.startswith("--") else str(given.get(args[i - 1]) or REPO / arg) for i, arg in enumerate(args)]


def record_seconds(tree: Path, store_root: Path, env: dict[str, str], model: Path | None = None) -> float:
    """One record stage of `tree`'s code into the store under `store_root` (its marker there too)."""
    store_root.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "stages.record", *record_args(tree, store_root / "recorded", model)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(tree), "DVC_ROOT": str(store_root)})
    if result.returncode != 0:
        sys.exit(f"benchmark: {tree.name}'s record stage failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - start


def recording_seconds(repeats: int) -> dict:
    """Wall time of the record stage on this workspace's outputs, into a fresh temporary store.

    Training makes no MLflow call at all; recording a result is the whole of the tracking cost. The
    first call creates the store and logs the model; the next ones find that model registered and
    only point at it, as a plot-only experiment does.
    """
    with tempfile.TemporaryDirectory() as root:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        times = [record_seconds(REPO, Path(root), env) for _ in range(1 + repeats)]
    return {"new_model_s": round(times[0], 2), "known_model_s": round(min(times[1:]), 2)}


def have_postgres() -> bool:
    """Whether PostgreSQL, which the team server runs on, is installed here."""
    try:
        pg_bin("initdb")
    except PipelineError:
        return False
    return True


@contextmanager
def team_server(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A team server of its own (tools/team_server.py) while the block runs; yields what a client adds to `env`."""
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16)}
    data = Path(tempfile.mkdtemp(prefix="mnist-bench-team-"))
    data.chmod(0o711)  # PostgreSQL runs as `postgres` under root: it must reach its folder
    server = [sys.executable, "-m", "tools.team_server"]
    port, db_port = free_port(), free_port()
    try:
        subprocess.run([*server, "start", "--data", str(data), "--port", str(port), "--db-port", str(db_port),
                        "--stop-after", "3600"], check=True, capture_output=True, cwd=REPO,
                       env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD": admin["MLFLOW_TRACKING_PASSWORD"]})
        yield {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", **admin}
    finally:
        subprocess.run([*server, "stop", "--data", str(data)], capture_output=True, cwd=REPO)
        shutil.rmtree(data, ignore_errors=True)


def team_server_ratio(repeats: int) -> dict | None:
    """The record stage against the team server (PostgreSQL, logins, artifacts over HTTP) over local SQLite.

    Both stores start empty and get the same calls, in turns: a first one that logs and registers the model,
    then `repeats` that find it registered. None without PostgreSQL.
    """
    if not have_postgres():
        return None
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with team_server(base) as client, tempfile.TemporaryDirectory() as root:
        stores = {"sqlite": base, "server": {**base, **client}}
        times = in_turns(lambda name, _turn: record_seconds(REPO, Path(root) / name, stores[name]),
                         ("sqlite", "server"), 1 + repeats)
    known = ratio_spread(times["server"][1:], times["sqlite"][1:])
    return {"new_model_sqlite_s": round(times["sqlite"][0], 2), "new_model_server_s": round(times["server"][0], 2),
            "new_model_ratio": round(times["server"][0] / times["sqlite"][0], 2),
            "known_model_ratio_median": known["ratio"],
            "known_model_ratio_min": known["ratio_min"], "known_model_ratio_max": known["ratio_max"],
            "pairs": repeats}


def live_curves_cost(repeats: int, epochs: int = 1) -> dict:
    """The train stage with its live MLflow run against MNIST_LIVE_CURVES=off, in turns, on the real data
    (`epochs` of training, the other params as committed), each into a fresh store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MNIST_LIVE"))}
    args = stage_commands(REPO / "dvc.yaml")["train"]
    with tempfile.TemporaryDirectory(prefix="mnist-bench-live-") as folder:
        root = Path(folder)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["train"]["epochs"] = epochs
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (root / "data").mkdir()
        for name in ("raw", "split"):
            (root / "data" / name).symlink_to(REPO / "data" / name)

        def one(switch: str, i: int) -> tuple[float, float]:
            store = root / f"{switch}-{i}"
            store.mkdir()
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=root, capture_output=True,
                                    text=True, env={**env, "PYTHONPATH": str(REPO), "DVC_ROOT": str(store),
                                                    "MNIST_LIVE_CURVES": switch})
            total = time.perf_counter() - start
            loop = LOOP_DONE.search(result.stdout)
            if result.returncode != 0 or loop is None:
                sys.exit(f"benchmark: the train stage failed: {result.stderr.strip()[-300:]}")
            return float(loop.group(1)), total

        times = in_turns(one, ("on", "off"), repeats)
    report = {}
    for what, index in (("loop", 0), ("stage", 1)):
        on, off = [t[index] for t in times["on"]], [t[index] for t in times["off"]]
        report[what] = {"on_s": round(statistics.median(on), 2), "off_s": round(statistics.median(off), 2),
                        **ratio_spread(on, off, digits=3)}
    return {"epochs": epochs, "pairs": repeats, **report}
