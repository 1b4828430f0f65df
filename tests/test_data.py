"""IDX reading: valid files load; every malformation is one error naming the file and the byte offset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_pipeline.data import IdxError, load_mnist, read_images, read_labels
from tests.conftest import idx_bytes, tiny_arrays, write_tiny


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    write_tiny(tmp_path)
    return tmp_path


def test_reads_what_was_written(raw: Path) -> None:
    images, labels = load_mnist(raw, "train")
    expected = tiny_arrays()
    assert images.dtype == np.uint8 and images.shape == (240, 28, 28)
    np.testing.assert_array_equal(images, expected["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, expected["train-labels-idx1-ubyte"])


def corrupt(path: Path, offset: int, data: bytes) -> None:
    content = bytearray(path.read_bytes())
    content[offset : offset + len(data)] = data
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    ("damage", "offset", "words"),
    [
        (lambda p: corrupt(p, 0, b"\x00\x00\x08\x01"), 0, "wrong magic number 0x00000801"),
        (lambda p: corrupt(p, 0, b"\x1f\x8b"), 0, "wrong magic number"),
        (lambda p: corrupt(p, 2, b"\x0d"), 0, "wrong magic number"),  # float data, not unsigned bytes
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), 188175, "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\x00"), 188176, "trailing bytes"),
        (lambda p: p.write_bytes(p.read_bytes()[:10]), 10, "truncated header"),
        (lambda p: p.write_bytes(b"\x00\x00"), 2, "truncated"),
        (lambda p: corrupt(p, 4, (10**6).to_bytes(4, "big")), 188176, "truncated"),  # count larger than the file
    ],
)
def test_malformed_image_file(raw: Path, damage, offset: int, words: str) -> None:
    path = raw / "train-images-idx3-ubyte"
    damage(path)
    with pytest.raises(IdxError) as info:
        read_images(path)
    assert str(info.value).startswith(f"{path}: byte {info.value.offset}: ")
    assert info.value.offset == offset
    assert words in str(info.value)


def test_wrong_image_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((3, 27, 28), dtype=np.uint8)))
    with pytest.raises(IdxError, match=r"byte 8: wrong dimensions \(27, 28\)"):
        read_images(path)


def test_label_out_of_range_names_its_offset(raw: Path) -> None:
    path = raw / "train-labels-idx1-ubyte"
    corrupt(path, 8 + 17, b"\x0a")
    with pytest.raises(IdxError, match=r"byte 25: label 10 at index 17 is outside 0-9"):
        read_labels(path)


def test_image_and_label_counts_must_agree(raw: Path) -> None:
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(239, dtype=np.uint8)))
    with pytest.raises(IdxError, match="239 labels but .* holds 240 images"):
        load_mnist(raw, "train")


def test_missing_file(raw: Path) -> None:
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(IdxError, match="t10k-images-idx3-ubyte: byte 0: missing file"):
        load_mnist(raw, "t10k")
