"""Benchmark: the project's training loop against the seed's, time to 99% accuracy, start-up and recording costs.

Run from the repo root after `dvc repro` (it reads data/raw and data/split):

    python -m benchmarks.bench

Everything runs in this one process on the same data, and speeds are printed as ratios against a
baseline measured here and now, so the numbers compare like with like on whatever machine runs it.
It prints a table and writes the same numbers to reports/benchmark.json. No test asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset

from mnist_pipeline.data import load_mnist
from mnist_pipeline.files import atomic_write_json
from mnist_pipeline.model import Net
from mnist_pipeline.params import Params, load_params
from mnist_pipeline.stage_commands import stage_commands
from mnist_pipeline.training import make_deterministic, predict, to_tensor, train

STAGES = ("download", "split", "train", "evaluate", "plot", "record")


def seed_style_throughput(raw: Path, samples: int, threads: int) -> float:
    """Samples per second of the notebook's loop: torchvision's MNIST with ToTensor, a DataLoader, batch 16."""
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)
        for path in raw.iterdir():
            (Path(root) / "MNIST" / "raw" / path.name).symlink_to(path.resolve())
        dataset = torchvision.datasets.MNIST(root, train=True, transform=torchvision.transforms.ToTensor())
        loader = DataLoader(Subset(dataset, range(samples)), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        model = Net()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return samples / (time.perf_counter() - start)


def project_throughput(x: torch.Tensor, y: torch.Tensor, params: Params, samples: int) -> float:
    """Samples per second of the project's loop with the default recipe, over the same number of samples."""
    recipe = dataclasses.replace(params.train, epochs=1, log_every=10**9)
    make_deterministic(params.seed, recipe.num_threads)
    start = time.perf_counter()
    train(Net(), (x[:samples], y[:samples]), (x[:10], y[:10]), recipe, params.seed)
    return samples / (time.perf_counter() - start)


def time_to_accuracy(data: dict[str, tuple[torch.Tensor, torch.Tensor]], params: Params, target: float,
                     probe_every: int) -> dict:
    """Train the default recipe, probing validation and test accuracy every `probe_every` iterations.

    The clock stops during the probes, and they change nothing in the training (this network has no
    dropout or batch norm, and the probes draw no random numbers), so the times are those of the
    recipe itself, at a finer grain than its reports every `log_every` iterations.
    """
    make_deterministic(params.seed, params.train.num_threads)
    model = Net()
    (val_x, val_y), (test_x, test_y) = data["val"], data["test"]
    marks: list[dict] = []
    start = time.perf_counter()
    paused = 0.0
    iteration = 0

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((predict(model, x).argmax(1) == y).double().mean())

    def on_step() -> None:
        nonlocal paused, iteration
        iteration += 1
        if iteration % probe_every:
            return
        began = time.perf_counter()
        marks.append({"iteration": iteration, "seconds": round(began - start - paused, 2),
                      "val_acc": accuracy(val_x, val_y), "test_acc": accuracy(test_x, test_y)})
        model.train()
        paused += time.perf_counter() - began

    result = train(model, data["train"], data["val"], params.train, params.seed, on_step=on_step)
    seconds = time.perf_counter() - start - paused
    model.load_state_dict(result.best_state)
    final = accuracy(test_x, test_y)

    def first(key: str) -> float | None:
        return next((m["seconds"] for m in marks if m[key] >= target), None)

    return {"train_seconds": round(seconds, 2), "probe_every": probe_every,
            "val_reaches_target_s": first("val_acc"), "test_reaches_target_s": first("test_acc"),
            "final_test_acc": final, "marks": marks}


def recording_seconds(repeats: int) -> dict:
    """Wall time of the record stage on this workspace's outputs, into a fresh temporary store.

    Training makes no MLflow call at all; recording a result is the whole of the tracking cost. The
    first call creates the store and logs the model; the next ones find that model registered and
    only point at it, as a plot-only experiment does.
    """
    with tempfile.TemporaryDirectory() as root:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        times = [record_once(env, root) for _ in range(1 + repeats)]
    return {"new_model_s": round(times[0], 2), "known_model_s": round(min(times[1:]), 2)}


