"""Training learns: a few dozen iterations of the real recipe on tiny images whose label is easy to see."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mnist_pipeline.digits import to_tensor
from mnist_pipeline.model import Net
from mnist_pipeline.params import load_params
from mnist_pipeline.training import make_deterministic, make_optimizer, predict, train
from stages.split import split_indices
from tests.conftest import shrunk_params, tiny_arrays


def tensors(arrays: dict[str, np.ndarray], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
    return to_tensor(images), torch.from_numpy(labels.astype(np.int64))


@pytest.fixture
def torch_state() -> Iterator[None]:
    """Leave torch's global settings as this test found them: make_deterministic changes them for the process."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_a_few_dozen_iterations_learn_far_above_chance(tmp_path: Path, torch_state: None) -> None:
    # The real params.yaml, shrunk: 448 training images in batches of 32, 3 epochs = 42 iterations.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shrunk_params(epochs=3, log_every=7)))
    params = load_params(tmp_path / "params.yaml")
    arrays = tiny_arrays(n_train=640, n_test=200)
    x, y = tensors(arrays, "train")
    test_x, test_y = tensors(arrays, "t10k")
    train_idx, val_idx = split_indices(len(y), params.split.val_fraction, params.seed)
    torch.use_deterministic_algorithms(False)  # as a stage's process starts (torch_state restores it)
    make_deterministic(params.seed, params.train.num_threads)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    model = Net()

    result = train(model, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), params.train, params.seed)

    assert [row.iteration for row in result.log] == [7, 14, 21, 28, 35, 42]
    assert result.log[-1].train_loss < 0.5 * result.log[0].train_loss
    # Ten classes: chance is 0.1.
    assert result.best_val_acc >= 0.9
    model.load_state_dict(result.best_state)
    assert float((predict(model, test_x).argmax(1) == test_y).double().mean()) >= 0.9


@pytest.mark.parametrize(("name", "expected"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                              ("sgd", torch.optim.SGD)])
def test_the_optimizer_is_the_one_params_name_with_their_settings(tmp_path: Path, name: str, expected: type) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shrunk_params(optimizer=name, lr=0.01, weight_decay=0.1,
                                                                       momentum=0.8)))
    model = Net()
    optimizer = make_optimizer(model, load_params(tmp_path / "params.yaml").train)
    assert type(optimizer) is expected
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.1)
    if name == "sgd":  # Nesterov momentum; a momentum of 0 is plain SGD, which PyTorch refuses to call Nesterov
        assert (group["momentum"], group["nesterov"]) == (0.8, True)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(shrunk_params(optimizer=name, momentum=0.0)))
        (plain,) = make_optimizer(model, load_params(tmp_path / "params.yaml").train).param_groups
        assert (plain["momentum"], plain["nesterov"]) == (0.0, False)
