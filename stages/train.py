"""DVC stage train: train the seed's CNN and keep the best model by validation accuracy, on 1 or more processes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mnist_pipeline import distributed, train_job
from mnist_pipeline.errors import run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.tracking.store import check_store, resolve_store
from mnist_pipeline.training import select_device
from stages import say_kernel_notes

ARGUMENTS = (("raw", "folder of the MNIST IDX files"), ("split", "folder of train.npy and val.npy"),
             ("model", "where the best model's weights go"), ("log", "CSV of the periodic training metrics"),
             ("summary", "JSON of the best validation accuracy, device and world size"),
             ("trained_on", "JSON of this machine's tags for the model (not DVC's)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in ARGUMENTS:
        parser.add_argument(name, type=Path, help=what)
    files = train_job.TrainFiles(**vars(parser.parse_args()))
    params = load_params()
    train_job.check_batch_size(params.train.batch_size, files.split)
    device = select_device(params.train.device)
    if distributed.launched():  # one process of torchrun's job; the launcher's live run watches it
        rank, device = distributed.join(params.train.processes, device)
        if rank.writes and distributed.LAUNCHER_ENV not in os.environ:  # a machine joined with torchrun by hand
            say_kernel_notes("train")
        train_job.train_and_write(files, params, rank, device)
        return
    say_kernel_notes("train")
    check_store(resolve_store())  # the record stage needs it: fail now rather than after training
    if params.train.processes > 1:
        train_job.launch("stages.train", sys.argv[1:], files, params, device)
    else:
        train_job.train_watched(files, params, device)


if __name__ == "__main__":
    distributed.run_rank(main) if distributed.launched() else run_stage(main)
