"""DVC stage train: train the seed's CNN and keep the best model by validation accuracy, on 1 or more processes."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mnist_pipeline import cpu_kernels, digits, distributed, training
from mnist_pipeline.data import load_mnist
from mnist_pipeline.digits import deskew, to_tensor
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from mnist_pipeline.live_run import append_report, live_run
from mnist_pipeline.machine import provenance, write_trained_on
from mnist_pipeline.model import Net
from mnist_pipeline.params import PARAMS_FILE, Params, ParamsError, flatten, load_params
from mnist_pipeline.store import check_store, resolve_store
from mnist_pipeline.training import (LogRow, check_learned, make_deterministic, select_device, state_dict_bytes,
                                     train)
from stages import say_kernel_notes

PROGRESS_EVERY_S = 5.0

def load_indices(split_dir: Path, name: str, n: int) -> torch.Tensor:
    """Indices from the split stage, checked to lie in range(n)."""
    path = split_dir / f"{name}.npy"
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: cannot be read as a .npy array of indices ({err})") from None
    in_range = indices.size == 0 or 0 <= indices.min() <= indices.max() < n
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or not in_range:
        raise PipelineError(f"{path}: expected 1-D integer indices in [0, {n}), got {indices.dtype} {indices.shape}")
    return torch.from_numpy(indices.astype(np.int64))


def check_batch_size(batch_size: int, split_dir: Path) -> None:
    """Refuse a batch larger than the training split before any work (a broken split file is reported later)."""
    path = split_dir / "train.npy"
    try:
        count = len(np.load(path, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError, TypeError):
        return
    if batch_size > count:
        raise ParamsError(PARAMS_FILE, "train.batch_size", f"{batch_size} is larger than the {count:,} training images "
                          f"in {path}; set at most {count}")


def log_csv(rows: list[LogRow]) -> str:
    """The periodic metrics as CSV, the training curves of `dvc plots`."""
    lines = ["iteration,epoch,train_acc,train_loss,val_acc"]
    lines += [f"{r.iteration},{r.epoch},{r.train_acc:.6f},{r.train_loss:.6f},{r.val_acc:.6f}" for r in rows]
    return "\n".join(lines) + "\n"


class LogProgress:
    """Progress for a log, where a bar cannot redraw (DVC's stage output): a line every few seconds."""

    def __init__(self, total: int, every_s: float = PROGRESS_EVERY_S) -> None:
        self.total, self.every_s, self.done = total, every_s, 0
        self.start = self.last = time.monotonic()

    def update(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            self.write(f"train: iteration {self.done}/{self.total} ({100 * self.done // self.total}%), "
                       f"{rate:.0f} it/s, about {(self.total - self.done) / rate:.0f} s left")

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def launch(params: Params, device: torch.device, args: list[str], outputs: list[Path]) -> None:
    """Train on train.processes processes under torchrun; a failure is one line and a FAILED MLflow run."""
    here = distributed.processes_here(params.train.processes, device)
    distributed.check_rendezvous_port()
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_tags = {**provenance(), "train.device": device.type, "train.world_size": str(params.train.processes),
                   "train.backend": backend}  # where it trains, as record tags a result
    with live_run(params.mlflow.experiment, outputs, flatten(params), device_tags) as live:
        try:
            distributed.launch(here, "stages.train", args, params.train.num_threads)
        except distributed.JobFailed as err:
            if live is not None:
                live.end("FAILED", str(err))
                where = f"{live.where()} is marked FAILED"
            else:
                from mnist_pipeline.tracking import record_failed_training  # MLflow only for a failure to record

                where = record_failed_training(resolve_store(), params, outputs, str(err), device.type, backend)
            raise PipelineError(f"train: {err}; {where}; the outputs are left as they were") from None
        if live is not None:
            live.end("FINISHED", model_sha256=sha256_file(outputs[0]))  # the first process wrote it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("split", type=Path, help="folder of train.npy and val.npy")
    parser.add_argument("model", type=Path, help="where the best model's weights go")
    parser.add_argument("log", type=Path, help="CSV of the periodic training metrics")
    parser.add_argument("summary", type=Path, help="JSON of the best validation accuracy, device and world size")
    parser.add_argument("trained_on", type=Path, help="JSON of this machine's tags for the model (not DVC's)")
    args = parser.parse_args()
    params = load_params()
    p = params.train
    check_batch_size(p.batch_size, args.split)
    device = select_device(p.device)
    rank = None
    if distributed.launched():
        rank, device = distributed.join(p.processes, device)
        if rank.writes and distributed.LAUNCHER_ENV not in os.environ:  # a machine joined with torchrun by hand
            say_kernel_notes("train")
    else:
        say_kernel_notes("train")
        check_store(resolve_store())  # the record stage needs it: fail now rather than after training
        if p.processes > 1:
            launch(params, device, sys.argv[1:], [args.model, args.log, args.summary])
            return
    # One process: this one trains, watched by a live run; under torchrun, the launcher's live run watches.
    device_tags = {**provenance(), "train.device": device.type, "train.world_size": "1", "train.backend": "none"}
    watched = live_run(params.mlflow.experiment, [args.model, args.log, args.summary], flatten(params), device_tags) \
        if rank is None else contextlib.nullcontext()
    with watched as live:
        model_sha256 = train_and_write(args, params, rank, device)
        if live is not None:
            live.end("FINISHED", model_sha256=model_sha256)


def train_and_write(args: argparse.Namespace, params: Params, rank: distributed.Rank | None,
                    device: torch.device) -> str | None:
    """This process's share of the training; the first process writes the model and reports (the model's SHA-256)."""
    p = params.train
    make_deterministic(params.seed, p.num_threads)
    images, labels = load_mnist(args.raw, "train")
    images = deskew(images) if p.deskew else images  # what every process trains on, compared below
    train_idx = load_indices(args.split, "train", len(labels))
    val_idx = load_indices(args.split, "val", len(labels))
    if rank is not None:
        modules = (sys.modules[__name__], training, distributed, digits, sys.modules[Net.__module__], cpu_kernels,
                   sys.modules["stages"])
        code = [Path(module.__file__) for module in modules]
        distributed.check_same_inputs(params, [images, labels, train_idx.numpy(), val_idx.numpy()], code)
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    model = Net().to(device)
    writes = rank is None or rank.writes  # the other processes keep quiet and write nothing

    total = p.epochs * -(-len(train_idx) // p.batch_size)
    terminal = sys.stdout.isatty()
    progress = tqdm(total=total, desc="train", unit="it", disable=not writes) if terminal else LogProgress(total)

    def report(row: LogRow, improved: bool) -> None:
        if not writes:
            return
        append_report(row)  # to the live run's curves, when this process has one
        if improved:
            progress.write("Updated the best model!")
        progress.write(
            f"Epoch {row.epoch}, Iteration {row.iteration} statistics:\n"
            f"Train acc: {100 * row.train_acc:.3f}\nTrain loss: {row.train_loss:.5f}\n"
            f"Val acc: {100 * row.val_acc:.3f}\n"
        )

    start = time.perf_counter()
    result = train(
        model, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), p, params.seed,
        on_log=report, on_step=progress.update if writes else lambda: None,
    )
    progress.close()
    check_learned(result, p)
    if not writes:
        return None
    world = f"{rank.world_size} processes ({rank.backend})" if rank else "1 process"
    print(f"End of the training loop! {time.perf_counter() - start:.1f} s on {device.type}, {world}, best val acc "
          f"{100 * result.best_val_acc:.3f}% at iteration {result.best_iteration}")
    weights = state_dict_bytes(result.best_state)
    atomic_write_bytes(args.model, weights)
    model_sha256 = hashlib.sha256(weights).hexdigest()
    write_trained_on(args.trained_on, model_sha256)
    atomic_write_text(args.log, log_csv(result.log))
    atomic_write_json(args.summary, {"train": {
        "best_val_acc": round(result.best_val_acc, 6), "best_iteration": result.best_iteration,
        "device": device.type, "world_size": rank.world_size if rank else 1,
        "backend": rank.backend if rank else "none",
    }})
    return model_sha256


if __name__ == "__main__":
    distributed.run_rank(main) if distributed.launched() else run_stage(main)
