"""This workspace's MNIST as the benchmark reads it: the raw arrays, the split, and the tensors the network reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_pipeline.data import load_mnist
from mnist_pipeline.digits import deskew, to_tensor
from mnist_pipeline.reports import read_split

RAW = Path("data/raw")
SPLIT = Path("data/split")
Tensors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Workspace:
    """The raw images and labels (never deskewed), the split's indices, and `data`: the sets the network reads."""

    images: np.ndarray
    labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    data: Tensors


def split_tensors(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
                  train_idx: torch.Tensor, val_idx: torch.Tensor, deskewed: bool) -> Tensors:
    """The train, validation and test sets as the network reads them, as train_job.py and evaluate make them."""
    if deskewed:
        images, test_images = deskew(images), deskew(test_images)
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
            "test": (to_tensor(test_images), torch.from_numpy(test_labels.astype(np.int64)))}


def load_workspace(deskewed: bool) -> Workspace:
    """This workspace's data/raw and data/split (run `dvc repro` first), deskewed for the network if `deskewed`."""
    images, labels = load_mnist(RAW, "train")
    test_images, test_labels = load_mnist(RAW, "t10k")
    train_idx, val_idx = (torch.from_numpy(part) for part in read_split(SPLIT, len(labels)))
    data = split_tensors(images, labels, test_images, test_labels, train_idx, val_idx, deskewed)
    return Workspace(images, labels, test_images, test_labels, train_idx, val_idx, data)
