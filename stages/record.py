"""DVC stage record: one complete MLflow run for this result (params, curves, test metrics, figures, model),
unless the store holds it already."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_pipeline import import_gc
from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import atomic_write_text, sha256_file
from mnist_pipeline.machine import live_run_of
from mnist_pipeline.params import load_params
from mnist_pipeline.served_package import served_code_sha256, served_config
from mnist_pipeline.tracking import store as stores
from mnist_pipeline.tracking.recorded import recorded_locally
from mnist_pipeline.tracking.result import Result, names_entry, result_key, run_tags

# DVC reruns this stage when the file is missing (a fresh clone); its content never changes, so dvc.lock doesn't.
MARKER_TEXT = "This workspace's result is recorded in MLflow. Delete this file to record it again.\n"
RETRY = ("the trained model and reports are kept: fix the store, then rerun the same `dvc repro` or `dvc exp run`, "
         "which records this result without training")
ARGUMENTS = (("raw", "folder of the MNIST IDX files (the model's input example)"),
             ("model", "the best model's weights"), ("train-log", "train's periodic metrics (CSV)"),
             ("summary", "train's summary (JSON)"), ("metrics", "evaluate's test metrics (JSON)"),
             ("predictions", "evaluate's predictions (CSV)"), ("figures", "plot's folder of figures"),
             ("trained-on", "the training machine's tags, from train (JSON)"),
             ("marker", "written once the result is recorded"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in ARGUMENTS:
        parser.add_argument(f"--{name}", type=Path, required=True, help=what)
    args = vars(parser.parse_args())
    marker = args.pop("marker")
    result = Result(**args)
    params = load_params()
    store = stores.resolve_store()
    stores.check_store(store)
    tags = run_tags([result.raw, result.model, *result.reports(), result.figures, marker])
    key = result_key(params, result, served_code_sha256(served_config(params)))
    live_run_id = live_run_of(result.trained_on, sha256_file(result.model))
    quick = None if store.database is None else recorded_locally(
        store.database, params.mlflow.experiment, key, names_entry(tags), live_run_id)
    if quick is not None:
        print(f"record: already recorded as run '{quick.name}' ({quick.run_id}) in {store.uri}")
    else:
        # MLflow, only when there is something to write; it loads most of its modules as it writes, and this short
        # process makes little garbage: the collector stays paused
        with import_gc.paused():
            from mnist_pipeline.tracking.recording import record

            for line in record(result, params, store, tags, RETRY, key, live_run_id):
                print(line)
    atomic_write_text(marker, MARKER_TEXT)


if __name__ == "__main__":
    run_stage(main)
