"""The network is the seed's: the same layers, output shapes and parameter counts as its summary table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline.model import Net

# The seed notebook's torchsummary table for a batch of 16: (layer, output shape, parameters).
SEED_TABLE = [
    ("Conv2d-1", [16, 6, 26, 26], 60),
    ("Conv2d-2", [16, 12, 11, 11], 660),
    ("Linear-3", [16, 140], 42_140),
    ("Linear-4", [16, 80], 11_280),
    ("Linear-5", [16, 40], 3_240),
    ("Linear-6", [16, 10], 410),
]


def layer_table(model: nn.Module, batch: int) -> list[tuple[str, list[int], int]]:
    """The rows torchsummary prints: each Conv2d/Linear call, numbered in call order."""
    rows: list[tuple[str, list[int], int]] = []

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        count = sum(p.numel() for p in module.parameters())
        rows.append((f"{type(module).__name__}-{len(rows) + 1}", list(output.shape), count))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(torch.zeros(batch, 1, 28, 28))
    for handle in handles:
        handle.remove()
    return rows


def test_layer_table_matches_the_seed() -> None:
    model = Net()
    assert layer_table(model, 16) == SEED_TABLE
    # No parameters outside the table's layers (57,790 in all, as the seed's summary says).
    assert sum(p.numel() for p in model.parameters()) == sum(count for *_, count in SEED_TABLE)


def seed_forward(model: Net, x: torch.Tensor) -> torch.Tensor:
    """The seed notebook's forward pass, written as it was: relu, then pool."""
    x = F.max_pool2d(F.relu(model.conv1(x)), 2)
    x = F.max_pool2d(F.relu(model.conv2(x)), 2)
    x = torch.flatten(x, 1)
    x = F.relu(model.fc1(x))
    x = F.relu(model.fc2(x))
    x = F.relu(model.fc3(x))
    return model.fc4(x)


def test_forward_and_gradients_are_the_seeds_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    results = []
    for forward in (model, lambda batch: seed_forward(model, batch)):
        model.zero_grad()
        logits = forward(x)
        F.cross_entropy(logits, y).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (ours, our_grads), (seeds, seed_grads) = results
    assert torch.equal(ours, seeds)
    assert all(torch.equal(a, b) for a, b in zip(our_grads, seed_grads))
