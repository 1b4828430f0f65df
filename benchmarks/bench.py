"""Benchmark: the project's training loop against the seed's, time to 99% accuracy, start-up and recording costs.

Run from the repo root after `dvc repro` (it reads data/raw and data/split):

    python -m benchmarks.bench                      # every section
    python -m benchmarks.bench --only kernel_pins   # one section; the others of reports/benchmark.json stay

The loops and recipes run in this one process on the same data, and speeds are printed as ratios against
a baseline measured here and now, so the numbers compare like with like on whatever machine runs it. The
stages, `mlflow models serve`, the team server, a fresh clone's `dvc repro` (benchmarks/pipeline_times.py) and
the loop with and without the CPU kernel pins (which a process reads once) run in subprocesses, and are reported
as wall times or ratios of turns taken in pairs. It prints a table and writes the same numbers to
reports/benchmark.json, with the CPU each section ran on where it matters. No test asserts a time.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset

from benchmarks.pipeline_times import pipeline_times
from benchmarks.record_vs_base import DEFAULT_BASE, live_curves_cost, record_comparison
from mnist_pipeline import cpu_kernels
from mnist_pipeline.data import load_mnist
from mnist_pipeline.digits import deskew, to_tensor
from mnist_pipeline.files import atomic_write_json
from mnist_pipeline.model import Net
from mnist_pipeline.params import Params, load_params
from tools.stage_commands import stage_commands
from mnist_pipeline.training import load_state_dict, make_deterministic, predict, state_dict_bytes, train

STAGES = ("download", "split", "train", "evaluate", "plot", "record")
# The report's sections, in the order they run; `--only` takes any of them.
SECTIONS = ("throughput", "ddp", "kernel_pins", "default_recipe", "fast_recipe", "peer_recipe", "record_s",
            "record", "live_curves", "team_server", "evaluate_10k_s", "serving", "startup_s", "pipeline", "noop_dvc_repro_s", "gpu_epoch_s")
# The README's fast recipe (section Parameters): the overrides of its `dvc exp run -S` line, which a test checks
# against this. Chosen by time to 99.0% test accuracy among about 25 recipes tried on 2 cores (2-5 epochs, batch
# 64-512, peak lr 0.005-0.03, Adam or SGD, shifts of 0 or 1 pixel, deskewing or not). It names Adam without weight
# decay: the default AdamW's decay ends these 3 epochs (without deskewing) at 98.97%. Deskewed digits make 3 epochs
# enough whatever the seed: without deskewing they end at 99.04% with seed 42 and below 99.0% with seeds 1, 2 and 3;
# with it, at 99.03-99.14% (seeds 42, 1, 2, 3).
FAST_RECIPE = {"epochs": 3, "batch_size": 128, "lr": 0.01, "optimizer": "adam", "weight_decay": 0.0, "deskew": True}
FAST_BAR_S = 10.0  # the bar the fast recipe is held to: 99.0% within 10 s of training on 2 cores


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


def project_throughput(x: torch.Tensor, y: torch.Tensor, params: Params, samples: int, threads: int | None = None
                       ) -> float:
    """Samples per second of the project's loop with the default recipe, over the same number of samples."""
    recipe = dataclasses.replace(params.train, epochs=1, log_every=10**9, num_threads=threads or params.train.num_threads)
    make_deterministic(params.seed, recipe.num_threads)
    start = time.perf_counter()
    train(Net(), (x[:samples], y[:samples]), (x[:10], y[:10]), recipe, params.seed)
    return samples / (time.perf_counter() - start)


