"""Training learns: a few dozen iterations of the real recipe on tiny images whose label is easy to see."""

from __future__ import annotations

import dataclasses
import os
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
from tests.conftest import REPO, shrunk_params, tiny_arrays


def tensors(arrays: dict[str, np.ndarray], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
    return to_tensor(images), torch.from_numpy(labels.astype(np.int64))


def test_a_few_dozen_iterations_learn_far_above_chance(tmp_path: Path) -> None:
    # The real params.yaml, shrunk: 448 training images in batches of 32, 3 epochs = 42 iterations.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shrunk_params(epochs=3, log_every=7)))
    params = load_params(tmp_path / "params.yaml")
    arrays = tiny_arrays(n_train=640, n_test=200)
    x, y = tensors(arrays, "train")
    test_x, test_y = tensors(arrays, "t10k")
    train_idx, val_idx = split_indices(len(y), params.split.val_fraction, params.seed)
    make_deterministic(params.seed, params.train.num_threads)
    model = Net()

    result = train(model, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), params.train, params.seed)

    assert [row.iteration for row in result.log] == [7, 14, 21, 28, 35, 42]
    assert result.log[-1].train_loss < 0.5 * result.log[0].train_loss
    # Ten classes: chance is 0.1.
    assert result.best_val_acc >= 0.9
    model.load_state_dict(result.best_state)
    assert float((predict(model, test_x).argmax(1) == test_y).double().mean()) >= 0.9


def test_deterministic_mode_fixes_the_cublas_workspace_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Deterministic cuBLAS (every nn.Linear on CUDA) raises unless this is set before its first call.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    make_deterministic(0, torch.get_num_threads())
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other documented value: a user's choice is kept
    make_deterministic(0, torch.get_num_threads())
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_is_l2_for_adam_and_decoupled_for_adamw(name: str) -> None:
    # With a zero loss gradient, AdamW only multiplies each weight by 1 - lr * weight_decay; Adam's L2 term becomes
    # a gradient that Adam normalizes into a step of about lr against the weight's sign.
    params = dataclasses.replace(load_params(REPO / "params.yaml").train, optimizer=name, lr=0.01, weight_decay=0.1)
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, params)
    (sum(p.sum() for p in model.parameters()) * 0.0).backward()
    optimizer.step()
    for old, new in zip(before, model.parameters()):
        if name == "adamw":
            torch.testing.assert_close(new.detach(), old * (1 - 0.01 * 0.1))
        else:
            l2 = 0.1 * old  # Adam's first step is lr * g / (|g| + eps), about lr * sign(g)
            torch.testing.assert_close(new.detach(), old - 0.01 * l2 / (l2.abs() + 1e-8))
