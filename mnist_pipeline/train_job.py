"""The train stage's job: one process watched by a live run, or torchrun's processes launched and watched; each
process trains, and the first on each machine writes the model and reports."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mnist_pipeline import distributed
from mnist_pipeline.data import load_mnist
from mnist_pipeline.digits import deskew, to_tensor
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import atomic_write_bytes, sha256_file
from mnist_pipeline.machine import provenance, write_trained_on
from mnist_pipeline.model import Net
from mnist_pipeline.params import PARAMS_FILE, Params, ParamsError, flatten
from mnist_pipeline.reports import LogRow, TrainSummary, read_split, train_split_size, write_summary, write_train_log
from mnist_pipeline.tracking.live_run import Helper, append_report, live_run
from mnist_pipeline.tracking.store import resolve_store
from mnist_pipeline.training import check_learned, make_deterministic, state_dict_bytes, train

PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class TrainFiles:
    """The train stage's data and outputs, as dvc.yaml names them on its command line."""

    raw: Path
    split: Path
    model: Path
    log: Path
    summary: Path
    trained_on: Path  # this machine's tags for the model, for record: not an output of DVC's

    def outputs(self) -> list[Path]:
        """The result's files that a training writes, as a run of it names them."""
        return [self.model, self.log, self.summary]


def check_batch_size(batch_size: int, split: Path) -> None:
    """Refuse a batch larger than the training split before any work (a broken split file is reported later)."""
    count = train_split_size(split)
    if count is not None and batch_size > count:
        raise ParamsError(PARAMS_FILE, "train.batch_size", f"{batch_size} is larger than the {count:,} training images "
                          f"in {split / 'train.npy'}; set at most {count}")


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


def device_tags(device: torch.device, world_size: int, backend: str) -> dict[str, str]:
    """Where it trains, as record tags a result: the machine, the device, the number of processes, the backend."""
    return {**provenance(), "train.device": device.type, "train.world_size": str(world_size), "train.backend": backend}


def train_watched(files: TrainFiles, params: Params, device: torch.device, helper: Helper | None) -> None:
    """Train in this process alone, watched by the live run `helper` makes (None: no live run)."""
    tags = device_tags(device, 1, "none")
    with live_run(params.mlflow.experiment, files.outputs(), flatten(params), tags, helper) as live:
        model_sha256 = train_and_write(files, params, None, device)
        if live is not None:
            live.end("FINISHED", model_sha256=model_sha256)


def launch(module: str, args: list[str], files: TrainFiles, params: Params, device: torch.device,
           helper: Helper | None) -> None:
    """Train on train.processes processes under torchrun, each running `python -m module args`, watched by the live
    run `helper` makes; a failure is one line and a FAILED MLflow run."""
    here = distributed.processes_here(params.train.processes, device)
    distributed.check_rendezvous_port()
    backend = "nccl" if device.type == "cuda" else "gloo"
    tags = device_tags(device, params.train.processes, backend)
    with live_run(params.mlflow.experiment, files.outputs(), flatten(params), tags, helper) as live:
        try:
            distributed.launch(here, module, args, params.train.num_threads)
        except distributed.JobFailed as err:
            if live is not None:
                live.end("FAILED", str(err))
                where = f"{live.where()} is marked FAILED"
            else:
                from mnist_pipeline.tracking.recording import record_failed_training  # MLflow only for a failure to record

                where = record_failed_training(resolve_store(), params, files.outputs(), str(err), tags)
            raise PipelineError(f"train: {err}; {where}; the outputs are left as they were") from None
        if live is not None:
            live.end("FINISHED", model_sha256=sha256_file(files.model))  # the first process wrote it


def train_and_write(files: TrainFiles, params: Params, rank: distributed.Rank | None,
                    device: torch.device) -> str | None:
    """This process's share of the training; the first process writes the model and reports (the model's SHA-256)."""
    p = params.train
    make_deterministic(params.seed, p.num_threads)
    images, labels = load_mnist(files.raw, "train")
    images = deskew(images) if p.deskew else images  # what every process trains on, compared below
    train_idx, val_idx = read_split(files.split, len(labels))
    if rank is not None:
        distributed.check_same_inputs(params, [images, labels, train_idx, val_idx], distributed.training_code())
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
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
    atomic_write_bytes(files.model, weights)
    model_sha256 = hashlib.sha256(weights).hexdigest()
    write_trained_on(files.trained_on, model_sha256)
    write_train_log(files.log, result.log)
    write_summary(files.summary, TrainSummary(result.best_val_acc, result.best_iteration, device.type,
                                              rank.world_size if rank else 1, rank.backend if rank else "none"))
    return model_sha256