def ddp_worker(x: torch.Tensor, y: torch.Tensor, params: Params, samples: int) -> None:
    """Run by torchrun: this process's share of the project's loop over `samples`; rank 0 prints samples/s."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    recipe = dataclasses.replace(params.train, epochs=1, log_every=10**9, num_threads=1)
    make_deterministic(params.seed, recipe.num_threads)
    model = Net()
    dist.barrier()  # time the loop alone, not the processes' start-up
    start = time.perf_counter()
    train(model, (x[:samples], y[:samples]), (x[:10], y[:10]), recipe, params.seed)
    dist.barrier()
    if dist.get_rank() == 0:
        print(json.dumps({"per_s": samples / (time.perf_counter() - start)}))
    dist.destroy_process_group()


def ddp_scaling(x: torch.Tensor, y: torch.Tensor, params: Params, samples: int, repeats: int) -> dict:
    """Samples/s of 1 process x 1 thread, 1 x 2 threads and 2 processes x 1 thread (real torchrun, Gloo), medians.

    The ratio compares the two ways of using 2 cores; the scaling efficiency is the 2 processes' speed-up over
    one process of the same single thread, divided by 2.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "benchmarks.bench", "--ddp-worker", "--samples", str(samples)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rates: dict[str, list[float]] = {"one_by_1": [], "one_by_2": [], "two_by_1": []}
    for _ in range(repeats):  # interleaved, so that a busy moment of a shared machine spreads over all three
        rates["one_by_1"].append(project_throughput(x, y, params, samples, threads=1))
        rates["one_by_2"].append(project_throughput(x, y, params, samples, threads=2))
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rates["two_by_1"].append(json.loads(out.strip().splitlines()[-1])["per_s"])
    median = {k: float(np.median(v)) for k, v in rates.items()}
    return {"samples": samples, "repeats": repeats,
            **{f"{k}_per_s": round(v) for k, v in median.items()},
            **{f"{k}_range": [round(min(v)), round(max(v))] for k, v in rates.items()},
            "ratio_two_by_1_over_one_by_2": round(median["two_by_1"] / median["one_by_2"], 2),
            "scaling_efficiency": round(median["two_by_1"] / (2 * median["one_by_1"]), 2)}


