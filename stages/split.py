"""DVC stage split: draw the train/validation indices of the training images from the seed."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mnist_pipeline.data import load_mnist
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.params import load_params
from mnist_pipeline.reports import write_split


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n), cut into sorted train and validation indices."""
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise PipelineError(
            f"params.yaml: split.val_fraction {val_fraction} of {n} images leaves an empty train or validation set"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("out", type=Path, help="folder for train.npy and val.npy")
    args = parser.parse_args()
    params = load_params()
    _, labels = load_mnist(args.raw, "train")
    train, val = split_indices(len(labels), params.split.val_fraction, params.seed)
    write_split(args.out, train, val)
    print(f"split: {len(train)} train / {len(val)} validation images -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
