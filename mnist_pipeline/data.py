"""The MNIST files and their IDX format: reading and validating them, bounded by header and file size."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mnist_pipeline.errors import PipelineError

IMAGE_SIDE = 28
NUM_CLASSES = 10
_UBYTE = 0x08


@dataclass(frozen=True)
class MnistFile:
    """One official MNIST file, uncompressed: its name, MD5, size and IDX shape."""

    name: str
    md5: str
    size: int
    ndim: int


# The official files, uncompressed (the MD5s of the files published with MNIST).
MNIST_FILES = (
    MnistFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", 47040016, 3),
    MnistFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", 60008, 1),
    MnistFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", 7840016, 3),
    MnistFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", 10008, 1),
)


class IdxError(PipelineError, ValueError):
    """A malformed IDX file; the message names the file and the byte offset."""

    def __init__(self, path: str | Path, offset: int, message: str) -> None:
        super().__init__(f"{path}: byte {offset}: {message}")
        self.path = str(path)
        self.offset = offset


def parse_header(head: bytes, path: str | Path, expected_ndim: int) -> tuple[int, ...]:
    """Check an IDX header (magic number and dimensions) and return the dimensions."""
    if len(head) < 4:
        raise IdxError(path, len(head), f"truncated: {len(head)} bytes, an IDX header needs at least 4")
    zero, dtype, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or dtype != _UBYTE or ndim != expected_ndim:
        expected = (_UBYTE << 8) | expected_ndim
        raise IdxError(
            path, 0,
            f"wrong magic number 0x{head[:4].hex()}: expected 0x{expected:08x} (unsigned bytes, {expected_ndim}-D)",
        )
    end = 4 + 4 * ndim
    if len(head) < end:
        raise IdxError(path, len(head), f"truncated header: {ndim} dimensions need {end} bytes")
    return struct.unpack(f">{ndim}I", head[4:end])


def _checked_dims(file: BinaryIO, path: Path, expected_ndim: int) -> tuple[int, ...]:
    """Read the header from an open file and check that the file's size matches it exactly."""
    head = file.read(4 + 4 * expected_ndim)
    dims = parse_header(head, path, expected_ndim)
    expected_size = len(head) + int(np.prod(dims, dtype=np.int64))
    size = path.stat().st_size
    if size != expected_size:
        what = "truncated" if size < expected_size else "has trailing bytes"
        raise IdxError(
            path, min(size, expected_size),
            f"{what}: the header's dimensions {dims} need {expected_size} bytes, the file has {size}",
        )
    return dims


def check_idx(path: str | Path, expected_ndim: int) -> None:
    """Validate a file's IDX header against its size without reading the data."""
    path = Path(path)
    with path.open("rb") as file:
        _checked_dims(file, path, expected_ndim)


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file whose size must match its header exactly."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            dims = _checked_dims(file, path, expected_ndim)
            # The size was checked against the header first, so this allocation is bounded by the file.
            data = np.fromfile(file, dtype=np.uint8, count=int(np.prod(dims, dtype=np.int64)))
    except FileNotFoundError:
        raise IdxError(path, 0, "missing file") from None
    return data.reshape(dims)


def read_images(path: str | Path) -> np.ndarray:
    """Read an IDX image file: N x 28 x 28 unsigned bytes."""
    images = read_idx(path, 3)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxError(path, 8, f"wrong dimensions {images.shape[1:]}: MNIST images are {IMAGE_SIDE}x{IMAGE_SIDE}")
    return images


def read_labels(path: str | Path) -> np.ndarray:
    """Read an IDX label file: N labels, each 0-9."""
    labels = read_idx(path, 1)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        first = int(bad[0])
        raise IdxError(path, 8 + first, f"label {labels[first]} at index {first} is outside 0-{NUM_CLASSES - 1}")
    return labels


def load_mnist(raw_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one official split, "train" or "t10k", from the raw folder."""
    raw_dir = Path(raw_dir)
    images_path = raw_dir / f"{split}-images-idx3-ubyte"
    labels_path = raw_dir / f"{split}-labels-idx1-ubyte"
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if len(images) != len(labels):
        raise IdxError(labels_path, 4, f"{len(labels)} labels but {images_path} holds {len(images)} images")
    return images, labels
