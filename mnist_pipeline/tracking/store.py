"""Where MLflow records results, and a cheap check that it can: no MLflow import, so train can check before training."""

from __future__ import annotations

import base64
import getpass
import os
import shutil
import sqlite3
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from mnist_pipeline.errors import PipelineError, without_login
from mnist_pipeline.tracking import tag

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# A run writes about 1 MB (model, figures, reports); refuse well before the disk is full.
MIN_FREE_BYTES = 64 << 20
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
# What MLflow's client sends to a tracking server, read here too so a bad login fails before training.
USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"


class StoreError(PipelineError):
    """The MLflow store cannot record a result; the message names the store and what to do."""


@dataclass(frozen=True)
class Store:
    """A resolved tracking URI, and for a local SQLite store its file and artifact folder.

    A server's URI is kept without the user and password it may have been given with (http://user:pw@host), so
    that no message and no MLflow line ("View run ... at") shows them; they are in `login`, which `tracking`
    hands to MLflow as its login variables.
    """

    uri: str
    database: Path | None = None
    artifacts: Path | None = None
    login: tuple[str, str] | None = field(default=None, repr=False)


def repo_root() -> Path:
    """The main repo's root: DVC sets DVC_ROOT there, even for `--temp` and queued experiments."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_store(environ: dict[str, str] | None = None) -> Store:
    """The store MLFLOW_TRACKING_URI names, relative paths taken from the repo root; by default the root's mlflow.db.

    DVC runs `--temp` and queued experiments in a copy of the repo that it deletes afterwards: a store
    or artifact folder relative to the working directory would be deleted with it.
    """
    uri = (os.environ if environ is None else environ).get("MLFLOW_TRACKING_URI", "").strip()
    root = repo_root()
    if not uri:
        return _sqlite_store(root / STORE_FILE)
    parts = urllib.parse.urlsplit(uri)
    scheme, uri = parts.scheme, without_login(uri)
    if scheme in ("http", "https"):
        return Store(uri.rstrip("/"), login=uri_login(parts))
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path == uri or path in ("", ":memory:"):
            raise StoreError(
                f"MLFLOW_TRACKING_URI={uri}: expected sqlite:///<file> (relative to the repo root) or "
                "sqlite:////<absolute file>; an in-memory store would lose every run"
            )
        return _sqlite_store(root / path)
    if scheme.split("+")[0] in DATABASE_SCHEMES:
        raise StoreError(
            f"MLFLOW_TRACKING_URI={uri}: run `mlflow server --backend-store-uri <this database> "
            "--artifacts-destination <folder>` and point MLFLOW_TRACKING_URI at the server: with a database URI alone, "
            "MLflow keeps artifacts in ./mlruns of the working folder, which DVC deletes after --temp and queued runs"
        )
    raise StoreError(
        f"MLFLOW_TRACKING_URI={uri}: expected a SQLite file (sqlite:///mlflow.db) or a tracking server (http://...); "
        "MLflow's file store (a folder) is no longer supported, and a relative one would be deleted with DVC's "
        "temporary copies"
    )


def _sqlite_store(database: Path) -> Store:
    database = database.resolve()
    return Store(f"sqlite:///{database}", database, database.parent / ARTIFACTS_DIR)


def check_store(store: Store, timeout: float = 10) -> None:
    """Fail in one line if the store cannot take a run: unreachable, corrupt, unwritable or out of space."""
    if store.database is None:
        check_server(store, timeout)
        return
    _check_database(store.database)
    lost = lost_versions(store.database)
    if lost:  # not an error: record logs a lost model again when a result needs it
        print(f"store: {len(lost)} registered model version(s) in {store.uri} have lost their files "
              f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}; was {store.artifacts} deleted or moved?): "
              "they cannot be served; record logs one again when it records its result again "
              "(docs/troubleshooting.md)", file=sys.stderr, flush=True)
    for folder in (store.database.parent, store.artifacts):
        _check_writable(folder, store)


def lost_versions(database: Path) -> list[str]:
    """The registered versions (name/version) whose files in a local artifact folder are gone, not yet replaced."""
    if not database.exists():
        return []
    # MLflow keeps the rows of deleted versions, marked Deleted_Internal; its API no longer shows them.
    query = ("SELECT name, version, storage_location FROM model_versions AS v WHERE current_stage != "
             "'Deleted_Internal' AND NOT EXISTS (SELECT 1 FROM model_version_tags AS t WHERE t.name = v.name AND "
             "t.version = v.version AND t.key = ?)")
    try:
        with closing(read_only(database)) as connection:
            rows = connection.execute(query, (tag.FILES_LOST,)).fetchall()
    except sqlite3.Error:  # a store MLflow has not set up yet has no such tables
        return []
    return [f"{name}/{version}" for name, version, location in rows if files_gone(str(location))]


def files_gone(location: str) -> bool:
    """Whether a version's storage location is a local folder that no longer exists (a server's is not known)."""
    return location.startswith("file:") and not Path(
        urllib.request.url2pathname(urllib.parse.urlparse(location).path)).exists()


def check_server(store: Store, timeout: float = 10) -> None:
    """Fail at once if the tracking server does not answer (MLflow itself retries for minutes) or refuses our login."""
    uri = store.uri
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise StoreError(
            f"MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer ({getattr(err, 'reason', err)}); "
            "start it, or unset MLFLOW_TRACKING_URI to record in the repo's mlflow.db"
        ) from None
    _check_login(store, timeout)


def account() -> str:
    """Who records, as every run says (tag `account`) and tools.gone_runs picks runs by: the tracking server login
    (MLFLOW_TRACKING_USERNAME, else the user in MLFLOW_TRACKING_URI), else this computer's user."""
    login = uri_login(urllib.parse.urlsplit(os.environ.get("MLFLOW_TRACKING_URI", "")))
    return os.environ.get(USERNAME_ENV) or (login[0] if login else getpass.getuser())