def team_server_ratio(repeats: int) -> dict | None:
    """The record stage against the team server (PostgreSQL, logins, artifacts over HTTP) over local SQLite.

    Both stores start empty and get the same calls, alternating so that both share the machine's load: a
    first one that logs and registers the model, then `repeats` that find it registered. None without PostgreSQL.
    """
    import secrets
    import shutil
    import statistics

    from mnist_pipeline.errors import PipelineError
    from mnist_pipeline.team_server import pg_bin

    try:
        pg_bin("initdb")
    except PipelineError:
        return None
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16)}
    data = Path(tempfile.mkdtemp(prefix="mnist-bench-team-"))
    data.chmod(0o711)  # PostgreSQL runs as `postgres` under root: it must reach its folder
    server = [sys.executable, "-m", "mnist_pipeline.team_server"]
    here = Path(__file__).resolve().parents[1]  # where the package is, whatever the working folder
    port, db_port = free_port(), free_port()
    try:
        subprocess.run([*server, "start", "--data", str(data), "--port", str(port), "--db-port", str(db_port),
                        "--stop-after", "3600"], check=True, capture_output=True, cwd=here,
                       env={**base, "MLFLOW_AUTH_ADMIN_PASSWORD": admin["MLFLOW_TRACKING_PASSWORD"]})
        stores = {"sqlite": {}, "server": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", **admin}}
        times: dict[str, list[float]] = {"sqlite": [], "server": []}
        with tempfile.TemporaryDirectory() as root:
            for i in range(1 + repeats):
                for name in (("sqlite", "server") if i % 2 == 0 else ("server", "sqlite")):
                    times[name].append(record_once({**base, **stores[name]}, f"{root}/{name}"))
    finally:
        subprocess.run([*server, "stop", "--data", str(data)], capture_output=True, cwd=here)
        shutil.rmtree(data, ignore_errors=True)
    known = [s / q for s, q in zip(times["server"][1:], times["sqlite"][1:])]
    return {"new_model_sqlite_s": round(times["sqlite"][0], 2), "new_model_server_s": round(times["server"][0], 2),
            "new_model_ratio": round(times["server"][0] / times["sqlite"][0], 2),
            "known_model_ratio_median": round(statistics.median(known), 2),
            "known_model_ratio_min": round(min(known), 2), "known_model_ratio_max": round(max(known), 2),
            "pairs": len(known)}


def record_once(env: dict[str, str], root: str) -> float:
    """Seconds of one record stage on this workspace's outputs, its marker (and a local store) under `root`."""
    Path(root).mkdir(exist_ok=True)
    args = stage_commands()["record"]
    args[args.index("--marker") + 1] = f"{root}/recorded"  # leave the workspace's marker alone
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "stages.record", *args], capture_output=True, text=True,
                            env={**env, "DVC_ROOT": root})
    if result.returncode != 0:
        sys.exit(f"benchmark: the record stage failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - start


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluation_seconds(data: dict[str, tuple[torch.Tensor, torch.Tensor]], params: Params) -> float:
    """Seconds to score the 10,000 test images, best of three."""
    model = Net()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        predict(model, data["test"][0], params.evaluate.batch_size)
        runs.append(time.perf_counter() - start)
    return round(min(runs), 3)


def startup_seconds() -> dict[str, float]:
    """Seconds each stage takes to start (imports and argument parsing, via --help), best of two."""
    result = {}
    for stage in STAGES:
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


def gpu_epoch_seconds(data: dict[str, tuple[torch.Tensor, torch.Tensor]], params: Params) -> float | None:
    """One epoch of the default recipe on CUDA, if there is a GPU."""
    if not torch.cuda.is_available():
        return None
    recipe = dataclasses.replace(params.train, epochs=1)
    make_deterministic(params.seed, recipe.num_threads)
    model = Net().cuda()
    start = time.perf_counter()
    train(model, data["train"], data["val"], recipe, params.seed)
    torch.cuda.synchronize()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16_000, help="samples for the loop-against-loop ratio")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the record stage's timing")
    parser.add_argument("--probe-every", type=int, default=100, help="iterations between accuracy probes")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark.json"))
    args = parser.parse_args()
    params = load_params()
    raw = Path("data/raw")
    images, labels = load_mnist(raw, "train")
    test_images, test_labels = load_mnist(raw, "t10k")
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    train_idx = torch.from_numpy(np.load("data/split/train.npy"))
    val_idx = torch.from_numpy(np.load("data/split/val.npy"))
    data = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
            "test": (to_tensor(test_images), torch.from_numpy(test_labels.astype(np.int64)))}

    seed_rate = seed_style_throughput(raw, args.samples, params.train.num_threads)
    ours_rate = project_throughput(*data["train"], params, args.samples)
    report = {
        "throughput": {"samples": args.samples, "seed_style_per_s": round(seed_rate),
                       "project_per_s": round(ours_rate), "ratio": round(ours_rate / seed_rate, 2)},
        "default_recipe": time_to_accuracy(data, params, 0.99, args.probe_every),
        "record_s": recording_seconds(args.repeats),
        "team_server": team_server_ratio(args.repeats),
        "evaluate_10k_s": evaluation_seconds(data, params),
        "startup_s": startup_seconds(),
        "noop_dvc_repro_s": noop_repro_seconds(),
        "gpu_epoch_s": gpu_epoch_seconds(data, params),
        "threads": params.train.num_threads,
        "torch": torch.__version__,
    }
    atomic_write_json(args.out, report)
    print_table(report)