def time_to_accuracy(data: dict[str, tuple[torch.Tensor, torch.Tensor]], params: Params, target: float,
                     probe_every: int) -> dict:
    """Train `params`' recipe, probing validation and test accuracy every `probe_every` iterations.

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
    weights = hashlib.sha256(state_dict_bytes(result.best_state)).hexdigest()

    def first(key: str) -> float | None:
        return next((m["seconds"] for m in marks if m[key] >= target), None)

    return {"train_seconds": round(seconds, 2), "probe_every": probe_every,
            "val_reaches_target_s": first("val_acc"), "test_reaches_target_s": first("test_acc"),
            "final_test_acc": final, "best_weights_sha256": weights, "marks": marks}


class PeerNet(torch.nn.Module):
    """PyTorch's own MNIST example network (pytorch/examples mnist/main.py): 1,199,882 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, 1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = torch.nn.Dropout(0.25)
        self.dropout2 = torch.nn.Dropout(0.5)
        self.fc1 = torch.nn.Linear(9216, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def peer_time_to_accuracy(data: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int, threads: int,
                          target: float, probe_every: int, budget_s: float) -> dict:
    """PyTorch's example recipe (Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64, its 14 epochs) on our split.

    Its batches come from the same in-memory tensors as ours (no DataLoader), which only helps it. Test
    accuracy is probed every `probe_every` iterations with the clock stopped; it stops at `target` or
    after `budget_s` seconds of training, whichever comes first.
    """
    make_deterministic(seed, threads)
    model = PeerNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    (x, y), (test_x, test_y) = data["train"], data["test"]
    generator = torch.Generator().manual_seed(seed)
    seconds, iteration, reached, acc, below = 0.0, 0, None, 0.0, 0.0
    for _epoch in range(14):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            began = time.perf_counter()
            model.train()
            index = order[start : start + 64]
            loss = F.nll_loss(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - began
            iteration += 1
            if iteration % probe_every == 0:
                acc = float((predict(model, test_x).argmax(1) == test_y).double().mean())
                if acc >= target:
                    reached = round(seconds, 2)
                else:
                    below = seconds
            if reached is not None or seconds > budget_s:
                break
        if reached is not None or seconds > budget_s:
            break
        scheduler.step()
    # The time to the target lies between the last probe below it and the first at or above it.
    return {"test_reaches_target_s": reached, "last_probe_below_target_s": round(below, 2),
            "probe_every": probe_every, "train_seconds": round(seconds, 2), "iterations": iteration,
            "last_test_acc": acc, "budget_s": budget_s}


def split_tensors(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
                  train_idx: torch.Tensor, val_idx: torch.Tensor,
                  deskewed: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The train, validation and test sets as the network reads them, as stages/train.py and evaluate.py make them."""
    if deskewed:
        images, test_images = deskew(images), deskew(test_images)
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
            "test": (to_tensor(test_images), torch.from_numpy(test_labels.astype(np.int64)))}


def fast_recipe_runs(arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor],
                     params: Params, runs: int, probe_every: int) -> dict:
    """The fast recipe's time to 99.0% test accuracy over `runs` runs: their spread, and how many were within the bar.

    The runs train the same bits (same seed, same threads), so only the clock differs between them: the
    spread is this machine's, not the recipe's luck. Deskewing the images, as the train and evaluate stages
    do before their work starts, is timed apart from training.
    """
    recipe = dataclasses.replace(params, train=dataclasses.replace(params.train, **FAST_RECIPE))
    images, labels, test_images, test_labels, train_idx, val_idx = arrays
    start = time.perf_counter()
    if recipe.train.deskew:
        images, test_images = deskew(images), deskew(test_images)
    deskew_s = time.perf_counter() - start
    data = split_tensors(images, labels, test_images, test_labels, train_idx, val_idx, deskewed=False)  # done above
    results = [time_to_accuracy(data, recipe, 0.99, probe_every) for _ in range(runs)]
    times = [r["test_reaches_target_s"] for r in results]
    reached = sorted(t for t in times if t is not None)
    every = len(reached) == runs  # a median or range over only the runs that got there would flatter the recipe
    return {"overrides": FAST_RECIPE, "runs": runs, "probe_every": probe_every, "test_reaches_target_s": times,
            "deskew_70k_images_s": round(deskew_s, 2) if recipe.train.deskew else None,
            "runs_reaching_target": len(reached),
            "median_s": float(np.median(reached)) if every else None,
            "range_s": [reached[0], reached[-1]] if every else None,
            "bar_s": FAST_BAR_S, "runs_within_bar": sum(t <= FAST_BAR_S for t in reached),
            "train_seconds": [r["train_seconds"] for r in results],
            "final_test_acc": results[0]["final_test_acc"],
            "same_weights_every_run": len({r["best_weights_sha256"] for r in results}) == 1}


def peer_ratios(peer: dict, default: dict, fast: dict) -> dict:
    """The peer's time to 99.0% over each of ours (above 1: ours is faster).

    When the peer did not reach 99.0% within its budget, its training time stands in for its time to 99.0%,
    so the ratio is a lower bound, and says so.
    """
    reached = peer["test_reaches_target_s"] is not None
    peer_s = peer["test_reaches_target_s"] if reached else peer["train_seconds"]
    ours = {"default": default["test_reaches_target_s"], "fast": fast["median_s"]}
    return {"peer_reached": reached, **{name: round(peer_s / s, 2) if s else None for name, s in ours.items()}}


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


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """Calls a second (one after another), median and 99th-percentile latency in milliseconds."""
    return {"per_s": round(len(seconds) / sum(seconds), 1), "p50_ms": round(1000 * float(np.median(seconds)), 2),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 2)}


def serving_rates(images: np.ndarray, model_path: Path, threads: int, requests: int) -> dict:
    """`mlflow models serve` on single images and batches of 256, against the network's forward pass here.

    The record stage logs this workspace's model into a temporary store; the server runs it with the same
    thread count as the forward pass timed in this process, and one client sends requests one after another
    over one connection. Each row's ratio is the server's rate over the bare forward pass's at that batch size.
    """
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    payloads = {"single image (pixels)": (1, {"inputs": images[:1].tolist()}),
                "single image (PNG file)": (1, {"inputs": [base64.b64encode(png.getvalue()).decode()]}),
                "batch of 256 (pixels)": (256, {"inputs": images[:256].tolist()})}
    net = Net()
    load_state_dict(model_path, net)
    net.eval()
    torch.set_num_threads(threads)
    result = {}
    with tempfile.TemporaryDirectory() as root:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        args = stage_commands()["record"]
        args[args.index("--marker") + 1] = f"{root}/recorded"
        subprocess.run([sys.executable, "-m", "stages.record", *args], check=True, capture_output=True,
                       env={**env, "DVC_ROOT": root})
        port = free_port()
        # `timeout` stops the server even if this process is killed first.
        server = subprocess.Popen(
            ["timeout", "1800", sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist-cnn@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "OMP_NUM_THREADS": str(threads)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            deadline = time.monotonic() + 300
            while True:
                try:
                    connection.request("GET", "/ping")
                    ping = connection.getresponse()
                    ping.read()
                    if ping.status == 200:
                        break
                except OSError:
                    connection.close()
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow models serve did not start")
                time.sleep(0.5)
            connection.close()
            for name, (size, payload) in payloads.items():
                body = json.dumps(payload).encode()
                count = requests if size == 1 else max(10, requests // 10)
                # A connection per payload: the server drops one left idle while the forward pass is timed.
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                served = []
                for i in range(count + 3):  # three to warm up
                    start = time.perf_counter()
                    connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    answer = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"mlflow models serve answered {response.status}: {answer[:200]!r}")
                    if i >= 3:
                        served.append(time.perf_counter() - start)
                connection.close()
                x = to_tensor(images[:size])
                forward = []
                with torch.inference_mode():
                    for i in range(count + 3):
                        start = time.perf_counter()
                        net(x)
                        if i >= 3:
                            forward.append(time.perf_counter() - start)
                serve_stats, forward_stats = latency_stats(served), latency_stats(forward)
                result[name] = {"batch": size, "serve": serve_stats, "forward": forward_stats,
                                "ratio": round(serve_stats["per_s"] / forward_stats["per_s"], 4)}
        finally:
            server.terminate()
            server.wait(timeout=60)
    return result


def team_server_ratio(repeats: int) -> dict | None:
    """The record stage against the team server (PostgreSQL, logins, artifacts over HTTP) over local SQLite.

    Both stores start empty and get the same calls, alternating so that both share the machine's load: a
    first one that logs and registers the model, then `repeats` that find it registered. None without PostgreSQL.
    """
    import secrets
    import shutil
    import statistics

    from mnist_pipeline.errors import PipelineError
    from tools.team_server import pg_bin

    try:
        pg_bin("initdb")
    except PipelineError:
        return None
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16)}
    data = Path(tempfile.mkdtemp(prefix="mnist-bench-team-"))
    data.chmod(0o711)  # PostgreSQL runs as `postgres` under root: it must reach its folder
    server = [sys.executable, "-m", "tools.team_server"]
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def kernel_pin_cost(samples: int, repeats: int) -> dict:
    """Samples/s of the project's loop with the CPU kernel pins and without them, measured in turns.

    The libraries read the pins once, when torch loads, so no process can switch them: each measurement is a
    fresh `python -m benchmarks.bench --loop-worker`, pinned as the stages are (benchmarks/__init__.py) or with
    torch loaded first, which leaves the pins unset. Each turn runs a pair back to back, pinned first in odd
    turns and last in even ones, so that neither order nor a busy moment of a shared machine favours one side.
    """
    worker = ["benchmarks.bench", "--loop-worker", "--samples", str(samples)]
    commands = {"pinned": ["-m", *worker], "unpinned": [*cpu_kernels.UNPINNED_PREFIX, *worker]}
    env = cpu_kernels.without_pins(os.environ)
    rates: dict[str, list[float]] = {"pinned": [], "unpinned": []}
    capability = {}
    for turn in range(repeats):
        for name in ("pinned", "unpinned") if turn % 2 == 0 else ("unpinned", "pinned"):
            out = subprocess.run([sys.executable, *commands[name]], check=True, capture_output=True, text=True,
                                 env=env)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rates[name].append(result["per_s"])
            capability[name] = result["cpu_capability"]
    median = {k: float(np.median(v)) for k, v in rates.items()}
    pairs = [p / u for p, u in zip(rates["pinned"], rates["unpinned"])]
    return {"samples": samples, "repeats": repeats, "cpu": cpu_kernels.cpuinfo_field("model name"),
            "cpu_capability": capability, "pins": cpu_kernels.PINS,
            **{f"{k}_per_s": round(v) for k, v in median.items()},
            "turns_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
            "ratio_pinned_over_unpinned": round(float(np.median(pairs)), 3),
            "ratio_range": [round(min(pairs), 3), round(max(pairs), 3)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=16_000, help="samples for the loop-against-loop ratio")
    parser.add_argument("--repeats", type=positive_int, default=3, help="repeats of the record stage's timing")
    parser.add_argument("--probe-every", type=positive_int, default=100, help="iterations between accuracy probes")
    parser.add_argument("--fast-runs", type=positive_int, default=5, help="runs of the fast recipe")
    parser.add_argument("--fast-probe-every", type=positive_int, default=20, help="iterations between its accuracy probes")
    parser.add_argument("--plot-only-runs", type=positive_int, default=3, help="plot-only experiments timed in a clone")
    parser.add_argument("--peer-budget-s", type=float, default=400.0,
                        help="training seconds PyTorch's example recipe gets to reach 99.0%% test accuracy")
    parser.add_argument("--serve-requests", type=positive_int, default=300, help="single-image requests to the server")
    parser.add_argument("--pin-samples", type=positive_int, default=42_000, help="samples of each kernel pins' turn")
    parser.add_argument("--pin-repeats", type=positive_int, default=9, help="turns of the kernel pins' cost")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="the commit the record section compares this checkout with (default %(default)s)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"measure these alone, keeping the other sections of --out: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark.json"))
    parser.add_argument("--ddp-worker", action="store_true", help="(run by torchrun for the DDP figures)")
    parser.add_argument("--loop-worker", action="store_true", help="(run for the kernel pins' cost)")
    args = parser.parse_args()
    if args.only and not args.out.exists():
        raise SystemExit(f"error: {args.out}: --only updates an earlier report; run the whole benchmark once first")
    params = load_params()
    raw = Path("data/raw")
    images, labels = load_mnist(raw, "train")
    test_images, test_labels = load_mnist(raw, "t10k")
    split = (torch.from_numpy(np.load("data/split/train.npy")), torch.from_numpy(np.load("data/split/val.npy")))
    data = split_tensors(images, labels, test_images, test_labels, *split, params.train.deskew)

    if args.ddp_worker:
        ddp_worker(*data["train"], params, args.samples)
        return
    if args.loop_worker:
        project_throughput(*data["train"], params, 2_048)  # warm-up: oneDNN builds its kernels on first use
        print(json.dumps({"per_s": project_throughput(*data["train"], params, args.samples),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
        return
    sections = {
        "throughput": lambda: throughput(raw, data, params, args.samples),
        "ddp": lambda: ddp_scaling(*data["train"], params, args.samples, args.repeats),
        "kernel_pins": lambda: kernel_pin_cost(args.pin_samples, args.pin_repeats),
        "default_recipe": lambda: time_to_accuracy(data, params, 0.99, args.probe_every),
        "fast_recipe": lambda: fast_recipe_runs((images, labels, test_images, test_labels, *split), params,
                                                args.fast_runs, args.fast_probe_every),
        # Probed every 100 of its batches of 64 (6,400 samples; ours: 25,600 for the default, 2,560 for the fast).
        "peer_recipe": lambda: peer_time_to_accuracy(data, params.seed, params.train.num_threads, 0.99, 100,
                                                     args.peer_budget_s),
        "record_s": lambda: recording_seconds(args.repeats),
        "record": lambda: record_comparison(args.base, args.repeats),
        "live_curves": lambda: live_curves_cost(args.repeats),
        "team_server": lambda: team_server_ratio(args.repeats),
        "evaluate_10k_s": lambda: evaluation_seconds(data, params),
        "serving": lambda: serving_rates(test_images, Path("models/model.pt"), params.train.num_threads,
                                         args.serve_requests),
        "startup_s": startup_seconds,
        "pipeline": lambda: pipeline_times(Path.cwd(), raw, params.plot.n_images, args.plot_only_runs),
        "noop_dvc_repro_s": noop_repro_seconds,
        "gpu_epoch_s": lambda: gpu_epoch_seconds(data, params),
    }
    report = json.loads(args.out.read_text()) if args.only else {}
    cpu = cpu_kernels.cpuinfo_field("model name") or "unknown"
    for name in args.only or SECTIONS:
        report[name] = sections[name]()
        report.setdefault("measured_on", {})[name] = cpu  # --only mixes sections of other runs, maybe other CPUs
    report.update(threads=params.train.num_threads, torch=torch.__version__)
    report["peer_ratios"] = peer_ratios(report["peer_recipe"], report["default_recipe"], report["fast_recipe"])
    atomic_write_json(args.out, report)
    print_table(report)


def throughput(raw: Path, data: dict[str, tuple[torch.Tensor, torch.Tensor]], params: Params, samples: int) -> dict:
    """The project's loop against the seed-style loop, over the same number of samples."""
    seed_rate = seed_style_throughput(raw, samples, params.train.num_threads)
    ours_rate = project_throughput(*data["train"], params, samples)
    return {"samples": samples, "seed_style_per_s": round(seed_rate), "project_per_s": round(ours_rate),
            "ratio": round(ours_rate / seed_rate, 2)}


def serving_rows(serving: dict) -> list[tuple[str, str]]:
    """Per payload: the server's rate and latency, the forward pass's, and their ratio."""
    rows = []
    for name, r in serving.items():
        s, f = r["serve"], r["forward"]
        rows += [(f"mlflow models serve, {name}",
                  f"{s['per_s']} requests/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms"),
                 (f"  forward pass, batch of {r['batch']}", f"{f['per_s']} calls/s, p50 {f['p50_ms']} ms, "
                  f"p99 {f['p99_ms']} ms"),
                 ("  ratio, serving / forward pass", f"{r['ratio']}x")]
    return rows


def print_table(report: dict) -> None:
    """The numbers a person reads, one per line."""
    t, r, k, d = report["throughput"], report["default_recipe"], report["record_s"], report["ddp"]
    rows = [
        ("seed-style loop (batch 16, DataLoader)", f"{t['seed_style_per_s']} samples/s"),
        ("project loop (default recipe)", f"{t['project_per_s']} samples/s"),
        ("throughput ratio, project / seed-style", f"{t['ratio']}x"),
        ("project loop, 1 process x 1 thread", f"{d['one_by_1_per_s']} samples/s"),
        ("project loop, 1 process x 2 threads", f"{d['one_by_2_per_s']} samples/s"),
        ("project loop, 2 processes x 1 thread (torchrun, Gloo)", f"{d['two_by_1_per_s']} samples/s"),
        ("  ratio, 2 processes x 1 / 1 process x 2 threads", f"{d['ratio_two_by_1_over_one_by_2']}x"),
        ("  scaling efficiency, 2 processes / (2 x 1 process, 1 thread)", f"{d['scaling_efficiency']}"),
        *kernel_pin_rows(report.get("kernel_pins")),
        ("default recipe: training time", f"{r['train_seconds']} s"),
        (f"  validation accuracy first >= 99.0% (probed every {r['probe_every']} it)",
         f"{r['val_reaches_target_s']} s"),
        ("  test accuracy first >= 99.0%", f"{r['test_reaches_target_s']} s"),
        ("  final test accuracy (best model)", f"{100 * r['final_test_acc']:.2f}%"),
        *fast_rows(report["fast_recipe"]),
        *peer_rows(report["peer_recipe"], report["peer_ratios"]),
        ("record stage, a new model (store created)", f"{k['new_model_s']} s"),
        ("record stage, a model already registered", f"{k['known_model_s']} s"),
        ("tracking overhead, (training + record) / training",
         f"{(r['train_seconds'] + k['new_model_s']) / r['train_seconds']:.3f}"),
        *record_rows(report.get("record")),
        *live_curves_rows(report.get("live_curves")),
        *team_server_rows(report["team_server"]),
        ("evaluate 10,000 test images", f"{report['evaluate_10k_s']} s"),
        *serving_rows(report["serving"]),
        *((f"start-up of stage {s}", f"{v} s") for s, v in report["startup_s"].items()),
        *pipeline_rows(report["pipeline"]),
        ("no-op `dvc repro`", "n/a (not up to date)" if report["noop_dvc_repro_s"] is None
         else f"{report['noop_dvc_repro_s']} s"),
        ("GPU epoch", "n/a (no CUDA device)" if report["gpu_epoch_s"] is None else f"{report['gpu_epoch_s']} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def live_curves_rows(live: dict | None) -> list[tuple[str, str]]:
    if live is None:
        return [("train stage with its live MLflow run / without", "n/a (not measured in this report)")]
    return [(f"train stage ({live['epochs']} epoch) with its live MLflow run / without, loop",
             f"{live['loop']['on_s']} s / {live['loop']['off_s']} s = {live['loop']['ratio']}x "
             f"({live['loop']['ratio_min']}-{live['loop']['ratio_max']})"),
            ("  the whole stage", f"{live['stage']['on_s']} s / {live['stage']['off_s']} s = {live['stage']['ratio']}x "
                                  f"({live['stage']['ratio_min']}-{live['stage']['ratio_max']})")]


def record_rows(record: dict | None) -> list[tuple[str, str]]:
    """This checkout's record against the base commit's, each a median of pairs (ratio: now / base)."""
    if record is None:
        return [("record, this checkout / base commit", "n/a (not measured in this report)")]

    def row(what: str, pair: dict) -> tuple[str, str]:
        return (f"  {what}", f"{pair['now_s']} s / {pair['base_s']} s = {pair['ratio']}x "
                             f"({pair['ratio_min']}-{pair['ratio_max']})")

    rows = [(f"record, this checkout / {record['base']} (medians of pairs)", ""),
            row("a new model, new store", record["new_model_new_store"]),
            row("the same result again (base: a known model)", record["same_result_again"]),
            row("a new model, store of 10 runs", record["new_model_store_of_10_runs"]),
            row("a new model, store of 1,000 runs", record["new_model_store_of_1000_runs"]),
            row("check before training, store of 10 runs", record["check_before_training_10_runs"]),
            row("check before training, store of 1,000 runs", record["check_before_training_1000_runs"]),
            row("plot-only `dvc exp run`", record["plot_only_dvc_exp_run"])]
    for what in ("new_model_store_of", "check_before_training"):
        growth = record[f"{what}_growth_1000_over_10"]
        rows.append((f"  {what.replace('_', ' ')}: 1,000 runs / 10 runs", f"{growth['now']}x (base {growth['base']}x)"))
    team = record["team_server"]
    if team is not None:
        rows.append(("  team server / local store, a new model",
                     f"{team['now']['ratio']}x ({team['now']['ratio_min']}-{team['now']['ratio_max']}); "
                     f"base {team['base']['ratio']}x"))
    return rows


def kernel_pin_rows(pins: dict | None) -> list[tuple[str, str]]:
    if pins is None:
        return [("project loop, CPU kernels pinned / not pinned", "n/a (not measured in this report)")]
    capability = pins["cpu_capability"]
    return [
        (f"project loop, CPU kernels pinned ({capability['pinned']}, as the stages run)",
         f"{pins['pinned_per_s']} samples/s"),
        (f"project loop, CPU kernels not pinned ({capability['unpinned']})", f"{pins['unpinned_per_s']} samples/s"),
        (f"  ratio, pinned / not pinned: median of {pins['repeats']} back-to-back pairs",
         f"{pins['ratio_pinned_over_unpinned']}x (pairs {pins['ratio_range'][0]}x to {pins['ratio_range'][1]}x; "
         f"{pins['cpu']})"),
    ]


def fast_rows(fast: dict) -> list[tuple[str, str]]:
    times = ", ".join("-" if t is None else f"{t}" for t in fast["test_reaches_target_s"])
    overrides = " ".join(f"-S train.{k}={str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in fast["overrides"].items())
    deskewing = [] if fast.get("deskew_70k_images_s") is None else [
        ("  deskewing the 70,000 images first (not in the times below)", f"{fast['deskew_70k_images_s']} s")]
    return [
        ("fast recipe (see Parameters)", overrides),
        *deskewing,
        (f"  test accuracy first >= 99.0% (probed every {fast['probe_every']} it)", f"after {times} s"),
        (f"  median, range; runs within {fast['bar_s']:.0f} s",
         f"{fast['median_s']} s, {fast['range_s']}; {fast['runs_within_bar']} of {fast['runs']}"
         if fast["median_s"] is not None else f"{fast['runs_reaching_target']} of {fast['runs']} reached 99.0%"),
        ("  final test accuracy (best model); same weights every run",
         f"{100 * fast['final_test_acc']:.2f}%; {fast['same_weights_every_run']}"),
    ]


def peer_rows(peer: dict, ratios: dict) -> list[tuple[str, str]]:
    name = f"peer, PyTorch's example: test accuracy first >= 99.0% (probed every {peer['probe_every']} it)"
    if peer["test_reaches_target_s"] is None:
        first, bound = f"not within {peer['budget_s']:.0f} s (last probe {100 * peer['last_test_acc']:.2f}%)", "at least "
    else:
        first, bound = f"{peer['test_reaches_target_s']} s (the probe before: {peer['last_probe_below_target_s']} s)", ""
    return [(name, first), *((f"  ratio, peer's time to 99.0% / {recipe} recipe's",
                              "n/a" if ratios[recipe] is None else f"{bound}{ratios[recipe]}x")
                             for recipe in ("default", "fast"))]


def pipeline_rows(pipeline: dict) -> list[tuple[str, str]]:
    def shares(split: dict) -> str:
        ran = ", ".join(f"{name} {s}" for name, s in split["ran"].items())
        skipped = ", ".join(split["skipped"]) or "none"
        return f"DVC start-up {split['dvc_start']}, {ran} s (skipped: {skipped})"

    runs = pipeline["plot_only_exps"]
    middle = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    return [
        ("fresh clone `dvc repro` (MNIST from a local mirror)", f"{pipeline['fresh_clone_repro_s']} s"),
        ("  by stage", shares(pipeline["stages"])),
        ("  all but the training loop", f"{pipeline['fresh_clone_without_training_loop_s']} s "
                                        f"(the loop: {pipeline['training_loop_s']} s)"),
        ("plot-only `dvc exp run -S plot.n_images=...`",
         f"median {pipeline['plot_only_exp_median_s']} s of {[run['seconds'] for run in runs]}"),
        (f"  by stage (n_images={middle['n_images']})", shares(middle)),
    ]


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
