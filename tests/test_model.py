"""The network is the seed's: the same layers, output shapes and parameter counts as its summary table."""

from __future__ import annotations

import torch
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
    assert layer_table(Net(), 16) == SEED_TABLE


def test_parameter_count() -> None:
    model = Net()
    assert sum(p.numel() for p in model.parameters()) == 57_790
