"""DVC stage plot: test images with labels and predictions, the misclassified ones, and the confusion matrix."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_pipeline.data import load_mnist
from mnist_pipeline.errors import run_stage
from mnist_pipeline.figures import write_figures
from mnist_pipeline.params import load_params
from mnist_pipeline.reports import read_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("predictions", type=Path, help="evaluate's CSV of labels and predictions")
    parser.add_argument("out", type=Path, help="folder for the PNG figures")
    args = parser.parse_args()
    params = load_params()
    images, _ = load_mnist(args.raw, "t10k")
    labels, predicted = read_predictions(args.predictions, len(images))
    written = write_figures(args.out, images, labels, predicted, params.plot.n_images, params.plot.n_misclassified)
    print(f"plot: {len(written)} figures in {args.out}")


if __name__ == "__main__":
    run_stage(main)
