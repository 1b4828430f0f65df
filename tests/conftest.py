"""Shared fixtures: tiny generated MNIST-shaped IDX files, the pipeline run once on them, the real data."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import http.server
import importlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock, Timeout

# The suite runs on every core (`-n auto`), so trainings share the CPU. OpenMP threads that spin while they wait
# then slow a pair of 2-thread trainings sevenfold (60 s each instead of 8, measured on 2 cores); PASSIVE makes them
# sleep instead and changes no arithmetic. Set before torch loads OpenMP, here and in every process the tests start.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import stages  # noqa: F401  first of the project: the CPU kernel pins are set before torch loads, as in every stage
from mnist_pipeline import cpu_kernels, sources
from mnist_pipeline.data import MNIST_FILES, MnistFile
from mnist_pipeline.errors import first_line
from mnist_pipeline.params import load_params
from tools.local_server import free_port, wait_until_ready  # noqa: F401  the tests import free_port from here
from tools.stage_commands import stage_commands
from tools.system_packages import PACKAGES, find_program, missing_line

REPO = Path(__file__).resolve().parents[1]
# The tests talk to nothing but 127.0.0.1 and the data sources they name: no usage reports from DVC or MLflow,
# in this process or the ones it starts.
NO_USAGE_REPORTS = {"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "true"}
os.environ.update(NO_USAGE_REPORTS)
# The committed bytes are promised where the pinned CPU kernels run (docs/reproducibility.md): tests that compare
# with them skip elsewhere, saying why.
UNPINNABLE = cpu_kernels.this_cpu_unpinnable()
needs_pinnable_cpu = pytest.mark.skipif(UNPINNABLE is not None, reason=f"{UNPINNABLE}: the pinned kernels cannot run")
# How long a test process waits for another to fill the real MNIST cache: the download stage's sources, 4 files.
MNIST_LOCK_TIMEOUT_S = 600
# How long a test worker waits for another to build a session's shared folder (`built_once`): the real baseline's
# `dvc repro` while the other worker trains too.
BUILD_LOCK_TIMEOUT_S = 900
# The order in which `pytest -n` hands out modules (pyproject.toml turns off pytest-xdist's own order, by number of
# tests); a module stays on one worker. The ones that take minutes go first, so no worker is left alone with one at
# the end, but for three that need no real data, second to fourth: the next worker runs them while the first builds
# `real_baseline`.
MODULE_ORDER = ("test_team.py", "test_sweep.py", "test_tracking.py", "test_stages.py", "test_experiments.py", "test_one_run.py",
                "test_distributed.py", "test_e2e.py")


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding `array`."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def tiny_arrays(n_train: int = 240, n_test: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """Random MNIST-shaped images whose bright block encodes the label by its place, so a CNN can learn it; a block
    8 pixels tall, so that the served model takes it for a digit (digits.MIN_SPAN)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 4)
            images[i, 2 + 8 * row : 10 + 8 * row, 2 + 6 * col : 8 + 6 * col] = 255
        arrays[f"{split}-images-idx3-ubyte"] = images
        arrays[f"{split}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    return arrays


def write_tiny(folder: Path) -> tuple[MnistFile, ...]:
    """Write the tiny arrays to `folder` as uncompressed IDX files named as MNIST's; return their entries."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    arrays = tiny_arrays()
    for official in MNIST_FILES:
        data = idx_bytes(arrays[official.name])
        (folder / official.name).write_bytes(data)
        files.append(MnistFile(official.name, hashlib.md5(data).hexdigest(), len(data), official.ndim))
    return tuple(files)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, tuple[MnistFile, ...]]:
    """A folder of tiny uncompressed IDX files and their MnistFile entries (names as MNIST's, own MD5s)."""
    folder = tmp_path / "tiny"
    return folder, write_tiny(folder)


def gzip_folder(src: Path, dest: Path) -> Path:
    """Gzip every file of `src` into `dest` as <name>.gz."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        (dest / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    return dest


def program(name: str) -> str:
    """The path of a program from one of the Debian packages the slow tier needs (tools/system_packages.py); where
    it is missing, the test fails in one line naming the package and the command that installs it: never a skip."""
    found = find_program(name)
    if found is None:
        package = next(p for p in PACKAGES if p.program == name)
        pytest.fail(f"{missing_line(package)}; `python -m tools.run_tests` installs every package the suite needs",
                    pytrace=False)
    return found


@contextmanager
def mounted(*args: str, target: Path) -> Iterator[Path]:
    """`mount ARGS TARGET` for one test (a small disk to fill, a read-only view), lazily unmounted after. Mounting
    needs root: where it is refused the test fails in CI (CI=true, run as root) and elsewhere skips, saying how to
    run it."""
    refused = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if refused.returncode:
        said = first_line(refused.stderr).rstrip(".") or f"exit {refused.returncode}"
        why = f"this test mounts a file system, which needs root (mount said: {said})"
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI runs as root)", pytrace=False)
        test = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
        pytest.skip(f"{why}: run it as root, e.g. sudo .venv/bin/python -m pytest '{test}'")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


@dataclass
class Served:
    """What a test's HTTP server on 127.0.0.1 was asked: each request's path and Authorization header."""

    base: str
    requests: list[tuple[str, str | None]]


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Start HTTP servers on 127.0.0.1 answering from {path: (content type, body)}, or ("redirect", URL); with
    `login` (user, password), only to requests that send it as HTTP Basic auth (401 otherwise), but for the `public`
    paths (a tracking server's /health). Stopped after."""
    servers = []

    def start(routes: dict[str, tuple[str, bytes | str]], fallback: tuple[str, bytes] | None = None,
              login: tuple[str, str] | None = None, public: tuple[str, ...] = ()) -> Served:
        asked: list[tuple[str, str | None]] = []
        expected = None if login is None else "Basic " + base64.b64encode(":".join(login).encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
                asked.append((self.path, self.headers.get("Authorization")))
                guarded = expected is not None and self.path.split("?")[0] not in public
                if guarded and self.headers.get("Authorization") != expected:
                    self.send_error(401)
                    return
                found = routes.get(self.path.split("?")[0], fallback)
                if found is None:
                    self.send_error(404)
                    return
                if found[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", str(found[1]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", found[0])
                self.send_header("Content-Length", str(len(found[1])))
                self.end_headers()
                self.wfile.write(found[1])

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return Served(f"http://127.0.0.1:{server.server_address[1]}/", asked)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def doc_pages() -> list[Path]:
    """The documentation whose commands the tests run: README.md and every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_block(needle: str, language: str) -> str:
    """The one fenced block in `language` that contains `needle`, across README.md and docs/*.md."""
    found = [(page.relative_to(REPO), block) for page in doc_pages()
             for block in re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(), re.M | re.S) if needle in block]
    if len(found) != 1:
        raise LookupError(f"{len(found)} {language} blocks of the docs hold {needle!r}, not one: "
                          f"{[str(page) for page, _ in found]}")
    return found[0][1]


def doc_commands(needle: str) -> list[str]:
    """The commands of the docs' bash block holding `needle`, one a line, comments left out."""
    lines = (line.split("#")[0].strip() for line in doc_block(needle, "bash").splitlines())
    return [line for line in lines if line]


# What `dvc exp run` and `dvc exp apply` write into the workspace: the tests take them as committed (git HEAD), so
# an experiment applied there changes nothing they check.
RESULT_PATHS = ("params.yaml", "dvc.lock", "reports")


@functools.cache
def committed_params_text() -> str:
    """params.yaml as committed (git HEAD), whatever experiment the workspace holds (RESULT_PATHS)."""
    return subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def committed_params() -> dict:
    """params.yaml as committed, parsed: a fresh dict each call, for the caller to change."""
    return yaml.safe_load(committed_params_text())


def shrunk_params(**train: object) -> dict:
    """The committed params.yaml, shrunk for a fast run on tiny data."""
    params = committed_params()
    params["train"].update({"epochs": 2, "batch_size": 32, "log_every": 4, **train})
    params["plot"].update({"n_images": 9, "n_misclassified": 9})
    params["evaluate"]["batch_size"] = 25
    return params


def enter(work: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in `work` as DVC runs a stage there: the current folder and DVC_ROOT, MLflow's default store inside."""
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(work))
    return work


def make_workdir(work: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder holding a shrunk params.yaml, entered."""
    work.mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(shrunk_params(), sort_keys=False))
    return enter(work, monkeypatch)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working folder holding a shrunk params.yaml, with MLflow's store inside it."""
    return make_workdir(tmp_path / "work", monkeypatch)


@pytest.fixture
def raw_data(workdir: Path) -> Path:
    """A working folder holding only the tiny data in data/raw, as the download stage leaves it."""
    write_tiny(workdir / pipeline_commands()["download"][0])
    return workdir


def pipeline_commands() -> dict[str, list[str]]:
    """Each stage's arguments, in pipeline order, as this repo's dvc.yaml declares them."""
    return stage_commands(REPO / "dvc.yaml")


def run_pipeline(folder: Path, files: tuple[MnistFile, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage's main() in dvc.yaml's order, in this process and the current folder, on the given data."""
    monkeypatch.setenv(sources.MIRROR_ENV, str(folder))
    monkeypatch.setattr(sources, "MNIST_FILES", files)
    for name, args in pipeline_commands().items():
        monkeypatch.setattr(sys, "argv", [f"stages.{name}", *args])
        importlib.import_module(f"stages.{name}").main()


def copy_workdir(src: Path, dest: Path) -> Path:
    """Copy a working folder; the absolute paths under `src` that MLflow's store records now lead into the copy."""
    shutil.copytree(src, dest, symlinks=True)
    store = dest / "mlflow.db"
    if store.exists():
        old, new = f"{src}/", f"{dest}/"
        with closing(sqlite3.connect(store)) as db, db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                    db.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                        (old, new, old),
                    )
    return dest


def built_once(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str,
               build: Callable[[Path], Path]) -> Path:
    """What `build` makes in a fresh folder `name`, once per test session: the workers of `pytest -n` (pytest-xdist)
    share the first build through a file lock in the session's temporary folder, which holds each worker's own.
    A build that fails fails every test that needs it, in every worker, once."""
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # pytest-xdist's name for this process: a worker's folder is in the session's
        base = base.parent
    folder, marker, failed = base / name, base / f"{name}.built", base / f"{name}.failed"
    lock = FileLock(base / f"{name}.lock", timeout=BUILD_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        pytest.fail(f"{name}: another test worker has been building it for {BUILD_LOCK_TIMEOUT_S} s", pytrace=False)
    try:
        if failed.exists():
            pytest.fail(f"{name}: its build failed in another test worker: {failed.read_text()}", pytrace=False)
        if not marker.exists():
            folder.mkdir()
            try:
                marker.write_text(str(build(folder)))
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {first_line(str(err))}")
                raise
    finally:
        lock.release()
    return Path(marker.read_text())


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A working folder where the whole pipeline ran once on the tiny data; tests take copies (`pipeline`)."""

    def build(root: Path) -> Path:
        with pytest.MonkeyPatch.context() as patch:
            work = make_workdir(root / "work", patch)
            run_pipeline(root / "tiny", write_tiny(root / "tiny"), patch)
        return work

    return built_once(tmp_path_factory, worker_id, "tiny-pipeline", build)


@pytest.fixture
def pipeline(built_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the finished tiny pipeline, entered."""
    return enter(copy_workdir(built_pipeline, tmp_path / "work"), monkeypatch)


def mnist_cache() -> Path:
    """Where the tests keep the real MNIST files: the user's cache folder, outside any clone."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-pipeline" / "mnist"


def is_complete(folder: Path, files: tuple[MnistFile, ...]) -> bool:
    """Whether `folder` holds each file with its size and MD5."""
    for file in files:
        path = folder / file.name
        if not path.is_file() or path.stat().st_size != file.size:
            return False
        with path.open("rb") as stream:
            if hashlib.file_digest(stream, "md5").hexdigest() != file.md5:
                return False
    return True


def cached_mnist(cache: Path, fallback: Iterable[sources.Source], files: tuple[MnistFile, ...] = MNIST_FILES) -> Path:
    """`cache` holding the verified files: reused when complete, else filled from `fallback` by the download code.

    A file lock beside the cache lets parallel test processes share it: the first downloads, the others wait.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = cache.parent / f"{cache.name}.lock"
    try:
        with FileLock(lock, timeout=MNIST_LOCK_TIMEOUT_S):
            if not is_complete(cache, files):
                source = sources.download_mnist(cache, fallback, files)
                print(f"real MNIST: verified files from {source}, kept in {cache}", file=sys.stderr)
    except Timeout:
        pytest.fail(f"real MNIST: another test process has held {lock} for {MNIST_LOCK_TIMEOUT_S} s while filling "
                    f"{cache}; if it hangs, `fuser {lock}` names it: stop it and run again", pytrace=False)
    return cache


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST files, uncompressed and verified, fetched once per machine into the user's cache folder."""
    timeout = load_params(REPO / "params.yaml").download.timeout_s
    cache = mnist_cache()
    try:
        return cached_mnist(cache, sources.default_sources(timeout))
    except sources.SourceError as err:
        failure = str(err)
    pytest.fail(
        f"the slow tests need the real MNIST files in {cache}, and the download stage's sources failed: {failure}\n"
        f"Set {sources.MIRROR_ENV} to a folder (or URL) holding the four files, gzipped or not, and run again.",
        pytrace=False,
    )


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
}


def project_env(**extra: str) -> dict[str, str]:
    """This Python's environment first on PATH (DVC runs `python -m stages...`), no inherited tracking settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MNIST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **NO_USAGE_REPORTS, **GIT_IDENTITY, **extra}


def copy_project(dest: Path) -> Path:
    """The project's tracked and not-ignored files, committed in a fresh git repo: what a clone holds, with the
    working tree's code (edits included) and the params and results as committed (RESULT_PATHS)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file() and name.split("/")[0] not in RESULT_PATHS:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    committed = subprocess.run(["git", "archive", "HEAD", "--", *RESULT_PATHS], cwd=REPO, capture_output=True,
                               check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(committed)) as archive:
        archive.extractall(dest, filter="data")
    env = project_env()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "clone"], cwd=dest, check=True, env=env)
    return dest


def dvc(clone: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=clone, env=project_env(**env), capture_output=True, text=True
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def one_epoch_params() -> dict:
    """The committed params.yaml with training shrunk to one epoch of the real data: 165 iterations of 256 images,
    reported at iterations 100 and 165."""
    params = committed_params()
    params["train"].update(epochs=1, log_every=100)
    return params


@pytest.fixture(scope="session")
def real_baseline(tmp_path_factory: pytest.TempPathFactory, worker_id: str, real_mnist: Path) -> Path:
    """A clone whose one-epoch params are committed, reproduced on the real data and committed as a user would:
    the slow modules' baseline, built once per session; each takes copies of it (`copy_workdir`)."""

    def build(folder: Path) -> Path:
        root = copy_project(folder / "repo")
        (root / "params.yaml").write_text(yaml.safe_dump(one_epoch_params(), sort_keys=False))
        env = project_env()
        subprocess.run(["git", "commit", "-qam", "one epoch"], cwd=root, check=True, env=env)
        dvc(root, "repro", MNIST_MIRROR=str(real_mnist))
        subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
        subprocess.run(["git", "commit", "-qm", "baseline results"], cwd=root, check=True, env=env)
        return root

    return built_once(tmp_path_factory, worker_id, "real-baseline", build)


@contextmanager
def queue_workers(clone: Path, jobs: int, log: Path, **env: str) -> Iterator[None]:
    """`dvc queue start -j jobs` in `clone`; on leaving, any worker still alive is stopped.

    The start's output goes to `log`, not through a pipe: the workers inherit it, and reading it would wait
    for them. DVC 3.67 may leave a worker behind: one that ran a task while its monitor shut it down for an
    empty queue never exits and ignores `dvc queue stop` (its log ends with the task's success, not "done").
    """
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=clone, check=True,
                       env=project_env(**env), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        for pid_file in (clone / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and b"queue-worker" in cmdline.read_bytes():
                os.kill(pid, signal.SIGTERM)


def queue_done(status: str) -> bool:
    """Whether `dvc queue status` says nothing is queued or running."""
    return "Queued" not in status and "Running" not in status


def wait_for_queue(clone: Path, timeout_s: float, until: Callable[[str], bool] = queue_done, every_s: float = 10,
                   **env: str) -> str:
    """Poll `dvc queue status` every `every_s` seconds until `until` holds for its output; that output.

    Each poll is a DVC start, about a second of CPU taken from the trainings it waits for: a long wait polls seldom.
    """
    deadline = time.monotonic() + timeout_s
    while not until(status := dvc(clone, "queue", "status", **env).stdout):
        assert time.monotonic() < deadline, status
        time.sleep(every_s)
    return status


def wait_until(what: str, check: Callable[[], object], process: subprocess.Popen | None = None,
               timeout: float = 300) -> object:
    """check()'s first true answer, asked every 0.3 s; fails if `process` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert process is None or process.poll() is None, f"the command ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.3)
    return found


@contextmanager
def serving(command: list[str], port: int, ready_path: str, cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """Run a server on 127.0.0.1:port until it answers ready_path; stop it afterwards. Yields its base URL."""
    log_path = Path(tempfile.gettempdir()) / f"mnist-pipeline-server-{port}.log"
    log = log_path.open("w")  # closed below, after the process
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_ready(base + ready_path, process, 120):
            raise RuntimeError(f"{command[:3]} did not start:\n{log_path.read_text()}")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        log_path.unlink()


@contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (on `port`, else a free one), its store (server.db) and artifacts
    (server-artifacts/) in `folder`, stopped after (by `timeout` too, should this process die first). Yields its base
    URL. Started again on the same folder and port, it is the same store."""
    port = port or free_port()
    command = ["timeout", "1200", sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--artifacts-destination", str(folder / "server-artifacts")]
    with serving(command, port, "/health", folder, project_env()) as base:
        yield base


def get_json(url: str, body: dict | None = None) -> dict:
    """GET (or POST `body` as JSON to) a URL and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per CPU this process may run on (pytest-xdist counts the machine's physical cores,
    which in a container limited to 2 CPUs of a large host would start dozens)."""
    return len(os.sched_getaffinity(0))
