"""Typed, validated parameters from params.yaml: every key required, none unknown."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mnist_pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"


class ParamsError(PipelineError, ValueError):
    """A problem in params.yaml, naming the file and the key."""

    def __init__(self, path: str | Path, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path = str(path)
        self.key = key


class _Invalid(ValueError):
    """Raised by a section's check(); the loader adds the file and the section."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


@dataclass(frozen=True)
class DownloadParams:
    """How long one network request may wait."""

    timeout_s: float

    def check(self) -> None:
        _require(0 < self.timeout_s <= 3600, "timeout_s", f"must be in (0, 3600], got {self.timeout_s}")


@dataclass(frozen=True)
class SplitParams:
    """Which share of the 60,000 training images is held out for validation."""

    val_fraction: float

    def check(self) -> None:
        _require(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainParams:
    """The training recipe for the seed's CNN."""

    device: Literal["auto", "cpu", "cuda"]
    num_threads: int
    processes: int
    batch_size: int
    epochs: int
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["constant", "onecycle"]
    shift: int
    deskew: bool
    log_every: int

    def check(self) -> None:
        _require(1 <= self.num_threads <= 256, "num_threads", f"must be in [1, 256], got {self.num_threads}")
        _require(1 <= self.processes <= 1024, "processes", f"must be in [1, 1024], got {self.processes}")
        _require(1 <= self.batch_size <= 60000, "batch_size", f"must be in [1, 60000], got {self.batch_size}")
        _require(1 <= self.epochs <= 1000, "epochs", f"must be in [1, 1000], got {self.epochs}")
        _require(0 < self.lr <= 10, "lr", f"must be in (0, 10], got {self.lr}")
        _require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(0 <= self.weight_decay < 1, "weight_decay", f"must be in [0, 1), got {self.weight_decay}")
        _require(0 <= self.shift <= 4, "shift", f"must be in [0, 4] pixels, got {self.shift}")
        _require(self.log_every >= 1, "log_every", f"must be at least 1, got {self.log_every}")


@dataclass(frozen=True)
class EvaluateParams:
    """How many test images are scored at once."""

    batch_size: int

    def check(self) -> None:
        _require(1 <= self.batch_size <= 10000, "batch_size", f"must be in [1, 10000], got {self.batch_size}")


@dataclass(frozen=True)
class PlotParams:
    """How many images the figure grids show."""

    n_images: int
    n_misclassified: int

    def check(self) -> None:
        _require(1 <= self.n_images <= 100, "n_images", f"must be in [1, 100], got {self.n_images}")
        _require(
            1 <= self.n_misclassified <= 100, "n_misclassified", f"must be in [1, 100], got {self.n_misclassified}"
        )


@dataclass(frozen=True)
class MlflowParams:
    """Where runs and models are recorded in MLflow."""

    experiment: str
    registered_model: str

    def check(self) -> None:
        _require(self.experiment.strip() != "", "experiment", "must not be empty")
        _require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.registered_model) is not None,
            "registered_model",
            f"must be letters, digits, '.', '_' or '-', got {self.registered_model!r}",
        )


@dataclass(frozen=True)
class Params:
    """All of params.yaml: a shared seed and one section per stage, plus MLflow's."""

    seed: int
    download: DownloadParams
    split: SplitParams
    train: TrainParams
    evaluate: EvaluateParams
    plot: PlotParams
    mlflow: MlflowParams

    def check(self) -> None:
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; accept it as a float as YAML 1.2 (and DVC's -S) does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming the file and the key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ParamsError(path, "<file>", f"cannot be read: {err.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ParamsError(path, "<file>", f"is not valid YAML: {err}") from None
    return _build(Params, raw, path, "")


def flatten(params: Params) -> dict[str, Any]:
    """The params as dotted keys, the names `dvc exp run -S` and `dvc exp show` use."""
    flat: dict[str, Any] = {}
    for name, value in dataclasses.asdict(params).items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            flat[name] = value
    return flat


def _build(cls: type, raw: Any, path: str | Path, prefix: str) -> Any:
    section = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ParamsError(path, section, f"must be a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(names)}"
            raise ParamsError(path, f"{prefix}{key}", f"unknown key{hint}")
    values = {}
    for name in names:
        key = f"{prefix}{name}"
        if name not in raw:
            raise ParamsError(path, key, "missing key")
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], path, f"{key}.")
        else:
            values[name] = _convert(raw[name], kind, path, key)
    obj = cls(**values)
    try:
        obj.check()
    except _Invalid as err:
        raise ParamsError(path, f"{prefix}{err.key}", str(err)) from None
    return obj


def _convert(value: Any, kind: Any, path: str | Path, key: str) -> Any:
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ParamsError(path, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    # bool is a subclass of int: `epochs: true` must not pass as 1.
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    kind_name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
    raise ParamsError(path, key, f"must be {kind_name}, got {value!r} ({type(value).__name__})")
