"""plot's figures: test digits with their labels and predictions, and the confusion matrix, as PNG files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mnist_pipeline.data import IMAGE_SIDE, NUM_CLASSES
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import atomic_write_bytes

# The grid is one image: a mosaic of cells, each a 28x28 digit with room for its title above it. One axes with
# one picture and plain text draws in a fraction of the time of an axes per digit (whose layout and title placement
# cost about 2 s for 50 digits), which is most of what a plot-only experiment waits for.
CELL_W, CELL_H, TITLE_H = 40, 44, 12  # mosaic units (pixels of the digits)
TITLE_GAP = 2  # units between a title's baseline and its digit
INCH_PER_UNIT = 1.6 / CELL_W  # a cell 1.6 in wide, as wide as its 8-point title
MIN_WIDTH_IN = 4.0  # room for the figure's title above a grid of one digit, or of none
SUPTITLE_IN = 0.5  # room above the grid for the figure's title


def mosaic(images: np.ndarray, cols: int, rows: int) -> np.ma.MaskedArray:
    """The digits laid out in cells of CELL_W x CELL_H, everything outside a digit masked.

    imshow leaves masked pixels transparent, so the figure's white background shows there, like paper.
    """
    shape = (rows * CELL_H, cols * CELL_W)
    canvas = np.ma.masked_array(np.zeros(shape, dtype=images.dtype), mask=np.ones(shape, dtype=bool))
    left = (CELL_W - IMAGE_SIDE) // 2
    for i, image in enumerate(images):
        top, col = (i // cols) * CELL_H + TITLE_H, (i % cols) * CELL_W + left
        canvas[top : top + IMAGE_SIDE, col : col + IMAGE_SIDE] = image
    return canvas


def image_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, title: str) -> Figure:
    """A grid of MNIST images (uint8) titled "label / prediction"; wrong predictions in red."""
    if images.dtype != np.uint8:
        raise PipelineError(f"expected MNIST's uint8 pixels, got {images.dtype}")
    cols = max(1, int(np.ceil(np.sqrt(len(images)))))
    rows = max(1, int(np.ceil(len(images) / cols)))
    width, height = cols * CELL_W * INCH_PER_UNIT, rows * CELL_H * INCH_PER_UNIT
    fig = Figure(figsize=(max(width, MIN_WIDTH_IN), height + SUPTITLE_IN))
    # The grid's axes keep its aspect (imshow's default) and are centred when the figure is wider than the grid.
    ax = fig.add_axes((0, 0, 1, height / (height + SUPTITLE_IN)))
    ax.axis("off")
    ax.imshow(mosaic(images, cols, rows), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for i, (label, pred) in enumerate(zip(labels, predicted)):
        wrong = label != pred
        # Pixel centres sit on whole numbers, so a cell spans [x - 0.5, x + CELL_W - 0.5).
        ax.text((i % cols + 0.5) * CELL_W - 0.5, (i // cols) * CELL_H + TITLE_H - TITLE_GAP,
                f"label {label} / pred {pred}" + (" ✗" if wrong else ""), fontsize=8,
                ha="center", va="bottom", color="red" if wrong else "black")
    if len(images) == 0:
        ax.text(CELL_W / 2 - 0.5, CELL_H / 2, "none", ha="center", va="center")
    fig.suptitle(title, y=1 - 0.1 / (height + SUPTITLE_IN), va="top")
    return fig


def confusion_figure(labels: np.ndarray, predicted: np.ndarray) -> Figure:
    """The 10x10 confusion matrix with counts (rows: label, columns: prediction)."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_axes((0.1, 0.09, 0.85, 0.84))  # fixed margins: tight_layout measured every label, 0.4 s
    ax.imshow(np.log1p(counts), cmap="Blues")
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if i == j else "black")
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted", ylabel="label",
           title=f"Confusion matrix ({int(np.trace(counts))}/{len(labels)} correct)")
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Save without the matplotlib version or a timestamp, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def write_figures(out: Path, images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, n_images: int,
                  n_misclassified: int) -> list[Path]:
    """The first `n_images` test digits, the first `n_misclassified` wrong ones and the confusion matrix, in `out`."""
    wrong = np.flatnonzero(labels != predicted)[:n_misclassified]
    figures = {
        "predictions.png": image_grid(images[:n_images], labels[:n_images], predicted[:n_images],
                                      f"First {n_images} test images"),
        "misclassified.png": image_grid(images[wrong], labels[wrong], predicted[wrong],
                                        f"Misclassified test images (first {len(wrong)})"),
        "confusion_matrix.png": confusion_figure(labels, predicted),
    }
    for name, fig in figures.items():
        save_png(fig, out / name)
    return [out / name for name in figures]
