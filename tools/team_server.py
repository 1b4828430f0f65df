"""The team's tracking server: `mlflow server` on a PostgreSQL database, artifacts served, basic-auth logins.

    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m tools.team_server start --data /srv/mnist-team
    python -m tools.team_server add-user --data /srv/mnist-team alice --can-register  # asks a password
    python -m tools.team_server status --data /srv/mnist-team
    python -m tools.team_server stop --data /srv/mnist-team

Everything lives in the data folder: the PostgreSQL cluster (`pg/`, made by initdb, run by pg_ctl, no system
service), the artifacts the server stores for its clients (`artifacts/`), the auth app's settings, the logs, and
two generated secrets (the database password, the auth app's session key). Stopping and starting again with the
same folder keeps every run, model and user. Clients need only MLFLOW_TRACKING_URI=http://<host>:<port> and
MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD.

The folder and all in it are its owner's only (0700/0600). Started as root, PostgreSQL and mlflow server run as the
unprivileged `postgres` account, which owns the folder. Every account reads everything; an account logs runs
only once added with add-user, and registers (and so crowns) model versions only with --can-register.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mnist_pipeline.errors import PipelineError, first_line, run_stage, text_lines
from tools.local_server import answers, wait_until_ready
from tools.system_packages import find_program

DB_USER = "mlflow"
DATABASES = ("mlflow", "mlflow_auth")  # runs and models; the auth app's users and permissions
# The sweeps' Optuna studies (tools/sweep.py): a database and a role of their own, apart from MLflow's (both keep an
# `alembic_version` table), the one part of PostgreSQL that teammates' machines reach; the role reaches nothing else.
SWEEP_DB = SWEEP_ROLE = "optuna"
SWEEP_PGPASS = "sweep.pgpass"  # the line a teammate puts in ~/.pgpass (mode 600) to join a study
# Every account reads everything; add-user grants logging runs (EDIT on the experiment) and, for some, registering
# model versions and moving the champion alias (EDIT on the registered model): the served model's code is theirs.
DEFAULT_PERMISSION = "READ"
# MLflow checks each request's password with PBKDF2 (tens of milliseconds): a record's few dozen requests paid
# it every time. A verified login is cached for this long instead; the price, as MLflow's basic_auth.ini says: a
# password changed or an account deleted through one worker may still work on the others until it expires.
AUTH_CACHE_TTL_S = 60
SYSTEM_USER = "postgres"  # PostgreSQL refuses to run as root; Debian's package creates this user; mlflow runs as it too


@dataclass(frozen=True)
class Settings:
    """Where the server listens; kept in the data folder so a restart needs only --data."""

    host: str = "127.0.0.1"
    port: int = 5000
    db_port: int = 5433
    workers: int = 2


class TeamServer:
    """The files of one data folder, and the commands that start and stop what runs on them."""

    def __init__(self, data: Path) -> None:
        self.data = data.resolve()
        self.pg = self.data / "pg"
        self.artifacts = self.data / "artifacts"
        self.settings_file = self.data / "server.json"
        self.mlflow_pid = self.data / "mlflow.pid"
        self.mlflow_log = self.data / "mlflow.log"
        self.watchdog_pid = self.data / "watchdog.pid"
        self.auth_ini = self.data / "basic_auth.ini"

    # ---- settings and secrets -------------------------------------------------------------------------------
    def settings(self, save: bool = False, **given: object) -> Settings:
        saved = json.loads(self.settings_file.read_text()) if self.settings_file.exists() else {}
        chosen = Settings(**{**saved, **{k: v for k, v in given.items() if v is not None}})
        if save:
            self.private_file(self.settings_file, json.dumps(asdict(chosen)) + "\n")
        return chosen

    def private_file(self, path: Path, text: str) -> None:
        """Write a file only the folder's owner reads (the service account, under root)."""
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text)
        self.give_to_service(path)

    def give_to_service(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, SYSTEM_USER, SYSTEM_USER)

    def secret(self, name: str) -> str:
        """A random secret generated once into the data folder (mode 0600), the same after every restart."""
        path = self.data / name
        if not path.exists():
            self.private_file(path, secrets.token_urlsafe(32))
        return path.read_text().strip()

    def url(self, settings: Settings) -> str:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        return f"http://{host}:{settings.port}"

    def db_uri(self, settings: Settings, database: str) -> str:
        # No password in the URI (it would show in `ps`): libpq reads it from PGPASSWORD. SQLAlchemy 2.1 takes a
        # plain postgresql:// to mean psycopg 3; the driver installed is psycopg2.
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{settings.db_port}/{database}"

    # ---- PostgreSQL --------------------------------------------------------------------------------------------
    def as_db_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", SYSTEM_USER, "--", *command] if os.geteuid() == 0 else command

    def pg_run(self, command: list[str], what: str) -> None:
        result = subprocess.run(self.as_db_owner(command), capture_output=True, text=True)
        if result.returncode != 0:
            lines = text_lines(result.stderr or result.stdout) or ["(no output)"]
            raise PipelineError(f"team server {self.data}: {what} failed: {lines[-1]}")

    def init_db(self) -> None:
        """initdb once: a cluster whose only role is `mlflow`, with a generated password, local TCP only."""
        if (self.pg / "PG_VERSION").exists():
            return
        password_file = self.data / "db-password"
        self.secret("db-password")
        self.pg.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.pg, SYSTEM_USER, SYSTEM_USER)
            probe = subprocess.run(self.as_db_owner(["test", "-w", str(self.pg)]))
            if probe.returncode != 0:
                raise PipelineError(
                    f"team server {self.data}: the '{SYSTEM_USER}' user cannot reach {self.pg}; make its parent "
                    "folders traversable (chmod o+x) or choose a data folder it can reach"
                )
        self.pg_run([pg_bin("initdb"), "-D", str(self.pg), "-U", DB_USER, "--auth=scram-sha-256",
                     f"--pwfile={password_file}", "--encoding=UTF8", "--locale=C"], "initdb")

    def db_running(self) -> bool:
        return subprocess.run(self.as_db_owner([pg_bin("pg_ctl"), "status", "-D", str(self.pg)]),
                              capture_output=True).returncode == 0

    def start_db(self, settings: Settings) -> None:
        if self.db_running():
            return
        self.allow_sweep_role()
        # Beside 127.0.0.1 (mlflow server's), the server's address: the sweeps' workers on other machines connect.
        listen = "127.0.0.1" if settings.host in ("127.0.0.1", "localhost") else (
            "*" if settings.host in ("0.0.0.0", "::") else f"127.0.0.1,{settings.host}")
        options = f"-c listen_addresses={listen} -c port={settings.db_port} -c unix_socket_directories={self.pg}"
        self.pg_run([pg_bin("pg_ctl"), "start", "-D", str(self.pg), "-l", str(self.pg / "postgres.log"),
                     "-w", "-t", "60", "-o", options], f"PostgreSQL on 127.0.0.1:{settings.db_port}")

    def allow_sweep_role(self) -> None:
        """pg_hba.conf: the sweep role may reach its own database from any address, with its password; every other
        role stays on 127.0.0.1 (initdb's rules)."""
        hba = self.pg / "pg_hba.conf"
        rule = f"host {SWEEP_DB} {SWEEP_ROLE} all scram-sha-256"
        if rule not in self.read_as_db_owner(hba):
            self.pg_run(["sh", "-c", f'printf "%s\\n" "{rule}" >> "{hba}"'], "allowing the sweep role")

    def read_as_db_owner(self, path: Path) -> str:
        result = subprocess.run(self.as_db_owner(["cat", str(path)]), capture_output=True, text=True)
        return result.stdout

    def sweep_storage(self, settings: Settings) -> str:
        """The Optuna storage URL teammates join studies with (no password: libpq reads it from ~/.pgpass)."""
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        return f"postgresql+psycopg2://{SWEEP_ROLE}@{host}:{settings.db_port}/{SWEEP_DB}"

    def create_sweep_database(self, cursor: object, settings: Settings) -> None:
        """The sweep role (a generated password, LOGIN, nothing else) and its database; MLflow's databases closed to
        it. The password reaches PostgreSQL in the statement, never a command line; a teammate gets it as a
        ~/.pgpass line, written into the data folder (0600)."""
        password = self.secret("sweep-db-password")
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SWEEP_ROLE,))
        verb = "ALTER" if cursor.fetchone() else "CREATE"
        cursor.execute(f'{verb} ROLE "{SWEEP_ROLE}" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %s',
                       (password,))
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (SWEEP_DB,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{SWEEP_DB}" OWNER "{SWEEP_ROLE}"')
        for name in (*DATABASES, "postgres"):
            cursor.execute(f'REVOKE CONNECT ON DATABASE "{name}" FROM PUBLIC')
        self.private_file(self.data / SWEEP_PGPASS, f"*:{settings.db_port}:{SWEEP_DB}:{SWEEP_ROLE}:{password}\n")

    def create_databases(self, settings: Settings) -> None:
        import psycopg2  # only the server needs the driver

        try:
            connection = psycopg2.connect(host="127.0.0.1", port=settings.db_port, user=DB_USER, dbname="postgres",
                                          password=self.secret("db-password"), connect_timeout=10)
        except psycopg2.Error as err:
            raise PipelineError(f"team server {self.data}: PostgreSQL on 127.0.0.1:{settings.db_port}: "
                                f"{' '.join(str(err).split())}") from None
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with connection.cursor() as cursor:
                for name in DATABASES:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
                self.create_sweep_database(cursor, settings)
        finally:
            connection.close()

    def stop_db(self) -> None:
        if self.db_running():
            self.pg_run([pg_bin("pg_ctl"), "stop", "-D", str(self.pg), "-m", "fast", "-w", "-t", "60"],
                        "stopping PostgreSQL")

    # ---- mlflow server -----------------------------------------------------------------------------------------
    def running_pid(self, pid_file: Path) -> int | None:
        """The process a pid file names, if it is still that process: the pid and its start time must match, so
        that after a reboot a pid file never names an unrelated process that got the same number."""
        try:
            pid, started = (int(word) for word in pid_file.read_text().split())
            if process_start(pid) != started:
                return None
        except (OSError, ValueError):
            return None
        return pid

    def write_pid(self, pid_file: Path, pid: int) -> None:
        self.private_file(pid_file, f"{pid} {process_start(pid)}\n")

    def start_mlflow(self, settings: Settings, stop_after: float | None) -> None:
        if self.running_pid(self.mlflow_pid):
            return
        self.artifacts.mkdir(mode=0o700, exist_ok=True)
        self.give_to_service(self.artifacts)
        admin = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        self.write_auth_ini(settings, admin)
        # libpq reads the database password from this file (0600), so that it is in no process's environment.
        password = self.secret("db-password")
        self.private_file(self.data / "pgpass", f"127.0.0.1:{settings.db_port}:*:{DB_USER}:{password}\n")
        hidden = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD")
        env = {
            **{k: v for k, v in os.environ.items() if k not in hidden},
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_ini),
            "PGPASSFILE": str(self.data / "pgpass"),
            # The session key must survive restarts, or every browser login and CSRF token breaks.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
            or self.secret("session-key"),
            # MLflow's job runner serves GenAI features (trace roll-ups, prompt jobs) this project does not use; it
            # starts seven worker processes of ~150 MB each.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        }
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--host", settings.host, "--port", str(settings.port), "--workers", str(settings.workers),
            "--backend-store-uri", self.db_uri(settings, "mlflow"),
            "--artifacts-destination", str(self.artifacts),
            "--app-name", "basic-auth",
        ]
        if stop_after:
            command = ["timeout", str(int(stop_after)), *command]
        if os.geteuid() == 0:  # not as root: as the account PostgreSQL runs as, where it can run this Python
            if subprocess.run(self.as_db_owner([sys.executable, "-c", ""]), capture_output=True).returncode == 0:
                command = self.as_db_owner(command)
            else:
                print(f"team server: mlflow server runs as root: the '{SYSTEM_USER}' account cannot run "
                      f"{sys.executable} (a folder above it is private); install Python and the environment where "
                      "other accounts can run them, so that it runs as that account", file=sys.stderr)
        if not self.mlflow_log.exists():
            self.private_file(self.mlflow_log, "")
        with self.mlflow_log.open("a") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, cwd=self.data)
        self.write_pid(self.mlflow_pid, process.pid)
        url = self.url(settings)
        if not wait_until_ready(f"{url}/health", process, 180):
            self.stop_mlflow()
            raise PipelineError(f"team server {self.data}: mlflow server did not start on {url}: "
                                f"{last_error(self.mlflow_log)} (whole log: {self.mlflow_log})")
        if admin:  # the admin account exists now: its password need not stay on disk
            self.write_auth_ini(settings, None)

    def write_auth_ini(self, settings: Settings, admin_password: str | None) -> None:
        self.private_file(self.auth_ini, (
            "[mlflow]\n"
            f"default_permission = {DEFAULT_PERMISSION}\n"
            f"database_uri = {self.db_uri(settings, 'mlflow_auth')}\n"
            "admin_username = admin\n"
            + (f"admin_password = {admin_password}\n" if admin_password else "")
            + "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
        ))

    def stop_mlflow(self) -> None:
        pid = self.running_pid(self.mlflow_pid)
        if pid:
            stop_group(pid)
        self.mlflow_pid.unlink(missing_ok=True)

    def start_watchdog(self, stop_after: float) -> None:
        """Stop everything after `stop_after` seconds even if nobody calls stop (tests, demos)."""
        stop = shlex.join([sys.executable, "-m", "tools.team_server", "stop", "--data", str(self.data)])
        process = subprocess.Popen(["sh", "-c", f"sleep {int(stop_after)} && exec {stop}"],
                                   cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.write_pid(self.watchdog_pid, process.pid)

    # ---- commands ----------------------------------------------------------------------------------------------
    def start(self, settings: Settings, stop_after: float | None = None) -> str:
        if not (self.pg / "PG_VERSION").exists() and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            raise PipelineError(f"team server {self.data}: set MLFLOW_AUTH_ADMIN_PASSWORD (and optionally "
                                "MLFLOW_AUTH_ADMIN_USERNAME, default admin) for the first start: it creates that "
                                "admin account")
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data.chmod(0o700)  # the database, artifacts, logs and secrets: its owner's only
        self.give_to_service(self.data)
        self.settings(save=True, **asdict(settings))
        self.init_db()
        self.start_db(settings)
        self.create_databases(settings)
        self.start_mlflow(settings, stop_after)
        if stop_after:
            self.start_watchdog(stop_after)
        return self.url(settings)

    def stop(self) -> None:
        self.stop_mlflow()
        self.stop_db()
        watchdog = self.running_pid(self.watchdog_pid)
        if watchdog and watchdog != os.getpid():
            stop_group(watchdog)
        self.watchdog_pid.unlink(missing_ok=True)

    def status(self, settings: Settings) -> tuple[bool, str]:
        server = bool(self.running_pid(self.mlflow_pid)) and answers(f"{self.url(settings)}/health")
        database = (self.pg / "PG_VERSION").exists() and self.db_running()
        words = (f"mlflow server {self.url(settings)}: {'running' if server else 'stopped'}; "
                 f"PostgreSQL 127.0.0.1:{settings.db_port}: {'running' if database else 'stopped'}")
        return server and database, words


    def add_user(self, settings: Settings, name: str, password: str, can_register: bool, experiment: str,
                 model: str) -> str:
        """Create a teammate's account (as the admin logged in through MLFLOW_TRACKING_USERNAME/PASSWORD) that may
        log runs into `experiment` and, with can_register, register versions of `model` and move its aliases."""
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.server import get_app_client

        from mnist_pipeline.tracking.mlflow_store import ensure_experiment
        from mnist_pipeline.tracking.registry import ensure_registered_model

        url = self.url(settings)
        mlflow.set_tracking_uri(url)
        client = mlflow.MlflowClient()
        try:
            experiment_id = ensure_experiment(experiment)
            ensure_registered_model(client, model)
            auth = get_app_client("basic-auth", tracking_uri=url)
            auth.create_user(name, password)
            auth.grant_user_permission(name, "experiment", experiment_id, "EDIT")
            auth.grant_user_permission(name, "registered_model", model, "EDIT" if can_register else "READ")
        except (MlflowException, OSError) as err:
            why = first_line(str(err)) or type(err).__name__
            raise PipelineError(f"team server {url}: adding {name!r} failed: {why} (run it with the admin's "
                                "login in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        may = f"log runs into {experiment!r}" + (f", register and crown versions of {model!r}" if can_register else "")
        return f"team server {url}: account {name!r} added; it may {may}"


def read_password(name: str) -> str:
    """The new account's password, from standard input (a pipe or a prompt), never from the command line."""
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise PipelineError("the two passwords differ; nothing was changed")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        raise PipelineError(f"the password for {name!r} has {len(password)} characters: use at least 12")
    return password


def process_start(pid: int) -> int:
    """A process's start time in clock ticks since boot (/proc/PID/stat, field 22): with the pid, who it is."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else in Debian's versioned folder (not on PATH there)."""
    found = find_program(name)
    if found is None:
        raise PipelineError(f"team server: {name} not found; install PostgreSQL (Debian: apt-get install postgresql)")
    return found


def stop_group(pid: int, timeout: float = 30) -> None:
    """SIGTERM the process group `pid` leads (mlflow server and its workers), SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def last_error(log: Path) -> str:
    lines = text_lines(log.read_text(errors="replace"))
    return lines[-1] if lines else "no output"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.team_server", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status", "add-user"))
    parser.add_argument("name", nargs="?", help="add-user: the new account (its password is read from stdin)")
    parser.add_argument("--data", type=Path, required=True, help="the folder that holds the database and artifacts")
    parser.add_argument("--can-register", action="store_true",
                        help="add-user: may register model versions and move the champion alias")
    parser.add_argument("--experiment", default="mnist", help="add-user: the experiment it logs runs into")
    parser.add_argument("--model", default="mnist-cnn", help="add-user: the registered model")
    parser.add_argument("--host", help="address the server listens on (saved; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="the server's port (saved; default 5000)")
    parser.add_argument("--db-port", type=int, help="PostgreSQL's port on 127.0.0.1 (saved; default 5433)")
    parser.add_argument("--workers", type=int, help="server worker processes (saved; default 2)")
    parser.add_argument("--stop-after", type=float, help="stop everything after this many seconds (tests, demos)")
    args = parser.parse_intermixed_args()  # the account's name may come after --data
    if args.data.exists() and not args.data.is_dir():
        raise PipelineError(f"team server: --data {args.data} is a file; give a folder (a new one is created)")
    server = TeamServer(args.data)
    if args.command != "start" and not server.settings_file.is_file():
        raise PipelineError(f"team server: {args.data} holds no team server (no {server.settings_file.name}); "
                            "start one there with `start`, or give the folder you started it in")
    settings = server.settings(host=args.host, port=args.port, db_port=args.db_port, workers=args.workers)
    if args.command == "add-user":
        if not args.name:
            raise PipelineError("team server: add-user needs the new account's name")
        print(server.add_user(settings, args.name, read_password(args.name), args.can_register, args.experiment,
                              args.model))
    elif args.command == "start":
        url = server.start(settings, args.stop_after)
        print(f"team server: {url} (PostgreSQL on 127.0.0.1:{settings.db_port}, artifacts in {server.artifacts})")
        print(f"team server: sweep studies: --storage {server.sweep_storage(settings)}; a teammate puts the line of "
              f"{server.data / SWEEP_PGPASS} into ~/.pgpass (chmod 600) to join (docs/sweeps.md)")
    elif args.command == "stop":
        server.stop()
        print(f"team server {server.data}: stopped")
    else:
        running, words = server.status(settings)
        print(words)
        if not running:
            sys.exit(3)


if __name__ == "__main__":
    run_stage(main)
