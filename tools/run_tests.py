"""The whole test suite on a fresh machine: the Debian packages the slow tier needs installed first, then pytest.

Usage: python -m tools.run_tests [PYTEST ARGS...]

As root, or where sudo works, the missing packages are installed with apt-get, in one line saying which and why.
Where they cannot be, it stops before any test with one line per missing package naming the command that installs it.
Any arguments go to pytest as they are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tools.system_packages import Package, install_command, missing, missing_line


def apt_prefix() -> list[str] | None:
    """How this user runs apt-get: as root directly, else through sudo when it asks no password or can ask one on
    this terminal; None where neither works, or where there is no apt-get (not Debian or Ubuntu)."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo")
    if sudo is None:
        return None
    if sys.stdin.isatty() or subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return [sudo]
    return None


def install(packages: list[Package], prefix: list[str]) -> bool:
    """apt-get update and install `packages`; whether apt-get succeeded."""
    names = ", ".join(p.name for p in packages)
    whys = "; ".join(p.why for p in packages)
    print(f"run_tests: installing {names} with apt-get ({whys})", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], install_command(packages, sudo=False).split() + ["-qq"]):
        done = subprocess.run([*prefix, *command], env=env, stdout=subprocess.DEVNULL)
        if done.returncode:
            print(f"run_tests: `{' '.join([*prefix, *command])}` failed (exit {done.returncode})", file=sys.stderr)
            return False
    return True


def main(pytest_args: list[str]) -> int:
    absent = missing()
    if absent:
        prefix = apt_prefix()
        if prefix is not None and install(absent, prefix):
            absent = missing()
        if absent:
            for package in absent:
                print(f"run_tests: {missing_line(package)}", file=sys.stderr)
            return 1
    # Replaced by pytest: its output and exit status are the command's, as with `python -m pytest`.
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *pytest_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
