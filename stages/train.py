"""DVC stage train: train the seed's CNN and keep the best model by validation accuracy, on 1 or more processes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mnist_pipeline import import_gc
from mnist_pipeline.errors import run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.tracking.live_run import helper_started
from stages import say_kernel_notes

ARGUMENTS = (("raw", "folder of the MNIST IDX files"), ("split", "folder of train.npy and val.npy"),
             ("model", "where the best model's weights go"), ("log", "CSV of the periodic training metrics"),
             ("summary", "JSON of the best validation accuracy, device and world size"),
             ("trained_on", "JSON of this machine's tags for the model (not DVC's)"))
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # torchrun sets them in each process it starts


def arguments() -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in ARGUMENTS:
        parser.add_argument(name, type=Path, help=what)
    return vars(parser.parse_args())


def main() -> None:
    """The stage as DVC runs it: training in this process, or torchrun's processes launched; a live run watches."""
    args, params = arguments(), load_params()
    # The live run's helper loads MLflow while this process loads torch below: a second or more each, in parallel.
    with helper_started() as helper:
        with import_gc.paused():
            from mnist_pipeline import train_job
            from mnist_pipeline.tracking.store import check_store, resolve_store
            from mnist_pipeline.training import select_device

        files = train_job.TrainFiles(**args)
        train_job.check_batch_size(params.train.batch_size, files.split)
        device = select_device(params.train.device)
        say_kernel_notes("train")
        check_store(resolve_store())  # the record stage needs it: fail now rather than after training
        if params.train.processes > 1:
            train_job.launch("stages.train", sys.argv[1:], files, params, device, helper)
        else:
            train_job.train_watched(files, params, device, helper)


def process_main() -> None:
    """One process of torchrun's job; the launcher's live run watches it."""
    with import_gc.paused():
        from mnist_pipeline import distributed, train_job
        from mnist_pipeline.training import select_device

    files, params = train_job.TrainFiles(**arguments()), load_params()
    train_job.check_batch_size(params.train.batch_size, files.split)
    rank, device = distributed.join(params.train.processes, select_device(params.train.device))
    if rank.writes and distributed.LAUNCHER_ENV not in os.environ:  # a machine joined with torchrun by hand
        say_kernel_notes("train")
    train_job.train_and_write(files, params, rank, device)


if __name__ == "__main__":
    if all(key in os.environ for key in TORCHRUN_VARIABLES):
        from mnist_pipeline.distributed import run_rank

        run_rank(process_main)
    else:
        run_stage(main)
