"""The Debian packages the slow tests run beside the Python environment: which are missing, and how to install them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Package:
    name: str  # Debian's (and Ubuntu's) package
    program: str  # the program of it that the tests start
    why: str  # what the tests use it for, in a few words


PACKAGES = (
    Package("chromium", "chromium", "the tests open the `dvc plots` pages and `mlflow ui` in headless Chromium"),
    Package("postgresql", "initdb", "the team tests start a real PostgreSQL under `mlflow server`"),
    Package("openssh-server", "sshd", "the team tests use a real SSH server as a DVC remote"),
)


def find_program(name: str) -> str | None:
    """A program on PATH, else where Debian puts it off an ordinary user's PATH: /usr/sbin (sshd), or PostgreSQL's
    versioned folder (initdb, pg_ctl: the newest version's)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(("/usr/sbin", "/sbin")))
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


def missing() -> list[Package]:
    """The packages whose program is not found."""
    return [package for package in PACKAGES if find_program(package.program) is None]


def install_command(packages: list[Package], sudo: bool = True) -> str:
    """The command that installs `packages`, as a user types it."""
    return f"{'sudo ' if sudo else ''}apt-get install -y {' '.join(p.name for p in packages)}"


def missing_line(package: Package) -> str:
    """One line naming a missing package, what needs it and the exact command that installs it."""
    return (f"{package.program} not found: {package.why}; install Debian's {package.name} package: "
            f"`{install_command([package])}`")
