"""A sweep's search space (sweep.yaml): params by their DVC names, each a range or a list, beside fixed params; every
bound and choice checked by params.yaml's own rules before any training."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params import PARAMS_FILE, Params, _Loader, _params_error, flatten
from mnist_pipeline.reports import train_split_size

SPACE_FILE = "sweep.yaml"
SECTIONS = ("fixed", "search", "first", "pruner")
# Bookkeeping, not hyper-parameters: where the runs go is the study's, not a trial's.
NOT_SEARCHED = ("mlflow.",)
# Threads change the result's bytes (docs/reproducibility.md): one value for the whole study, never a searched one.
FIXED_ONLY = ("train.num_threads", "train.processes", "train.device")
PRUNERS = ("median", "threshold", "none")


class SpaceError(PipelineError):
    """A search space that cannot run, naming the file and the key."""


@dataclass(frozen=True)
class Dimension:
    """One searched param: a range (low, high; log-uniform when log) or a list of choices."""

    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"choices": list(self.choices)} if self.choices else {"low": self.low, "high": self.high,
                                                                      "log": self.log}


@dataclass(frozen=True)
class Pruner:
    """How losing trials are stopped: the median rule (after `startup_trials` trials), a fixed floor, or never."""

    kind: str = "median"
    startup_trials: int = 2
    warmup_iterations: int = 0
    lower: float = 0.0  # threshold: a report of val_acc below this stops the trial


@dataclass(frozen=True)
class Space:
    fixed: dict[str, Any]
    search: dict[str, Dimension]
    first: tuple[dict[str, Any], ...] = ()
    pruner: Pruner = field(default_factory=Pruner)

    def fingerprint(self) -> str:
        """What a study is bound to: the fixed params and the searched ones with their ranges (not `first` or the
        pruner, which only steer it). A study name reused with another space is refused by this."""
        return json.dumps({"fixed": self.fixed, "search": {k: v.describe() for k, v in self.search.items()}},
                          sort_keys=True)


def _check_value(path: Path, raw_params: dict, key: str, value: Any, where: str) -> None:
    """Refuse a value params.yaml would refuse for `key`, in params.py's words, naming the space file's entry."""
    section, _, name = key.rpartition(".")
    changed = json.loads(json.dumps(raw_params))
    (changed[section] if section else changed)[name] = value
    try:
        TypeAdapter(Params).validate_python(changed)
    except ValidationError as err:
        message = str(_params_error(PARAMS_FILE, err.errors()[0])).split(": ", 2)[-1]
        raise SpaceError(f"{path}: {where}: {value!r} is not a valid {key}: {message}") from None


def load_space(path: Path, params_path: Path = Path(PARAMS_FILE), split: Path | None = None) -> Space:
    """Read and check a space file; SpaceError in one line for an unknown param, an empty or inverted range, a log
    range that reaches 0, an empty list, or any value params.yaml refuses (a batch larger than the split too)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except OSError as err:
        raise SpaceError(f"{path}: cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("search"), dict) or not raw["search"]:
        raise SpaceError(f"{path}: needs a `search:` mapping of at least one param to its range or list")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SpaceError(f"{path}: unknown section {unknown[0]!r}; expected {', '.join(SECTIONS)}")
    raw_params = yaml.load(params_path.read_text(encoding="utf-8"), Loader=_Loader)
    known = flatten(TypeAdapter(Params).validate_python(raw_params))
    fixed = dict(raw.get("fixed") or {})
    search: dict[str, Dimension] = {}
    for key in [*fixed, *raw["search"]]:
        if key not in known:
            raise SpaceError(f"{path}: {key}: not a param of {params_path} (use the names of `dvc exp show`)")
        if key.startswith(NOT_SEARCHED):
            raise SpaceError(f"{path}: {key}: the MLflow section is the study's bookkeeping, not a hyper-parameter")
    for key, value in fixed.items():
        if key in raw["search"]:
            raise SpaceError(f"{path}: {key}: both fixed and searched; keep one")
        _check_value(path, raw_params, key, value, f"fixed.{key}")
    size = train_split_size(split) if split is not None else None
    for key, spec in raw["search"].items():
        where = f"search.{key}"
        if key in FIXED_ONLY:
            raise SpaceError(f"{path}: {where}: changes the result's bytes or where it runs; set it under fixed:, "
                             "one value for the whole study")
        if not isinstance(spec, dict):
            raise SpaceError(f"{path}: {where}: must be {{low: ..., high: ...[, log: true]}} or {{choices: [...]}}")
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
                raise SpaceError(f"{path}: {where}: choices must be a non-empty list, alone")
            values = choices
            dimension = Dimension(choices=tuple(choices))
        else:
            if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
                raise SpaceError(f"{path}: {where}: a range needs low and high (and optionally log: true)")
            low, high, log = spec["low"], spec["high"], spec.get("log", False)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise SpaceError(f"{path}: {where}: low and high must be numbers, got {low!r} and {high!r}")
            if not low < high:
                raise SpaceError(f"{path}: {where}: empty or inverted range: low {low} must be below high {high}")
            if log is not False and log is not True:
                raise SpaceError(f"{path}: {where}: log must be true or false, got {log!r}")
            if log and low <= 0:
                raise SpaceError(f"{path}: {where}: a log range must start above 0, got low {low}")
            if isinstance(known[key], int) and not (isinstance(low, int) and isinstance(high, int)):
                raise SpaceError(f"{path}: {where}: {key} is an integer: give integer bounds")
            values = [low, high]
            dimension = Dimension(low=low, high=high, log=log)
        for value in values:
            _check_value(path, raw_params, key, value, where)
            if key == "train.batch_size" and size is not None and value > size:
                raise SpaceError(f"{path}: {where}: batch size {value} is larger than the {size:,} training images "
                                 f"in {split}")
        search[key] = dimension
    first = tuple(raw.get("first") or ())
    for number, point in enumerate(first):
        if not isinstance(point, dict) or set(point) - set(search):
            raise SpaceError(f"{path}: first[{number}]: must map searched params to values")
        for key, value in point.items():
            dim = search[key]
            inside = value in dim.choices if dim.choices else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and dim.low <= value <= dim.high)
            if not inside:
                raise SpaceError(f"{path}: first[{number}].{key}: {value!r} is outside its search "
                                 f"{dim.describe()}")
    pruner_spec = dict(raw.get("pruner") or {})
    try:
        pruner = Pruner(**pruner_spec)
    except TypeError:
        raise SpaceError(f"{path}: pruner: expected kind, startup_trials, warmup_iterations, lower") from None
    if pruner.kind not in PRUNERS:
        raise SpaceError(f"{path}: pruner.kind: must be one of {', '.join(PRUNERS)}, got {pruner.kind!r}")
    return Space(fixed, search, first, pruner)
