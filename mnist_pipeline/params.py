"""Typed, validated parameters from params.yaml: every key required, none unknown."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from mnist_pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"

# Pydantic dataclasses rather than BaseModel: callers and tests derive recipes with dataclasses.replace (which
# validates again) and flatten() uses dataclasses.asdict. Strict types: YAML's `true` must not pass as 1, nor
# "0.1" as a number; an integer still passes as a float.
_section = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


class ParamsError(PipelineError, ValueError):
    """A problem in params.yaml, naming the file and the key."""

    def __init__(self, path: str | Path, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path = str(path)
        self.key = key


# A figure's grid: a square of up to 10 x 10 images.
GridSize = Annotated[StrictInt, Field(ge=1, le=100)]


@_section
class DownloadParams:
    """How long one network request may wait."""

    timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)]


@_section
class SplitParams:
    """Which share of the 60,000 training images is held out for validation."""

    val_fraction: Annotated[StrictFloat, Field(gt=0, lt=1)]


@_section
class TrainParams:
    """The training recipe for the seed's CNN."""

    device: Literal["auto", "cpu", "cuda"]
    num_threads: Annotated[StrictInt, Field(ge=1, le=256)]
    processes: Annotated[StrictInt, Field(ge=1, le=1024)]
    batch_size: Annotated[StrictInt, Field(ge=1, le=60000)]
    epochs: Annotated[StrictInt, Field(ge=1, le=1000)]
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: Annotated[StrictFloat, Field(gt=0, le=10)]
    momentum: Annotated[StrictFloat, Field(ge=0, lt=1)]
    weight_decay: Annotated[StrictFloat, Field(ge=0, lt=1)]
    schedule: Literal["constant", "onecycle"]
    shift: Annotated[StrictInt, Field(ge=0, le=4)]  # pixels
    deskew: StrictBool
    log_every: Annotated[StrictInt, Field(ge=1)]


@_section
class EvaluateParams:
    """How many test images are scored at once."""

    batch_size: Annotated[StrictInt, Field(ge=1, le=10000)]


@_section
class PlotParams:
    """How many images the figure grids show."""

    n_images: GridSize
    n_misclassified: GridSize


@_section
class MlflowParams:
    """Where runs and models are recorded in MLflow."""

    # A pattern's description is the error message when it does not match.
    experiment: Annotated[StrictStr, Field(pattern=r"\S", description="must not be empty")]
    registered_model: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                                 description="must be letters, digits, '.', '_' or '-'")]


@_section
class Params:
    """All of params.yaml: a shared seed and one section per stage, plus MLflow's."""

    seed: Annotated[StrictInt, Field(ge=0, lt=2**32)]
    download: DownloadParams
    split: SplitParams
    train: TrainParams
    evaluate: EvaluateParams
    plot: PlotParams
    mlflow: MlflowParams


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
    try:
        return TypeAdapter(Params).validate_python(raw)
    except ValidationError as err:
        # A misspelt key is also a missing one; naming the unknown spelling (with its hint) says what to fix.
        first = min(err.errors(), key=lambda error: error["type"] not in _UNKNOWN)
        raise _params_error(path, first) from None


def flatten(params: Params) -> dict[str, Any]:
    """The params as dotted keys, the names `dvc exp run -S` and `dvc exp show` use."""
    flat: dict[str, Any] = {}
    for name, value in dataclasses.asdict(params).items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            flat[name] = value
    return flat


_UNKNOWN = ("unexpected_keyword_argument", "invalid_key")
_KINDS = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true or false"}
_RANGES = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _params_error(path: str | Path, error: ErrorDetails) -> ParamsError:
    """One of pydantic's errors in the words of the rest of the pipeline: file, dotted key, what to change."""
    loc = [str(part) for part in error["loc"]]
    section = Params
    for part in loc[:-1]:
        section = section.__pydantic_fields__[part].annotation
    fields = section.__pydantic_fields__
    field = fields.get(loc[-1]) if loc else None
    value = error["input"]
    match error["type"]:
        case kind if kind in _UNKNOWN:
            close = difflib.get_close_matches(loc[-1], list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(fields)}"
            message = f"unknown key; {hint}"
        case "missing":
            message = "missing key"
        case "dataclass_type":
            message = f"must be a mapping of keys to values, got {type(value).__name__}"
        case kind if kind in _KINDS:
            message = f"must be {_KINDS[kind]}, got {value!r} ({type(value).__name__})"
        case "literal_error":
            message = f"must be one of {', '.join(map(repr, typing.get_args(field.annotation)))}, got {value!r}"
        case "string_pattern_mismatch":
            message = f"{field.description}, got {value!r}"
        case kind if kind in _RANGES:
            message = f"{_range(field.metadata)}, got {value}"
        case _:
            message = error["msg"]
    return ParamsError(path, ".".join(loc) or "<top level>", message)


def _range(metadata: list[Any]) -> str:
    """A field's bounds as an interval, e.g. "must be in (0, 10]"; every range here has a lower bound."""
    bounds = {name: _show(getattr(item, name)) for item in metadata for name in ("gt", "ge", "lt", "le")
              if hasattr(item, name)}
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds['ge']}"
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds['le']}]" if "le" in bounds else None
    return f"must be in {low}, {high}" if high else f"must be at least {low[1:]}"


def _show(bound: float) -> str:
    return "2**32" if bound == 2**32 else str(bound)  # the seed's limit: 4294967296 says less
