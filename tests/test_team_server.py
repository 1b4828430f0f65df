"""The team server's command refuses what it cannot do in one line, before starting anything (no PostgreSQL needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, project_env


def team_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.team_server", *args], cwd=REPO, env=project_env(),
                          capture_output=True, text=True)


def test_a_first_start_without_an_admin_password_is_refused(tmp_path: Path) -> None:
    result = team_server("start", "--data", str(tmp_path / "team"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: team server {tmp_path / 'team'}: set MLFLOW_AUTH_ADMIN_PASSWORD (and optionally "
        "MLFLOW_AUTH_ADMIN_USERNAME, default admin) for the first start: it creates that admin account"
    ]
    assert not (tmp_path / "team").exists()  # nothing made


@pytest.mark.parametrize("command", [["status"], ["stop"], ["add-user", "carol"]])
def test_a_folder_that_holds_no_team_server_is_one_line_and_stays_empty(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "team").mkdir()
    result = team_server(command[0], "--data", str(tmp_path / "team"), *command[1:])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: team server: {tmp_path / 'team'} holds no team server (no server.json); start one there with "
        "`start`, or give the folder you started it in"]
    assert list((tmp_path / "team").iterdir()) == []
    assert team_server(command[0], "--data", str(tmp_path / "missing"), *command[1:]).returncode == 1
    assert not (tmp_path / "missing").exists()


def test_data_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "team").write_text("not a folder")
    result = team_server("start", "--data", str(tmp_path / "team"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: team server: --data {tmp_path / 'team'} is a file; give a folder (a new one is created)"]
    assert (tmp_path / "team").read_text() == "not a folder"


def test_a_pid_file_from_before_a_reboot_never_names_another_process(tmp_path: Path) -> None:
    from tools.team_server import TeamServer, process_start

    other = subprocess.Popen(["sleep", "60"])  # an unrelated process that got the number the file holds
    try:
        server = TeamServer(tmp_path)
        server.mlflow_pid.write_text(f"{other.pid} {process_start(other.pid) - 1}\n")  # same pid, another start
        assert server.running_pid(server.mlflow_pid) is None
        server.stop_mlflow()
        assert other.poll() is None  # not signalled
        server.write_pid(server.mlflow_pid, other.pid)
        assert server.running_pid(server.mlflow_pid) == other.pid
        assert oct(server.mlflow_pid.stat().st_mode & 0o777) == "0o600"
    finally:
        other.kill()
        other.wait()
