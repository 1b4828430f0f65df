"""The training loop's speed: against the seed's, in two processes, with and without the CPU kernel pins, on a GPU.

Sections `loop`, `ddp`, `kernel_pins` and `gpu_epoch_s` of benchmarks/bench.py. The DDP figures and the kernel
pins' cost run the loop in processes of their own, `python -m benchmarks.loop [--ddp] --samples N`, each of which
prints its samples/s as a JSON line.
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

from benchmarks.turns import in_turns, ratio_spread
from benchmarks.workspace import Tensors, load_workspace
from mnist_pipeline import cpu_kernels
from mnist_pipeline.model import Net
from mnist_pipeline.params import Params, load_params
from mnist_pipeline.training import make_deterministic, train


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
    recipe = dataclasses.replace(params.train, epochs=1, log_every=10**9,
                                 num_threads=threads or params.train.num_threads)
    make_deterministic(params.seed, recipe.num_threads)
    start = time.perf_counter()
    train(Net(), (x[:samples], y[:samples]), (x[:10], y[:10]), recipe, params.seed)
    return samples / (time.perf_counter() - start)


def loop_against_loop(raw: Path, data: Tensors, params: Params, samples: int) -> dict:
    """The project's loop against the seed-style loop, over the same number of samples."""
    seed_rate = seed_style_throughput(raw, samples, params.train.num_threads)
    ours_rate = project_throughput(*data["train"], params, samples)
    return {"samples": samples, "seed_style_per_s": round(seed_rate), "project_per_s": round(ours_rate),
            "ratio": round(ours_rate / seed_rate, 2)}


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
               "-m", "benchmarks.loop", "--ddp", "--samples", str(samples)]
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


def kernel_pin_cost(samples: int, repeats: int) -> dict:
    """Samples/s of the project's loop with the CPU kernel pins and without them, measured in turns.

    The libraries read the pins once, when torch loads, so no process can switch them: each measurement is a
    fresh `python -m benchmarks.loop`, pinned as the stages are (benchmarks/__init__.py) or with torch loaded
    first, which leaves the pins unset.
    """
    worker = ["benchmarks.loop", "--samples", str(samples)]
    commands = {"pinned": ["-m", *worker], "unpinned": [*cpu_kernels.UNPINNED_PREFIX, *worker]}
    env = cpu_kernels.without_pins(os.environ)

    def one(name: str, _turn: int) -> dict:
        out = subprocess.run([sys.executable, *commands[name]], check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = in_turns(one, ("pinned", "unpinned"), repeats)
    rates = {name: [result["per_s"] for result in turns] for name, turns in results.items()}
    median = {k: float(np.median(v)) for k, v in rates.items()}
    spread = ratio_spread(rates["pinned"], rates["unpinned"], digits=3)
    return {"samples": samples, "repeats": repeats, "cpu": cpu_kernels.cpuinfo_field("model name"),
            "cpu_capability": {name: turns[-1]["cpu_capability"] for name, turns in results.items()},
            "pins": cpu_kernels.PINS,
            **{f"{k}_per_s": round(v) for k, v in median.items()},
            "turns_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
            "ratio_pinned_over_unpinned": spread["ratio"], "ratio_range": [spread["ratio_min"], spread["ratio_max"]]}


def gpu_epoch_seconds(data: Tensors, params: Params) -> float | None:
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
    """One measurement in a process of its own: the loop's samples/s, printed as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, required=True, help="samples of the loop")
    parser.add_argument("--ddp", action="store_true", help="a torchrun worker: this process's share of the loop")
    args = parser.parse_args()
    params = load_params()
    x, y = load_workspace(params.train.deskew).data["train"]
    if args.ddp:
        ddp_worker(x, y, params, args.samples)
        return
    project_throughput(x, y, params, 2_048)  # warm-up: oneDNN builds its kernels on first use
    print(json.dumps({"per_s": project_throughput(x, y, params, args.samples),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))


if __name__ == "__main__":
    main()
