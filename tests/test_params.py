"""params.yaml: the real file loads; each kind of mistake is one error naming the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.params import ParamsError, flatten, load_params
from tests.conftest import REPO, committed_params, committed_params_text


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_real_file_loads_every_value_under_the_name_dvc_gives_it(tmp_path: Path) -> None:
    # The names `dvc exp run -S` and `dvc exp show` use, each with the file's value: none lost, renamed or added.
    raw = committed_params()
    expected = {key: value for key, value in raw.items() if not isinstance(value, dict)}
    expected |= {f"{section}.{key}": value for section, values in raw.items() if isinstance(values, dict)
                 for key, value in values.items()}
    path = tmp_path / "params.yaml"
    path.write_text(committed_params_text())
    assert flatten(load_params(path)) == expected


@pytest.mark.parametrize(
    ("edit", "key", "words"),
    [
        (lambda p: p["train"].update(lr="fast"), "train.lr", "must be a number, got 'fast'"),
        (lambda p: p["train"].update(lr=-0.1), "train.lr", "must be in (0, 10]"),
        (lambda p: p["train"].update(batch_size=0), "train.batch_size", "must be in [1, 60000]"),
        (lambda p: p["train"].update(epochs=2.5), "train.epochs", "must be an integer"),
        (lambda p: p["train"].update(epochs=True), "train.epochs", "must be an integer"),
        (lambda p: p["train"].update(optimizer="adagrad"), "train.optimizer", "must be one of 'adam', 'adamw', 'sgd'"),
        (lambda p: p["train"].update(deskew="yes"), "train.deskew", "must be true or false, got 'yes'"),
        (lambda p: p["train"].update(deskew=1), "train.deskew", "must be true or false, got 1"),
        (lambda p: p["split"].update(val_fraction=1.5), "split.val_fraction", "must be in (0, 1)"),
        (lambda p: p["split"].update(val_fraction=float("nan")), "split.val_fraction", "must be in (0, 1)"),
        (lambda p: p["train"].update(lrr=0.1), "train.lrr", "unknown key; did you mean 'lr'?"),
        (lambda p: p.update(colour="blue"), "colour", "unknown key"),
        (lambda p: p["train"].pop("shift"), "train.shift", "missing key"),
        (lambda p: p.pop("seed"), "seed", "missing key"),
        (lambda p: p.update(seed=-1), "seed", "must be in [0, 2**32)"),
        (lambda p: p.update(plot=[1, 2]), "plot", "must be a mapping"),
        (lambda p: p["mlflow"].update(registered_model="my model"), "mlflow.registered_model", "letters, digits"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path: Path, edit, key: str, words: str) -> None:
    params = committed_params()
    edit(params)
    path = write(tmp_path, params)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert words in str(info.value)
    assert info.value.key == key


def test_exponent_floats_as_dvc_writes_them(tmp_path: Path) -> None:
    # `dvc exp run -S train.lr=1e-3` may leave `lr: 1e-3`, which plain YAML 1.1 reads as a string.
    text = re.sub(r"\n  lr: [0-9.]+", "\n  lr: 1e-3", committed_params_text())
    assert "lr: 1e-3" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path).train.lr == 0.001


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"missing\.yaml: <file>: cannot be read"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="is not valid YAML"):
        load_params(broken)


def test_docs_seed_recipe_sets_every_way_the_default_differs_from_the_notebook(tmp_path: Path) -> None:
    # The notebook trains with Adam at 0.001, batch 16, 3 epochs, no schedule, no augmentation, no weight decay;
    # a new default (say, another optimizer) must show up in the docs' line too, or the line stops being the seed.
    page = (REPO / "docs" / "parameters.md").read_text()
    block = page.split("The reference notebook's recipe is one params change away:", 1)[1].split("```")[1]
    overrides = dict(re.findall(r"-S train\.(\w+)=(\S+)", block))
    raw = committed_params()
    raw["train"].update({key: yaml.safe_load(value) for key, value in overrides.items()})  # as `dvc exp run -S` parses
    train = load_params(write(tmp_path, raw)).train
    assert (train.batch_size, train.epochs, train.lr, train.optimizer) == (16, 3, 0.001, "adam")
    assert (train.weight_decay, train.schedule, train.shift, train.deskew) == (0.0, "constant", 0, False)
