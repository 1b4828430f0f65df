"""The seed notebook's CNN: two 3x3 convolutions with max-pooling, then four linear layers (57,790 parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Conv(1->6) -> pool -> Conv(6->12) -> pool -> 300 -> 140 -> 80 -> 40 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=3)
        self.conv2 = nn.Conv2d(6, 12, kernel_size=3)
        self.fc1 = nn.Linear(12 * 5 * 5, 140)
        self.fc2 = nn.Linear(140, 80)
        self.fc3 = nn.Linear(80, 40)
        self.fc4 = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The seed's relu-then-pool, computed as pool-then-relu: the same numbers (relu is monotonic), with relu
        # and its gradient on a quarter of the values, about 10% faster training on CPU.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # 26x26 -> 13x13
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # 11x11 -> 5x5
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return self.fc4(x)
