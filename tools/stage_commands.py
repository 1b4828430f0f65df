"""The stage commands dvc.yaml declares, for tools that run a stage by hand (tests, the benchmark)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml


def stage_commands(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """Each stage's arguments, in pipeline order, from dvc.yaml's `python -m stages.<name> ...` commands."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text())
    values = {
        f"{group}.{key}": value
        for entry in spec.get("vars", []) if isinstance(entry, dict)
        for group, section in entry.items() for key, value in section.items()
    }
    commands = {}
    for name, stage in spec["stages"].items():
        words = re.sub(r"\$\{([\w.]+)\}", lambda m: str(values[m[1]]), stage["cmd"]).split()
        if words[:3] != ["python", "-m", f"stages.{name}"]:
            raise ValueError(f"{dvc_yaml}: stage {name}: expected `python -m stages.{name} ...`, got {stage['cmd']!r}")
        commands[name] = words[3:]
    return commands
