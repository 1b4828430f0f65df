"""The README's test command: CI runs it as written, and where the slow tier's Debian packages are missing and cannot
be installed it stops before any test, one line a package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, doc_commands, program
from tools.system_packages import PACKAGES, find_program

CI_RUN = REPO / ".ci/run"


def ci_commands() -> list[str]:
    """The command lines of .ci/run, comments and blank lines left out."""
    lines = (line.split(" #")[0].strip() for line in CI_RUN.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_readmes_set_up_and_test_commands_and_installs_nothing_itself() -> None:
    set_up = [line for line in doc_commands("python3.11 -m venv") if line != "dvc repro"]
    fast, everything = doc_commands('python -m pytest -m "not slow"')
    assert fast == 'python -m pytest -m "not slow"'  # the fast tier needs no services: plain pytest
    ci = ci_commands()
    assert set_up and all(line in ci for line in set_up), (set_up, ci)
    assert ci[-1] == everything == "python -m tools.run_tests", ci
    assert not re.search(r"apt-get|\bpip\b.*install", "\n".join(line for line in ci if line not in set_up)), ci


def test_without_the_packages_and_without_root_it_stops_before_any_test_one_line_each(tmp_path: Path) -> None:
    # An empty PATH: no chromium, and no apt-get or sudo to install it with, as root or not.
    (empty := tmp_path / "bin").mkdir()
    result = subprocess.run([sys.executable, "-m", "tools.run_tests", "tests/test_losses.py"], cwd=REPO,
                            env={"PATH": str(empty), "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == "", result.stdout  # no test ran, nothing was installed
    missing = [p for p in PACKAGES if p.program == "chromium" or find_program(p.program) is None]
    assert result.stderr.splitlines() == [
        f"run_tests: {p.program} not found: {p.why}; install Debian's {p.name} package: "
        f"`sudo apt-get install -y {p.name}`" for p in missing
    ]


@pytest.mark.slow  # it needs the packages the slow tier needs, as the rest of that tier does
def test_with_the_packages_found_it_is_pytest_with_the_arguments_given() -> None:
    for package in PACKAGES:
        program(package.program)
    result = subprocess.run([sys.executable, "-m", "tools.run_tests", "-n", "0", "--collect-only", "-q",
                             "tests/test_losses.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\d+ tests collected", result.stdout, re.M), result.stdout
