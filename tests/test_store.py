"""The MLflow store: relative URIs taken from the repo root, and a cheap check before any expensive work."""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest

from mnist_pipeline.tracking import mlflow_store, store
from mnist_pipeline.tracking.store import StoreError, check_store, resolve_store
from tests.conftest import free_port, mounted


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repo root as DVC_ROOT, with the working folder elsewhere (DVC's temporary copy of the repo)."""
    copy = tmp_path / "root/.dvc/tmp/exps/tmpcopy"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "root"


@pytest.mark.parametrize("uri", ["", "sqlite:///mlflow.db", " sqlite:///mlflow.db "])
def test_relative_sqlite_uri_is_the_repo_roots(root: Path, uri: str) -> None:
    found = resolve_store({"MLFLOW_TRACKING_URI": uri})
    assert found == store.Store(f"sqlite:///{root / 'mlflow.db'}", root / "mlflow.db", root / "mlartifacts")


def test_absolute_sqlite_uri_and_server_are_kept(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "team/runs.db"
    assert resolve_store({"MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere}"}).artifacts == tmp_path / "team/mlartifacts"
    assert resolve_store({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000/"}) == store.Store("http://127.0.0.1:5000")


@pytest.mark.parametrize(
    ("uri", "words"),
    [("mlruns", "file store"), ("file:///tmp/mlruns", "file store"), ("sqlite://", "in-memory"),
     ("sqlite:///:memory:", "in-memory"), ("postgresql://u@127.0.0.1/mlflow", "mlflow server --backend-store-uri"),
     ("mysql+pymysql://u@127.0.0.1/mlflow", "mlflow server --backend-store-uri")],
)
def test_stores_that_would_lose_runs_are_refused(root: Path, uri: str, words: str) -> None:
    with pytest.raises(StoreError, match=f"MLFLOW_TRACKING_URI={re.escape(uri.replace('u@', ''))}: .*"
                                         f"{re.escape(words)}"):
        resolve_store({"MLFLOW_TRACKING_URI": uri})


def test_a_run_from_a_temporary_copy_lands_in_the_root_store(root: Path) -> None:
    """What `dvc exp run --temp` does with MLFLOW_TRACKING_URI=sqlite:///mlflow.db exported."""
    found = resolve_store({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    experiment_id = mlflow_store.configure(found, "mnist")
    with mlflow_store.tracked_run(experiment_id=experiment_id) as run:
        Path("figure.png").write_bytes(b"png")
        mlflow.log_artifact("figure.png")
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlartifacts")
    assert (root / "mlflow.db").exists() and not Path("mlflow.db").exists()
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.fixture(scope="session")
def set_up_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow store as MLflow sets one up for the mnist experiment, made once; the tests that check a store
    take copies of its database (`stored`), since setting one up takes MLflow seconds."""
    folder = tmp_path_factory.mktemp("set-up-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it; undone on leaving
        mlflow_store.configure(resolve_store({"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}), "mnist")
    return folder / "mlflow.db"


@pytest.fixture
def stored(root: Path, set_up_store: Path) -> store.Store:
    """The repo root's store, holding a copy of the set-up database."""
    shutil.copy2(set_up_store, root / "mlflow.db")
    return resolve_store()


def damage_one_page(path: Path) -> None:
    """Overwrite one page in the middle of the database (not the header): what a bad disk sector does."""
    connection = sqlite3.connect(path)
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    data = bytearray(path.read_bytes())
    page = len(data) // page_size // 2
    data[page * page_size : (page + 1) * page_size] = b"\xa5" * page_size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: p.write_bytes(b"this is not a database" * 100), "file is not a database"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]), "malformed"),
        (damage_one_page, "damaged"),
    ],
    ids=["garbage", "truncated", "damaged-page"],
)
def test_a_corrupt_store_is_one_line(root: Path, stored: store.Store, damage, words: str) -> None:
    found = stored
    damage(root / "mlflow.db")
    with pytest.raises(StoreError) as info:
        check_store(found)
    message = str(info.value)
    assert "\n" not in message and words in message and str(root / "mlflow.db") in message
    assert "move" in message  # what to do


def test_an_unwritable_artifact_folder_is_one_line(root: Path, stored: store.Store) -> None:
    found = stored
    (root / "mlartifacts").rmdir() if (root / "mlartifacts").exists() else None
    (root / "mlartifacts").write_text("a file where the folder should be")
    with pytest.raises(StoreError, match="cannot write in .*mlartifacts"):
        check_store(found)


def test_a_full_disk_is_refused_before_the_work(stored: store.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    found = stored
    check_store(found)
    monkeypatch.setattr(store, "MIN_FREE_BYTES", 1 << 60)  # more than any disk: as if this one were full
    with pytest.raises(StoreError, match="MiB free in .*free some space"):
        check_store(found)


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (mount := tmp_path / "small").mkdir()
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", target=mount):
        monkeypatch.chdir(mount)
        monkeypatch.setenv("DVC_ROOT", str(mount))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with pytest.raises(StoreError, match=f"only [0-9]+ MiB free in {mount}"):
            check_store(resolve_store())


def test_a_read_only_store_is_refused(root: Path, stored: store.Store, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A store seen through a read-only mount (as root, file modes alone do not stop a write)."""
    (view := tmp_path / "read-only-view").mkdir()
    with mounted("--bind", str(root), target=view):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        monkeypatch.setenv("DVC_ROOT", str(view))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
        with pytest.raises(StoreError, match=f"MLflow store {view / 'mlflow.db'} is read-only"):
            check_store(resolve_store())


def test_a_login_in_the_tracking_uri_is_sent_to_that_server_alone_and_shown_nowhere(serve) -> None:
    other = serve({"/api/2.0/mlflow/experiments/search": ("application/json", b"{}")})
    server = serve({"/health": ("text/plain", b"OK"),
                    "/api/2.0/mlflow/experiments/search": ("redirect", other.base + "api/2.0/mlflow/experiments/"
                                                                         "search")},
                   login=("alice", "pa ss:word"), public=("/health",))
    found = resolve_store({"MLFLOW_TRACKING_URI": server.base.replace("//", "//alice:pa%20ss%3Aword@")})
    assert found.uri == server.base.rstrip("/") and found.login == ("alice", "pa ss:word")
    assert "word" not in repr(found)
    check_store(found)  # the login reached the server; the redirect's target got no Authorization header
    assert server.requests[1][1] == "Basic " + base64.b64encode(b"alice:pa ss:word").decode()
    assert [auth for _, auth in other.requests] == [None]


def test_a_tracking_uri_with_a_login_that_does_not_answer_is_one_line_without_it() -> None:
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}/"
    with pytest.raises(StoreError) as info:
        check_store(resolve_store({"MLFLOW_TRACKING_URI": uri}))
    assert str(info.value).startswith(f"MLFLOW_TRACKING_URI={uri.replace('alice:hunter2@', '').rstrip('/')}: the "
                                      "MLflow server does not answer")
    assert "hunter2" not in str(info.value) and "alice" not in str(info.value)
