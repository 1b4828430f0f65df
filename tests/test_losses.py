"""The hand-written losses against references: PyTorch's cross-entropy and multi-margin loss, and a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnist_pipeline.losses import manual_cross_entropy, multiclass_svm_loss


@pytest.mark.parametrize("scale", [0.1, 1.0, 50.0])
def test_cross_entropy_matches_pytorch(scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator) * scale
    labels = torch.randint(0, 10, (500,), generator=generator)
    reference = F.cross_entropy(logits.double(), labels).item()
    assert manual_cross_entropy(logits, labels) == pytest.approx(reference, abs=1e-10)


def test_cross_entropy_is_stable_for_huge_logits() -> None:
    logits = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]])
    assert manual_cross_entropy(logits, torch.tensor([0, 0])) == pytest.approx(500.0)


def test_svm_loss_matches_multi_margin_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 10, generator=generator)
    labels = torch.randint(0, 10, (300,), generator=generator)
    # PyTorch's multi-margin loss divides the same hinge sum by the number of classes.
    reference = F.multi_margin_loss(logits.double(), labels).item() * 10
    assert multiclass_svm_loss(logits, labels) == pytest.approx(reference, abs=1e-10)


def test_svm_loss_by_hand() -> None:
    logits = torch.tensor([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    labels = torch.tensor([0, 1, 2])
    # The CS231n example: per-sample losses 2.9, 0 and 12.9.
    assert multiclass_svm_loss(logits, labels) == pytest.approx((2.9 + 0 + 12.9) / 3)
