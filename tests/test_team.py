"""A team on several machines: one DVC remote (a folder, a real sshd), one real mlflow server on PostgreSQL with logins.

Each "machine" is a git clone with its own DVC cache; they share a bare git repo as `origin`, the DVC remote
`origin` (pointed at the team's storage with `dvc remote modify --local`, as docs/team.md says) and the tracking
server that `python -m tools.team_server` starts. Training is shrunk to one epoch of the real data.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_pipeline.data import load_mnist
from mnist_pipeline.digits import to_tensor
from mnist_pipeline.model import Net
from mnist_pipeline.tracking.store import StoreError, check_store, resolve_store
from mnist_pipeline.training import load_state_dict
from tests.conftest import (
    REPO, copy_workdir, doc_block, doc_commands, dvc, free_port, program, project_env, queue_workers, wait_for_queue,
    wait_until,
)
from tools.stage_commands import stage_commands
from tools.team_server import TeamServer

pytestmark = pytest.mark.slow
PASSWORDS = {"admin": "admin-password-of-the-tests", "alice": "alice-password-of-the-tests",
             "bob": "bob-password-of-the-tests", "carol": "carol-password-of-the-tests"}
MARKER_ONLY = {"record": [{"changed outs": {"reports/.mlflow-recorded": "deleted"}}]}
# Every server started here stops itself after this long, should the teardown never run.
SELF_STOP_S = 3600


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=project_env(**env), capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def git(root: Path, *args: str) -> str:
    return run(["git", *args], root).stdout


def dvc_fails(clone: Path, *args: str, **env: str) -> list[str]:
    """Run a dvc command that must fail; return its ERROR lines."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=clone, env=project_env(**env),
                            capture_output=True, text=True)
    assert result.returncode != 0, f"dvc {' '.join(args)} succeeded:\n{result.stdout}"
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("ERROR")]


def dvc_error(clone: Path, *args: str, **env: str) -> str:
    """The one line in which a failing dvc command says why; any other ERROR line only counts the files it missed."""
    cause, *counts = dvc_fails(clone, *args, **env)
    assert all(re.fullmatch(r"ERROR: failed to \w+ data (from|to) the cloud - \d+ files failed to \w+", line)
               for line in counts), [cause, *counts]
    return cause


