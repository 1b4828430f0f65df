"""The plot stage's grids of digits: each digit in its cell, nothing else drawn, and small or empty grids readable."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.figures import CELL_H, CELL_W, TITLE_H, image_grid, mosaic


def digits(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def test_mosaic_puts_each_digit_in_its_cell_and_masks_the_rest() -> None:
    images = digits(5)
    canvas = mosaic(images, cols=3, rows=2)
    assert canvas.shape == (2 * CELL_H, 3 * CELL_W) and canvas.dtype == np.uint8
    assert int((~canvas.mask).sum()) == 5 * 28 * 28  # the digits and nothing else; the sixth cell stays empty
    left = (CELL_W - 28) // 2
    for i, image in enumerate(images):
        top, col = (i // 3) * CELL_H + TITLE_H, (i % 3) * CELL_W + left
        assert np.array_equal(canvas[top : top + 28, col : col + 28].data, image)


@pytest.mark.parametrize("n", [0, 1, 7, 25])
def test_image_grid_draws_every_size_wide_enough_for_its_title(n: int) -> None:
    labels = np.arange(n) % 10
    buffer = io.BytesIO()
    fig = image_grid(digits(n), labels, (labels + 1) % 10, f"First {n} test images")
    fig.savefig(buffer, format="png", dpi=100)
    width, height = Image.open(buffer).size
    assert width >= 400 and height > CELL_H  # 4 in at 100 dpi: the figure's title fits above one digit, or none
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == (["none"] if n == 0 else [f"label {a} / pred {(a + 1) % 10} ✗" for a in labels])


def test_image_grid_refuses_pixels_that_are_not_mnist_bytes() -> None:
    with pytest.raises(PipelineError, match="uint8"):
        image_grid(digits(2).astype(np.float32) / 255, np.zeros(2, int), np.zeros(2, int), "scaled")