def uri_login(parts: urllib.parse.SplitResult) -> tuple[str, str] | None:
    """The user and password a URI was given with (http://user:pw@host), decoded; None without a user."""
    if parts.username is None:
        return None
    return urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")


def login_environ(store: Store) -> dict[str, str]:
    """MLflow's login variables for `store`: those set, else the user and password its URI was given with."""
    names = (USERNAME_ENV, PASSWORD_ENV)
    if store.login is None or any(os.environ.get(name) for name in names):
        return {}
    return dict(zip(names, store.login))


def _check_login(store: Store, timeout: float) -> None:
    """One authenticated read, with the credentials MLflow's client will send; a server without logins accepts it.
    The Authorization header goes to this server alone: urllib copies a plain header to wherever it redirects."""
    uri = store.uri
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    environ = {**os.environ, **login_environ(store)}
    user, password, token = environ.get(USERNAME_ENV), environ.get(PASSWORD_ENV), environ.get(TOKEN_ENV)
    if user and password:
        request.add_unredirected_header("Authorization",
                                        "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        status = err.code
    except (OSError, ValueError) as err:
        raise StoreError(f"MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer "
                         f"({getattr(err, 'reason', err)}); check the server") from None
    if status == 401 and not (user and password) and not token:
        why = f"asks for a login and {USERNAME_ENV}/{PASSWORD_ENV} are not both set"
    elif status == 401:
        who = f"{USERNAME_ENV}={user}" if user and password else TOKEN_ENV
        why = f"refused the login of {who} (401)"
    elif status == 403:
        why = f"does not let {USERNAME_ENV}={user} read experiments (403)"
    else:
        raise StoreError(f"MLFLOW_TRACKING_URI={uri}: the MLflow server answered HTTP {status} to a search of "
                         "experiments; check the server's log") from None
    raise StoreError(f"MLFLOW_TRACKING_URI={uri}: the MLflow server {why}; set {USERNAME_ENV} and {PASSWORD_ENV} "
                     "to your account on it (an admin creates it)") from None


def read_only(database: Path) -> sqlite3.Connection:
    """The store's SQLite file opened read-only, waiting up to 30 s for a writer."""
    return sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=30)


def _check_database(path: Path) -> None:
    if not path.exists():
        return  # MLflow creates it on first use
    if not os.access(path, os.W_OK):
        raise StoreError(f"MLflow store {path} is read-only; make it writable (chmod u+w) or point MLFLOW_TRACKING_URI "
                         "at another store")
    what_to_do = f"move {path} aside (MLflow starts a new one) or restore it from a backup"
    try:
        with closing(read_only(path)) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as err:
        raise StoreError(f"MLflow store {path}: {err}; {what_to_do}") from None
    if problems != ["ok"]:
        first = " ".join(problems[0].split())
        raise StoreError(f"MLflow store {path} is damaged ({first}); {what_to_do}")


def _check_writable(folder: Path, store: Store) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise StoreError(
            f"MLflow store {store.uri}: cannot write in {folder} ({err.strerror or err}); fix its permissions "
            "or point MLFLOW_TRACKING_URI elsewhere"
        ) from None
    if free < MIN_FREE_BYTES:
        raise StoreError(
            f"MLflow store {store.uri}: only {free >> 20} MiB free in {folder} (at least {MIN_FREE_BYTES >> 20} MiB "
            "needed); free some space there"
        )