# ---- the servers ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ssh:
    port: int
    key: Path
    stranger_key: Path  # a key the server does not know
    home: Path  # a HOME whose ~/.ssh/known_hosts holds the server's host key, as a user's would

    def url(self, folder: Path) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}{folder}"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ssh]:
    """Debian's sshd on 127.0.0.1 with its own host key and config, accepting one generated key (SFTP only)."""
    folder = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "stranger_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], folder)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nSubsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder (the service makes it)
    home = folder / "home"
    (home / ".ssh").mkdir(parents=True)
    host_key = (folder / "host_key.pub").read_text().split()[:2]
    (home / ".ssh/known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    log = (folder / "sshd.log").open("w")
    process = subprocess.Popen(["timeout", str(SELF_STOP_S), program("sshd"), "-D", "-e", "-f",
                                str(folder / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline, (folder / "sshd.log").read_text()
            time.sleep(0.2)
        yield Ssh(port, folder / "client_key", folder / "stranger_key", home)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@dataclass(frozen=True)
class Team:
    url: str
    data: Path

    def env(self, user: str, password: str | None = None) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password or PASSWORDS[user]}


def team_server(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.team_server", *args], cwd=REPO,
                          env=project_env(**env), capture_output=True, text=True)


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    """docs/team.md's team server on its own ports, with the accounts alice and bob made by the admin as it says."""
    program("initdb")  # PostgreSQL's, which the team server starts
    # Not under pytest's private base folder: PostgreSQL runs as the `postgres` user when the tests run as root.
    data = Path(tempfile.mkdtemp(prefix="mnist-team-"))
    data.chmod(0o711)
    port = free_port()
    try:
        started = team_server("start", "--data", str(data), "--port", str(port), "--db-port", str(free_port()),
                              "--stop-after", str(SELF_STOP_S), MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORDS["admin"])
        assert started.returncode == 0, started.stdout + started.stderr
        url = f"http://127.0.0.1:{port}"
        for user, flags in (("alice", ["--can-register"]), ("bob", ["--can-register"]), ("carol", [])):
            added = subprocess.run(  # the docs' command, the password on standard input
                [sys.executable, "-m", "tools.team_server", "add-user", "--data", str(data), user, *flags],
                cwd=REPO, env=project_env(**Team(url, data).env("admin")), input=PASSWORDS[user] + "\n",
                capture_output=True, text=True)
            assert added.returncode == 0, added.stderr
        yield Team(url, data)
    finally:
        team_server("stop", "--data", str(data))
        shutil.rmtree(data, ignore_errors=True)


# ---- the project -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, real_baseline: Path) -> Path:
    """A copy of the session's repo whose baseline (one epoch) is reproduced and committed (conftest's
    `real_baseline`), pushed to a bare git repo: the team's origin."""
    root = tmp_path_factory.mktemp("team")
    repo = copy_workdir(real_baseline, root / "repo")
    git(root, "init", "-q", "--bare", "origin.git")
    git(root / "origin.git", "symbolic-ref", "HEAD", "refs/heads/main")
    git(repo, "remote", "add", "origin", str(root / "origin.git"))
    git(repo, "push", "-q", "origin", "HEAD:refs/heads/main")
    return repo


def clone(baseline: Path, dest: Path) -> Path:
    """A teammate's fresh clone: git only, its own (empty) DVC cache."""
    origin = git(baseline, "remote", "get-url", "origin").strip()
    git(dest.parent, "clone", "-q", origin, str(dest))
    return dest


def use_remote(clone: Path, url: str, **options: str) -> None:
    """What docs/team.md tells each teammate to run: the committed remote `origin`, pointed at the team's storage."""
    dvc(clone, "remote", "modify", "--local", "origin", "url", url)
    for key, value in options.items():
        dvc(clone, "remote", "modify", "--local", "origin", key, value)


def use_ssh(clone: Path, ssh: Ssh, folder: Path, key: Path | None = None) -> None:
    use_remote(clone, ssh.url(folder), keyfile=str(key or ssh.key))


def model_md5(lock: str) -> str:
    return yaml.safe_load(lock)["stages"]["train"]["outs"][0]["md5"]


def in_cache(clone: Path, md5: str) -> bool:
    return (clone / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file()


def workspace_files(clone: Path) -> dict[str, int]:
    """Every file of a clone but git's and DVC's own bookkeeping, with its size."""
    skip = (".git/", ".dvc/tmp/", ".dvc/config.local")
    return {str(p.relative_to(clone)): p.stat().st_size for p in clone.rglob("*")
            if p.is_file() and not str(p.relative_to(clone)).startswith(skip)}


def status(clone: Path) -> dict:
    return json.loads(dvc(clone, "status", "--json").stdout)


def exp_table(clone: Path) -> dict[str, dict[str, str]]:
    rows = csv.DictReader(io.StringIO(dvc(clone, "exp", "show", "--csv").stdout))
    return {row["Experiment"]: row for row in rows if row["Experiment"]}


def assert_trains_nothing(clone: Path) -> None:
    """`dvc repro` after a pull: every stage up to date but record, which records this clone's result; then clean."""
    out = dvc(clone, "repro").stdout
    for stage in ("download", "split", "train", "evaluate", "plot"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage 'record'" in out
    assert "Data and pipelines are up to date." in dvc(clone, "status").stdout


# ---- DVC remotes ---------------------------------------------------------------------------------------------------
def test_folder_remote_push_then_pull_on_a_fresh_clone(baseline: Path, tmp_path: Path) -> None:
    store = tmp_path / "shared-folder"
    mine = copy_workdir(baseline, tmp_path / "mine")
    use_remote(mine, str(store))
    assert "files pushed" in dvc(mine, "push").stdout
    teammate = clone(baseline, tmp_path / "teammate")
    use_remote(teammate, str(store))
    # `dvc pull` before any pull or repro: what failed for the teammate.
    dvc(teammate, "pull")
    for path in ("data/raw/train-images-idx3-ubyte", "data/split/train.npy", "models/model.pt"):
        assert (teammate / path).read_bytes() == (baseline / path).read_bytes()
    assert status(teammate) == MARKER_ONLY
    assert_trains_nothing(teammate)


def test_ssh_push_that_failed_midway_resumes_and_a_clone_pulls_over_ssh_once_address_and_key_are_right(
    baseline: Path, sshd: Ssh, tmp_path: Path
) -> None:
    store = tmp_path / "ssh-store"
    mine = copy_workdir(baseline, tmp_path / "mine")
    use_ssh(mine, sshd, store)
    # The model's object can't be written (a folder in its place): the push fails after uploading the others.
    blocker = store / "files/md5" / model_md5((mine / "dvc.lock").read_text())[:2]
    blocker = blocker / model_md5((mine / "dvc.lock").read_text())[2:]
    blocker.mkdir(parents=True)
    errors = dvc_fails(mine, "push", HOME=str(sshd.home))
    assert errors[-1] == "ERROR: failed to push data to the cloud - 1 files failed to upload", errors
    assert all("failed to transfer" in line for line in errors[:-1]), errors
    uploaded = {p for p in store.rglob("*") if p.is_file()}
    assert len(uploaded) >= 5  # raw (4 files, a folder's listing), split...
    blocker.rmdir()
    # Again: only what is missing goes up.
    assert "1 file pushed" in dvc(mine, "push", HOME=str(sshd.home)).stdout
    assert {p for p in store.rglob("*") if p.is_file()} > uploaded

    # A teammate's clone: an unreachable remote or a refused key is one error and changes nothing...
    teammate = clone(baseline, tmp_path / "teammate")
    before = workspace_files(teammate)
    nobody = Ssh(free_port(), sshd.key, sshd.stranger_key, sshd.home)
    for remote, key, words in ((nobody, sshd.key, "Connect call failed ('127.0.0.1', "),
                               (sshd, sshd.stranger_key, "Permission denied for user")):
        use_ssh(teammate, remote, store, key)
        for command in (["pull"], ["fetch"]):
            error = dvc_error(teammate, *command, HOME=str(sshd.home))
            assert words in error and "127.0.0.1" in error, error
            assert workspace_files(teammate) == before
    # ... and with the right address and key, the pull brings everything.
    use_ssh(teammate, sshd, store)
    dvc(teammate, "pull", HOME=str(sshd.home))
    assert (teammate / "models/model.pt").read_bytes() == (baseline / "models/model.pt").read_bytes()
    assert status(teammate) == MARKER_ONLY

    # Nor does a refused push touch the pusher's workspace or the remote.
    use_ssh(mine, sshd, tmp_path / "other-store", sshd.stranger_key)
    files = workspace_files(mine)
    error = dvc_error(mine, "push", HOME=str(sshd.home))
    assert "Permission denied for user" in error
    assert workspace_files(mine) == files and not (tmp_path / "other-store").exists()


def test_experiment_made_before_the_remote_existed_needs_dash_r(baseline: Path, tmp_path: Path) -> None:
    """DVC takes the default remote from each pushed commit's .dvc/config: for an older commit, there is none."""
    store = tmp_path / "shared-folder"
    mine = copy_workdir(baseline, tmp_path / "mine")
    dvc(mine, "remote", "remove", "origin")
    git(mine, "commit", "-qam", "as before the team setup: no remote")
    dvc(mine, "exp", "run", "-n", "plots-4", "-S", "plot.n_images=4")  # plot and record only: a quick experiment
    git(mine, "checkout", "-q", "HEAD~", "--", ".dvc/config")
    git(mine, "commit", "-qm", "the team setup: the remote is declared", "--", ".dvc/config")
    use_remote(mine, str(store))
    # This test's own git origin, so that its experiment is no other test's.
    git(tmp_path, "init", "-q", "--bare", "origin.git")
    git(mine, "remote", "set-url", "origin", str(tmp_path / "origin.git"))
    git(mine, "push", "-q", "origin", "HEAD:refs/heads/main")
    git(tmp_path / "origin.git", "symbolic-ref", "HEAD", "refs/heads/main")

    # Reported as a success, yet nothing is uploaded: the experiment's commit names no remote.
    out = dvc(mine, "exp", "push", "origin", "plots-4").stdout
    assert "Pushed experiment plots-4" in out and not store.exists()
    # Naming the remote (defined in the local config, which every commit sees) uploads its data and model.
    dvc(mine, "exp", "push", "-r", "origin", "-A", "origin")
    lock = git(mine, "show", f"{name_ref(mine, 'plots-4')}:dvc.lock")
    store_files = {p.name for p in store.rglob("*") if p.is_file()}
    assert model_md5(lock)[2:] in store_files

    teammate = clone(mine, tmp_path / "teammate")
    use_remote(teammate, str(store))
    dvc(teammate, "exp", "pull", "-r", "origin", "origin", "plots-4")
    dvc(teammate, "exp", "apply", "plots-4")
    assert (teammate / "models/model.pt").read_bytes() == (mine / "models/model.pt").read_bytes()
    assert status(teammate) == MARKER_ONLY  # the teammate's `dvc repro` would train nothing


def test_an_experiment_pushed_without_its_data_then_the_readme_ways_on(baseline: Path, tmp_path: Path) -> None:
    store = tmp_path / "shared-folder"
    mine = copy_workdir(baseline, tmp_path / "mine")
    use_remote(mine, str(store))
    git(tmp_path, "init", "-q", "--bare", "origin.git")  # this test's own origin: its experiment is no other's
    git(mine, "remote", "set-url", "origin", str(tmp_path / "origin.git"))
    git(mine, "push", "-q", "origin", "HEAD:refs/heads/main")
    git(tmp_path / "origin.git", "symbolic-ref", "HEAD", "refs/heads/main")
    dvc(mine, "push")
    dvc(mine, "exp", "run", "-n", "lr-12", "-S", "train.lr=0.0012")
    dvc(mine, "exp", "push", "--no-cache", "origin", "lr-12")
    lock = git(mine, "show", f"{name_ref(mine, 'lr-12')}:dvc.lock")

    teammate = clone(mine, tmp_path / "teammate")
    use_remote(teammate, str(store))
    dvc(teammate, "pull")
    pulled = dvc(teammate, "exp", "pull", "origin", "lr-12")  # exits 0, with DVC's warning as docs/team.md shows it
    warning = "WARNING: Some of the cache files do not exist neither locally nor on remote. Missing cache files:"
    assert warning in pulled.stderr and f"md5: {model_md5(lock)}" in pulled.stderr
    assert warning in (REPO / "docs" / "team.md").read_text()
    applied = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", "lr-12"], cwd=teammate,
                             env=project_env(), capture_output=True, text=True)
    lines = applied.stderr.splitlines()
    assert applied.returncode != 0 and lines[0] == "ERROR: Checkout failed for following targets:", applied.stderr
    assert "models/model.pt" in lines
    assert not (teammate / "models/model.pt").exists()

    # One way on: `dvc repro` trains it again, to the bytes DVC records for the experiment.
    assert (teammate / "dvc.lock").read_text() == lock  # as `exp apply` left it
    assert "Running stage 'train'" in dvc(teammate, "repro").stdout
    assert (teammate / "dvc.lock").read_text() == lock
    # The other: its author pushes the data, and a teammate's pull and apply find everything.
    pull_and_apply = doc_commands("dvc exp pull origin <exp> && dvc exp apply <exp>")
    dvc(mine, *pull_and_apply[0].replace("<exp>", "lr-12").split()[1:])
    other = clone(mine, tmp_path / "other")
    use_remote(other, str(store))
    dvc(other, "pull")
    run(["bash", "-c", pull_and_apply[1].replace("<exp>", "lr-12")], other)
    assert (other / "models/model.pt").read_bytes() == (teammate / "models/model.pt").read_bytes()


def name_ref(clone: Path, name: str) -> str:
    """The experiment ref DVC keeps for `name` (refs/exps/<baseline>/<name>)."""
    refs = git(clone, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return ref


# ---- the tracking server ------------------------------------------------------------------------------------------
def test_a_wrong_or_missing_login_fails_in_one_line_before_training(team: Team, baseline: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(StoreError, match="asks for a login and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"):
        check_store(resolve_store())
    for user, password in (("alice", "not-alices-password"), ("mallory", PASSWORDS["alice"])):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        with pytest.raises(StoreError, match=f"refused the login of MLFLOW_TRACKING_USERNAME={user} .401."):
            check_store(resolve_store())
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["alice"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    check_store(resolve_store())

    # Through DVC: the train stage stops before it loads any data.
    mine = copy_workdir(baseline, tmp_path / "mine")
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=0.004"], cwd=mine,
                            env=project_env(**team.env("alice", "not-alices-password")), capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert (f"error: MLFLOW_TRACKING_URI={team.url}: the MLflow server refused the login of "
            "MLFLOW_TRACKING_USERNAME=alice (401)") in result.stderr
    assert "Iteration" not in result.stdout and "Running stage 'evaluate'" not in result.stdout


def test_a_login_in_the_uri_shows_nowhere_and_a_non_admin_records_a_repeated_training(team: Team, baseline: Path,
                                                                                      tmp_path: Path) -> None:
    """docs/team.md's other way to log in, the account in MLFLOW_TRACKING_URI itself: results are recorded and
    no line of DVC's or the stages' output shows the password; nor does a DVC remote's URL with one in it. A
    training that repeats a recorded result ends its run KILLED as a repeat: alice (EDIT, no delete) records it."""
    mine = copy_workdir(baseline, tmp_path / "mine")
    # An MLflow experiment and registered model of its own: the other tests count the runs and versions of theirs.
    params = yaml.safe_load((mine / "params.yaml").read_text())
    params["mlflow"].update(experiment="login-in-uri", registered_model="login-in-uri-cnn")
    (mine / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    password = PASSWORDS["alice"]
    uri = team.url.replace("http://", f"http://alice:{password}@")
    use_remote(mine, f"http://alice:{password}@127.0.0.1:{free_port()}/store")  # nothing listens there
    outputs = []
    # An experiment, the same training again (its result recorded before: a repeat, which alice, who may not
    # delete runs, still records), and a push to the remote whose URL holds a password.
    for command in (["exp", "run", "-n", "login-in-uri", "-S", "train.lr=0.0042"], ["repro", "-f", "-s", "train"],
                    ["repro", "-f", "-s", "record"], ["push"]):
        result = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=mine,
                                env=project_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
        outputs.append(result.stdout + result.stderr)
        assert (result.returncode == 0) == (command[0] != "push"), outputs[-1]
    assert "record: MLflow run 'login-in-uri'" in outputs[0] and f"in {team.url}," in outputs[0], outputs[0]
    first = re.search(r"record: MLflow run 'login-in-uri' \((\w+)\)", outputs[0])[1]
    assert f"record: already recorded as run 'login-in-uri' ({first})" in outputs[2], outputs[2]
    assert re.search(rf"train: run \w+, which watched this training, ended KILLED as a repeat of run {first} ",
                     outputs[1]), outputs[1]
    assert "failed to push" in outputs[3], outputs[3]
    for output in outputs:
        assert password not in output and "alice:" not in output, output


def test_two_machines_share_one_remote_and_one_tracking_server(baseline: Path, sshd: Ssh, team: Team,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               real_mnist: Path) -> None:
    store = tmp_path / "team-storage"
    home = str(sshd.home)
    pg_log = team.data / "pg/postgres.log"
    pg_log_start = pg_log.stat().st_size
    # The machine of whoever worked alone so far (a local cache, a local mlflow.db) joins as docs/team.md says.
    first = copy_workdir(baseline, tmp_path / "first")
    use_ssh(first, sshd, store)
    dvc(first, "push", "--all-commits", HOME=home)
    (first / "reports/.mlflow-recorded").unlink()
    out = dvc(first, "repro", **team.env("alice")).stdout
    assert "Stage 'train' didn't change, skipping" in out and "Running stage 'record'" in out

    machines = {}
    for name in ("a", "b"):
        machines[name] = clone(baseline, tmp_path / name)
        use_ssh(machines[name], sshd, store)
        dvc(machines[name], "pull", HOME=home)
    a, b = machines["a"], machines["b"]
    # At the same time: a queued grid, two at a time, on machine a (alice); a --temp run on machine b (bob).
    # DVC 3.67 may lose one of two queued experiments that finish at the same moment (its queue says Success,
    # `dvc exp show` lacks it): the grid's two trainings differ in length so they don't.
    dvc(a, "exp", "run", "--queue", "-S", "train.lr=0.005", "-S", "train.epochs=1,2")
    with queue_workers(a, 2, tmp_path / "queue-start.log", **team.env("alice")):
        temp = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "bob-lr-0003",
                                 "-S", "train.lr=0.003"], cwd=b, env=project_env(**team.env("bob")),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert "Success" not in dvc(a, "queue", "status").stdout  # bob's run starts before the grid is done
            out, _ = temp.communicate(timeout=900)
        finally:
            temp.kill()
        assert temp.returncode == 0, out
        queue = wait_for_queue(a, 900)
    assert queue.count("Success") == 2, queue
    grid = sorted(exp_table(a))
    assert len(grid) == 2
    dvc(a, "exp", "push", "origin", *grid, HOME=home)
    dvc(b, "exp", "push", "origin", "bob-lr-0003", HOME=home)

    # A third machine sees both machines' experiments, with their metrics and models.
    third = clone(baseline, tmp_path / "third")
    use_ssh(third, sshd, store)
    dvc(third, "pull", HOME=home)
    names = sorted(dvc(third, "exp", "list", "--name-only", "origin").stdout.split())
    assert names == sorted([*grid, "bob-lr-0003"])
    dvc(third, "exp", "pull", "origin", *names, HOME=home)
    table = exp_table(third)
    assert sorted(table) == names
    assert sorted((table[n]["train.lr"], table[n]["train.epochs"]) for n in names) == [
        ("0.003", "1"), ("0.005", "1"), ("0.005", "2")]
    assert all(float(table[n]["test.accuracy"]) > 0.5 for n in names)
    models = {n: model_md5(git(third, "show", f"{name_ref(third, n)}:dvc.lock")) for n in names}
    assert len(set(models.values())) == 3 and all(in_cache(third, md5) for md5 in models.values())
    dvc(third, "exp", "apply", "bob-lr-0003")
    assert status(third) == MARKER_ONLY  # bob's model is here: nothing to train
    # ... and nothing to record: bob's run is that result's run (alice's repro only adds the workspace's name).
    out = dvc(third, "repro", **team.env("alice")).stdout
    assert "Running stage 'train'" not in out and "record: already recorded as run 'bob-lr-0003' (" in out
    # A fresh clone's pull and repro: the first machine's result, recorded once already.
    fourth = clone(baseline, tmp_path / "fourth")
    use_ssh(fourth, sshd, store)
    dvc(fourth, "pull", HOME=home)
    out = dvc(fourth, "repro", **team.env("bob")).stdout
    assert "record: already recorded as run 'workspace' (" in out
    assert "Data and pipelines are up to date." in dvc(fourth, "status").stdout

    # MLflow: one run per experiment, from both machines, with curves, figures and a model version each.
    for key, value in team.env("admin").items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.url)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("mnist")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted([*names, "workspace"])  # the solo machine's result, and each experiment's
    assert runs["bob-lr-0003"].data.tags["dvc.names"].splitlines()[1].endswith(" workspace")  # the apply + repro
    versions = {v.run_id: v for v in client.search_model_versions("name = 'mnist-cnn'")}
    print(f"two machines: {len(runs)} MLflow runs, {len(versions)} versions of mnist-cnn")
    assert len(versions) == 4
    # Every metric, param, tag and name written once: PostgreSQL logged no constraint error for these records,
    # but for MLflow's own retry when two records number a model version at the same moment.
    logged = pg_log.read_bytes()[pg_log_start:].decode(errors="replace").splitlines()
    errors = [line for line in logged if "violates unique constraint" in line and '"model_version_pk"' not in line]
    assert errors == [], "\n".join(errors)
    assert runs["workspace"].data.metrics["test.accuracy"] == json.loads(
        (baseline / "reports/metrics.json").read_text())["test"]["accuracy"]
    for name in names:
        exp_run = runs[name]
        assert exp_run.data.tags["dvc.exp_name"] == name
        assert exp_run.info.status == "FINISHED" and exp_run.info.run_name == name
        assert exp_run.data.metrics["test.accuracy"] == float(table[name]["test.accuracy"])
        steps = [m.step for m in client.get_metric_history(exp_run.info.run_id, "val_acc")]
        assert steps == ([100, 165] if table[name]["train.epochs"] == "1" else [100, 200, 300, 330])
        assert len(client.list_artifacts(exp_run.info.run_id, "figures")) == 3
        version = versions[exp_run.info.run_id]
        assert exp_run.data.tags["model.version"] == f"mnist-cnn/{version.version}"
        assert version.tags["model_sha256"] == exp_run.data.tags["model_sha256"]

    # The registered model of bob's experiment, loaded from the server, is the model DVC's experiment holds.
    version = versions[runs["bob-lr-0003"].info.run_id].version
    served = mlflow.pyfunc.load_model(f"models:/mnist-cnn/{version}")
    pixels = load_mnist(real_mnist, "t10k")[0][:8]  # uint8, as a client has them: the model normalizes
    local = Net()
    load_state_dict(third / "models/model.pt", local)
    local.eval()
    with torch.no_grad():
        expected = torch.softmax(local(to_tensor(pixels)).double(), 1).numpy()
    answer = served.predict(pixels)
    np.testing.assert_array_equal(answer["digit"].to_numpy(), expected.argmax(1))
    np.testing.assert_allclose(np.stack(answer["probabilities"]), expected, rtol=1e-4, atol=1e-6)

    # Gone runs from bob's clone, which never pulled alice's grid: her experiments are on git's origin, not gone.
    gone = [sys.executable, "-m", "tools.gone_runs", "--delete", "--min-age", "0"]
    refused = subprocess.run(gone, cwd=b, env=project_env(**team.env("bob")), capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith(f"error: {team.url} is a tracking server")
    for extra in ([], ["--all-accounts"], ["--all-accounts"]):  # the second time the same: nothing
        done = run([*gone, "--team-server", *extra], b, **team.env("bob"))
        assert done.stdout == "" and done.stderr.startswith("0 of "), done.stderr
    dvc(a, "exp", "remove", "-g", "origin", grid[0])  # alice removes one of hers, from origin
    dvc(a, "exp", "remove", grid[0])  # and from her clone
    done = run([*gone, "--team-server"], b, **team.env("bob"))
    assert done.stdout == ""  # bob's account does not touch alice's run
    # Deleting runs takes MANAGE on the experiment (MLflow's rule): the admin, for every account.
    done = run([*gone, "--team-server", "--all-accounts"], b, **team.env("admin"))
    assert done.stdout.split() == [runs[grid[0]].info.run_id, grid[0], "FINISHED", "deleted"]
    assert client.get_run(runs[grid[0]].info.run_id).info.lifecycle_stage == "deleted"
    assert run([*gone, "--team-server", "--all-accounts"], b, **team.env("admin")).stdout == ""  # idempotent

    # A safe clean-up keeps every commit's and experiment's data; -w alone keeps only the workspace's.
    main_model = model_md5((baseline / "dvc.lock").read_text())
    dvc(third, "gc", "--all-commits", "--all-experiments", "--force")
    assert in_cache(third, main_model) and all(in_cache(third, md5) for md5 in models.values())
    dvc(third, "gc", "--workspace", "--force")
    assert not in_cache(third, main_model) and in_cache(third, models["bob-lr-0003"])


def other_result(baseline: Path, dest: Path, nudge: int, val_acc: float) -> Path:
    """A copy of the baseline whose model (one bias nudged) and best validation accuracy are another result's."""
    clone = copy_workdir(baseline, dest)
    state = torch.load(clone / "models/model.pt", weights_only=True)
    bias = [key for key in state if key.endswith("bias")][-1]
    torch.save({**state, bias: state[bias] + nudge * 1e-6}, clone / "models/model.pt")
    summary = json.loads((clone / "reports/train.json").read_text())
    summary["train"]["best_val_acc"] = val_acc
    (clone / "reports/train.json").write_text(json.dumps(summary))
    (clone / "reports/.mlflow-recorded").unlink()
    return clone


def record_command(clone: Path) -> list[str]:
    """The record stage as dvc.yaml runs it."""
    return [sys.executable, "-m", "stages.record", *stage_commands(clone / "dvc.yaml")["record"]]


def descendants(pid: int) -> list[int]:
    """Every process started under `pid`, however deep."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [*children, *(d for child in children for d in descendants(child))]


def test_two_clones_recording_at_once_leave_the_best_as_champion(team: Team, baseline: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in team.env("admin").items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.url)
    client = mlflow.MlflowClient()
    # Two rounds, the better result alice's in one and bob's in the other.
    for round_, (a_acc, b_acc) in enumerate([(0.9991, 0.9992), (0.9994, 0.9993)]):
        clones = [other_result(baseline, tmp_path / f"{round_}-{who}", 10 * round_ + i, acc)
                  for i, (who, acc) in enumerate((("alice", a_acc), ("bob", b_acc)))]
        records = [subprocess.Popen(record_command(clone), cwd=clone, env=project_env(**team.env(who)),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for clone, who in zip(clones, ("alice", "bob"))]
        for process in records:
            out, _ = process.communicate(timeout=600)
            assert process.returncode == 0, out
        champion = client.get_model_version_by_alias("mnist-cnn", "champion")
        assert float(champion.tags["train.best_val_acc"]) == max(a_acc, b_acc), round_


def test_who_may_register_and_crown_and_what_the_server_keeps_private(team: Team, baseline: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    alices = other_result(baseline, tmp_path / "alice", 98, 0.5)
    assert "model mnist-cnn version" in run(record_command(alices), alices, **team.env("alice")).stdout
    # carol was added without --can-register: her result is a run, its model logged but not registered.
    clone = other_result(baseline, tmp_path / "carol", 99, 0.99999)
    out = run(record_command(clone), clone, **team.env("carol")).stdout
    assert "not registered: account 'carol' may not register 'mnist-cnn'" in out and "champion" not in out
    for key, value in team.env("carol").items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.url)
    client = mlflow.MlflowClient()
    (run_id,) = re.findall(r"MLflow run 'workspace' \(([0-9a-f]+)\)", out)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not client.search_model_versions(f"name = 'mnist-cnn' and run_id = '{run_id}'")
    version = client.search_model_versions("name = 'mnist-cnn'")[0].version
    with pytest.raises(mlflow.exceptions.MlflowException, match="Permission denied|PERMISSION_DENIED"):
        client.set_registered_model_alias("mnist-cnn", "champion", version)

    # The folder and its files are the service account's only; the server runs as that account, its
    # environment without the passwords; the admin's password is not left in the auth settings.
    data = team.data
    service = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert (data.stat().st_mode & 0o777, data.stat().st_uid) == (0o700, service)
    assert (data / "artifacts").stat().st_mode & 0o777 == 0o700
    for name in ("mlflow.log", "db-password", "session-key", "pgpass", "basic_auth.ini", "server.json", "mlflow.pid"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
    assert "admin_password" not in (data / "basic_auth.ini").read_text()
    leader = int((data / "mlflow.pid").read_text().split()[0])
    servers = [pid for pid in descendants(leader) if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert servers
    # Under root, the server runs as `postgres` where that account can run this Python; else as root, said at
    # start (here the interpreter may live in a private folder, as pyenv's under /root does).
    python_runs = os.geteuid() != 0 or subprocess.run(["runuser", "-u", "postgres", "--", sys.executable, "-c", ""],
                                                      capture_output=True).returncode == 0
    for pid in servers:
        status = Path(f"/proc/{pid}/status").read_text()
        assert int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)) == (service if python_runs else 0)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"PGPASSWORD=", b"MLFLOW_AUTH_ADMIN_PASSWORD=",
                                                        b"MLFLOW_TRACKING_PASSWORD="))]


def test_restarting_the_server_and_the_database_loses_nothing(team: Team, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in team.env("admin").items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.url)
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment(f"restart-{time.time_ns()}")
    figure = tmp_path / "figure.txt"
    figure.write_text("a logged file")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("val_acc", 0.5, step=1)
        mlflow.log_artifact(str(figure))
    model = client.create_registered_model(f"restart-model-{time.time_ns()}")
    client.create_model_version(model.name, f"runs:/{run.info.run_id}/figure.txt", run.info.run_id)

    def everything() -> tuple:
        experiments = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in experiments])
        versions = client.search_model_versions()
        return (sorted(e.name for e in experiments), sorted((r.info.run_id, str(r.data.metrics)) for r in runs),
                sorted((v.name, v.version, v.run_id) for v in versions))

    before = everything()
    stopped = team_server("stop", "--data", str(team.data))
    assert stopped.returncode == 0, stopped.stderr
    assert team_server("status", "--data", str(team.data)).returncode == 3
    # The same folder, no flags and no admin password: the saved ports, the existing database and accounts.
    started = team_server("start", "--data", str(team.data), "--stop-after", str(SELF_STOP_S))
    assert started.returncode == 0, started.stderr
    assert "running; PostgreSQL" in team_server("status", "--data", str(team.data)).stdout
    assert everything() == before
    restored = Path(client.download_artifacts(run.info.run_id, "figure.txt", str(tmp_path / "down")))
    assert restored.read_text() == "a logged file"
    for user in ("alice", "bob"):
        for key, value in team.env(user).items():
            monkeypatch.setenv(key, value)
        check_store(resolve_store())


# ---- runs that end with their training ----------------------------------------------------------------------------
def own_experiment(root: Path, name: str, **train: object) -> None:
    """Params of a test's own: its MLflow experiment and registered model (the other tests count theirs), and its
    training shrunk or grown as it needs."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mlflow"].update(experiment=name, registered_model=f"{name}-cnn")
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def experiment_runs(team: Team, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(team.url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env("admin").items():
            patch.setenv(key, value)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def assert_one_finished_run_and_none_running(team: Team, name: str) -> list[mlflow.entities.Run]:
    runs = experiment_runs(team, name)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    keys = [r.data.tags["result_key"] for r in runs if r.info.status == "FINISHED" and "result_key" in r.data.tags]
    assert keys and len(keys) == len(set(keys)), [(r.info.status, r.data.tags) for r in runs]
    return runs


@pytest.mark.parametrize("stopped", ["PostgreSQL, back during the training", "the team server, back after it"])
def test_a_store_stopped_mid_training_leaves_one_finished_run(team: Team, baseline: Path, tmp_path: Path,
                                                             stopped: str) -> None:
    """alice trains; the team's PostgreSQL (or the whole team server) stops mid-training. One line says so at once;
    back during the training, the curves resume; back after it, record fails in one line and the next `dvc repro`
    completes the same run. Either way: one FINISHED run, none RUNNING, a champion that loads."""
    name = "pg-stop" if stopped.startswith("PostgreSQL") else "server-stop"
    mine = copy_workdir(baseline, tmp_path / "mine")
    own_experiment(mine, name, epochs=3, log_every=20)
    server = TeamServer(team.data)
    log = tmp_path / "out.txt"
    training = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=mine, env=project_env(**team.env("alice")),
                                stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    try:
        live = wait_until("a live run with curves", lambda: next(
            (r for r in experiment_runs(team, name) if "val_acc" in r.data.metrics), None), training)
        if stopped.startswith("PostgreSQL"):
            server.stop_db()
            wait_until("the line that the store stopped", lambda: "stopped answering" in log.read_text(), training)
            server.start_db(server.settings())
            assert training.wait(timeout=600) == 0, log.read_text()[-3000:]
            assert f"answers again: the curves resume in run {live.info.run_id}" in log.read_text()
        else:
            assert team_server("stop", "--data", str(team.data)).returncode == 0
            assert training.wait(timeout=600) != 0
            out = log.read_text()
            assert f"still does not answer: run {live.info.run_id} stays open; record completes it" in out
            assert [line for line in out.splitlines() if line.startswith("error:")] == [
                f"error: MLFLOW_TRACKING_URI={team.url}: the MLflow server does not answer ([Errno 111] Connection "
                "refused); start it, or unset MLFLOW_TRACKING_URI to record in the repo's mlflow.db"], out[-3000:]
            started = team_server("start", "--data", str(team.data), "--stop-after", str(SELF_STOP_S))
            assert started.returncode == 0, started.stderr
            out = dvc(mine, "repro", **team.env("alice")).stdout
            assert "Running stage 'train'" not in out and f"record: MLflow run '{live.info.run_name}' (" in out
    finally:
        training.kill()
    assert log.read_text().count("stopped answering") == 1
    (run,) = assert_one_finished_run_and_none_running(team, name)
    assert run.info.run_id == live.info.run_id
    logged = [int(line.split(",")[0]) for line in (mine / "reports/train_log.csv").read_text().splitlines()[1:]]
    client = mlflow.MlflowClient(team.url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env("admin").items():
            patch.setenv(key, value)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == logged  # every report once (those record filled in come first, by timestamp)
        images, _ = load_mnist(mine / "data/raw", "t10k")
        mlflow.set_tracking_uri(team.url)
        assert len(mlflow.pyfunc.load_model(f"models:/{name}-cnn@champion").predict(images[:4])) == 4


def test_two_machines_reproducing_a_recorded_result_complete_record_as_a_non_admin(team: Team, baseline: Path,
                                                                                  tmp_path: Path) -> None:
    """docs/distributed.md's two machines train again a result recorded before; alice (EDIT on the experiment, no
    delete) completes record: the result keeps its one FINISHED run, the repeat's run ends KILLED as a repeat."""
    name = "two-machine-repeat"
    first = copy_workdir(baseline, tmp_path / "machine0")
    own_experiment(first, name, processes=2)
    git(first, "commit", "-qam", "two processes")  # every machine trains on the same committed params
    out = dvc(first, "repro", **team.env("alice")).stdout  # the result, on one machine with two processes
    assert "record: MLflow run 'workspace'" in out
    (recorded,) = experiment_runs(team, name)
    second = copy_workdir(first, tmp_path / "machine1")
    endpoint = f"127.0.0.1:{free_port()}"
    dvc_run = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"], cwd=first,
                               env=project_env(PET_NNODES="2", PET_RDZV_ENDPOINT=endpoint, **team.env("alice")),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    documented = shlex.split(doc_block("torchrun --nnodes", "bash").replace("\\\n", " "))
    time.sleep(3)  # machine 0 hosts the rendezvous; the other joins it (torchrun waits for it)
    launcher = subprocess.run([part.replace("host0:29400", endpoint) for part in documented], cwd=second,
                              capture_output=True, text=True, env=project_env(), timeout=600)
    out = dvc_run.communicate(timeout=600)[0]
    assert launcher.returncode == 0 and dvc_run.returncode == 0, launcher.stderr[-2000:] + out[-3000:]
    assert "2 processes (gloo)" in out
    # The same bytes: the training's end says so and ends its run as a repeat; DVC takes record for up to date.
    assert re.search(rf"train: run \w+, which watched this training, ended KILLED as a repeat of run "
                     rf"{recorded.info.run_id} ", out), out
    assert "Stage 'record' didn't change, skipping" in dvc(first, "repro", **team.env("alice")).stdout
    out = dvc(first, "repro", "--force", "--single-item", "record", **team.env("alice")).stdout
    assert f"record: already recorded as run 'workspace' ({recorded.info.run_id})" in out
    runs = assert_one_finished_run_and_none_running(team, name)
    (repeat,) = [r for r in runs if r.info.run_id != recorded.info.run_id]
    assert repeat.info.status == "KILLED" and repeat.data.tags["training"] == "repeat"
    assert repeat.data.tags["repeat_of"] == recorded.info.run_id and repeat.data.tags["account"] == "alice"
    assert "Data and pipelines are up to date." in dvc(first, "status").stdout
