"""The slow tests' copy of the real MNIST files: filled once by the download code, reused, fetched again if damaged."""

from __future__ import annotations

from pathlib import Path

from mnist_pipeline.data import MnistFile
from mnist_pipeline.sources import Source, fetch_from_mirror, to_url
from tests.conftest import cached_mnist


def test_filled_once_reused_and_refetched_when_damaged(
    tmp_path: Path, tiny_mnist: tuple[Path, tuple[MnistFile, ...]]
) -> None:
    folder, files = tiny_mnist
    fetches = []

    def fetch(dest: Path, wanted: tuple[MnistFile, ...]) -> None:
        fetches.append(dest)
        fetch_from_mirror(to_url(str(folder)), dest, wanted, 5)

    sources = [Source("tiny", fetch)]
    cache = tmp_path / "cache" / "mnist"
    assert cached_mnist(cache, sources, files) == cache
    assert cached_mnist(cache, sources, files) == cache
    assert len(fetches) == 1

    damaged = cache / files[0].name
    damaged.write_bytes(bytes(files[0].size))  # the right size, the wrong MD5
    cached_mnist(cache, sources, files)
    assert len(fetches) == 2
    for file in files:
        assert (cache / file.name).read_bytes() == (folder / file.name).read_bytes()
    assert sorted(p.name for p in cache.parent.iterdir()) == ["mnist", "mnist.lock"]  # nothing partial left
