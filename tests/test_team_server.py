"""The team server's command refuses what it cannot do in one line, before starting anything (no PostgreSQL needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, project_env


def team_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mnist_pipeline.team_server", *args], cwd=REPO, env=project_env(),
                          capture_output=True, text=True)


def test_a_first_start_without_an_admin_password_is_refused(tmp_path: Path) -> None:
    result = team_server("start", "--data", str(tmp_path / "team"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: team server {tmp_path / 'team'}: set MLFLOW_AUTH_ADMIN_PASSWORD (and optionally "
        "MLFLOW_AUTH_ADMIN_USERNAME, default admin) for the first start: it creates that admin account"
    ]
    assert sorted(p.name for p in (tmp_path / "team").iterdir()) == ["server.json"]  # no database made


def test_status_of_a_folder_never_started_says_stopped(tmp_path: Path) -> None:
    result = team_server("status", "--data", str(tmp_path / "team"), "--port", "5999", "--db-port", "5998")
    assert result.returncode == 3
    assert result.stdout == ("mlflow server http://127.0.0.1:5999: stopped; PostgreSQL 127.0.0.1:5998: stopped\n")
