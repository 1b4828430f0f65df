"""DVC stage plot: test images with labels and predictions, the misclassified ones, and the confusion matrix."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mnist_pipeline.data import NUM_CLASSES, load_mnist
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_write_bytes
from mnist_pipeline.params import load_params


def read_predictions(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions from evaluate's CSV, checked against the test set's size."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    if table.shape != (n, 3) or not np.array_equal(table[:, 0], np.arange(n)):
        raise PipelineError(
            f"{path}: expected rows index,actual,predicted for {n} test images, got shape {table.shape}"
        )
    if table[:, 1:].min() < 0 or table[:, 1:].max() >= NUM_CLASSES:
        raise PipelineError(f"{path}: labels and predictions must be 0-{NUM_CLASSES - 1}")
    return table[:, 1], table[:, 2]


def image_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, title: str) -> Figure:
    """A grid of images titled "label / prediction"; wrong predictions in red."""
    cols = max(1, int(np.ceil(np.sqrt(len(images)))))
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, pred in zip(axes.flat, images, labels, predicted):
        ax.imshow(image, cmap="gray")
        wrong = label != pred
        ax.set_title(f"label {label} / pred {pred}" + (" ✗" if wrong else ""), fontsize=8,
                     color="red" if wrong else "black")
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(labels: np.ndarray, predicted: np.ndarray) -> Figure:
    """The 10x10 confusion matrix with counts (rows: label, columns: prediction)."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.imshow(np.log1p(counts), cmap="Blues")
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if i == j else "black")
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="label",
           title=f"Confusion matrix ({int(np.trace(counts))}/{len(labels)} correct)")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Save without the matplotlib version or a timestamp, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("predictions", type=Path, help="evaluate's CSV of labels and predictions")
    parser.add_argument("out", type=Path, help="folder for the PNG figures")
    args = parser.parse_args()
    params = load_params()
    images, _ = load_mnist(args.raw, "t10k")
    labels, predicted = read_predictions(args.predictions, len(images))
    n = params.plot.n_images
    wrong = np.flatnonzero(labels != predicted)[: params.plot.n_misclassified]
    save_png(image_grid(images[:n], labels[:n], predicted[:n], f"First {n} test images"),
             args.out / "predictions.png")
    save_png(image_grid(images[wrong], labels[wrong], predicted[wrong],
                        f"Misclassified test images (first {len(wrong)})"), args.out / "misclassified.png")
    save_png(confusion_figure(labels, predicted), args.out / "confusion_matrix.png")
    print(f"plot: 3 figures in {args.out}")


if __name__ == "__main__":
    run_stage(main)
