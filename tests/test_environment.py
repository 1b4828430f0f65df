"""The environment is the lock: every package installed at its locked version, the lock complete for its inputs."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

LOCK, COMPUTE_LOCK = REPO / "requirements.txt", REPO / "requirements/compute.txt"
INPUT = REPO / "requirements.in"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)


def pins(lock: Path) -> dict[str, str]:
    """The lock's exact versions by canonical name, each entry checked to carry its wheels' hashes."""
    text = lock.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text[text.index("\n", text.index("uv pip compile")) + 1:])
    found = {}
    for entry in entries:
        match = PIN.match(entry)
        assert match, f"{lock.name}: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{lock.name}: {match[1]} has no hash"
        found[canonicalize_name(match[1])] = match[2]
    return found


def top_level(path: Path) -> list[Requirement]:
    """The requirements an input file names, following its -r includes (-c constraints are the lock's business)."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found += top_level(path.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            found.append(Requirement(line))
    return found


def assert_resolves(lock: Path, input_file: Path) -> None:
    """The lock holds what its input names, everything that needs by the installed packages' own metadata, at
    versions they accept, and nothing else: a package left in the lock after its last user went is as wrong as a
    missing one."""
    locked = pins(lock)
    roots = top_level(input_file)
    needed, todo = set(), [(r.name, frozenset(r.extras), r, input_file.name) for r in roots]
    while todo:
        name, extras, requirement, by = todo.pop()
        version = locked.get(canonicalize_name(name))
        assert version is not None, f"{lock.name} lacks {requirement}, which {by} needs"
        assert requirement.specifier.contains(version, prereleases=True), f"{by} needs {requirement}, locked {version}"
        if (canonicalize_name(name), extras) in needed:
            continue
        needed.add((canonicalize_name(name), extras))
        for text in metadata.requires(name) or []:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
                todo.append((dependency.name, frozenset(dependency.extras), dependency, name))
    assert {name for name, _ in needed} == set(locked), f"{lock.name} holds packages nothing needs"


def test_pip_freeze_lists_exactly_the_lock() -> None:
    # The lock is made for CPython 3.11 on Linux x86-64 (docs/reproducibility.md): elsewhere it is not the lock.
    assert (sys.version_info[:2], sys.platform, platform.machine()) == ((3, 11), "linux", "x86_64")
    locked = pins(LOCK)
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    for line in frozen.stdout.splitlines():
        match = PIN.match(line)
        assert match, f"installed not from the lock: {line}"
        name, version = canonicalize_name(match[1]), match[2]
        assert locked.get(name) == version, f"installed {name}=={version}, the lock pins {locked.get(name)}"
    for name, version in locked.items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, locked {version}"


def test_each_lock_is_what_its_input_resolves_to() -> None:
    assert_resolves(COMPUTE_LOCK, REPO / "requirements/compute.in")
    assert_resolves(LOCK, INPUT)


def test_the_computing_lock_is_part_of_the_whole_lock() -> None:
    compute, whole = pins(COMPUTE_LOCK), pins(LOCK)
    assert {name: whole.get(name) for name in compute} == compute


def bump(lock: Path, name: str) -> None:
    """Raise `name`'s pinned version in `lock` by one patch release."""
    text = lock.read_text()
    version = pins(lock)[name]
    head, _, patch = version.rpartition(".")
    assert f"\n{name}=={version} " in text
    lock.write_text(text.replace(f"\n{name}=={version} ", f"\n{name}=={head}.{int(patch) + 1} "))