def print_table(report: dict) -> None:
    """The numbers a person reads, one per line."""
    t, r, k = report["throughput"], report["default_recipe"], report["record_s"]
    rows = [
        ("seed-style loop (batch 16, DataLoader)", f"{t['seed_style_per_s']} samples/s"),
        ("project loop (default recipe)", f"{t['project_per_s']} samples/s"),
        ("throughput ratio, project / seed-style", f"{t['ratio']}x"),
        ("default recipe: training time", f"{r['train_seconds']} s"),
        (f"  validation accuracy first >= 99.0% (probed every {r['probe_every']} it)",
         f"{r['val_reaches_target_s']} s"),
        ("  test accuracy first >= 99.0%", f"{r['test_reaches_target_s']} s"),
        ("  final test accuracy (best model)", f"{100 * r['final_test_acc']:.2f}%"),
        ("record stage, a new model (store created)", f"{k['new_model_s']} s"),
        ("record stage, a model already registered", f"{k['known_model_s']} s"),
        ("tracking overhead, (training + record) / training",
         f"{(r['train_seconds'] + k['new_model_s']) / r['train_seconds']:.3f}"),
        *team_server_rows(report["team_server"]),
        ("evaluate 10,000 test images", f"{report['evaluate_10k_s']} s"),
        *((f"start-up of stage {s}", f"{v} s") for s, v in report["startup_s"].items()),
        ("no-op `dvc repro`", "n/a (not up to date)" if report["noop_dvc_repro_s"] is None
         else f"{report['noop_dvc_repro_s']} s"),
        ("GPU epoch", "n/a (no CUDA device)" if report["gpu_epoch_s"] is None else f"{report['gpu_epoch_s']} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def team_server_rows(team: dict | None) -> list[tuple[str, str]]:
    if team is None:
        return [("record stage, team server / local SQLite", "n/a (no PostgreSQL)")]
    return [
        ("record stage, team server / local SQLite, a new model",
         f"{team['new_model_ratio']}x ({team['new_model_server_s']} s / {team['new_model_sqlite_s']} s)"),
        ("record stage, team server / local SQLite, a known model",
         f"{team['known_model_ratio_median']}x (median of {team['pairs']}; "
         f"{team['known_model_ratio_min']} to {team['known_model_ratio_max']})"),
    ]


if __name__ == "__main__":
    main()
