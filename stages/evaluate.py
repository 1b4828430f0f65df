"""DVC stage evaluate: score the best model on the 10,000 test images; write metrics and per-image predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mnist_pipeline.data import NUM_CLASSES, load_mnist
from mnist_pipeline.digits import deskew, to_tensor
from mnist_pipeline.errors import run_stage
from mnist_pipeline.losses import manual_cross_entropy, multiclass_svm_loss
from mnist_pipeline.model import Net
from mnist_pipeline.params import load_params
from mnist_pipeline.reports import write_metrics, write_predictions
from mnist_pipeline.training import deterministic_kernels, load_state_dict, predict
from stages import say_kernel_notes

CE_TOLERANCE = 1e-5


def test_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """Accuracy, PyTorch's and the hand-written cross-entropy (which must agree), SVM loss, per-class accuracy."""
    loss = float(F.cross_entropy(logits, labels))
    manual = manual_cross_entropy(logits, labels)
    if abs(manual - loss) > CE_TOLERANCE:
        raise RuntimeError(
            f"hand-written cross-entropy {manual} differs from PyTorch's {loss} by more than {CE_TOLERANCE}"
        )
    correct = logits.argmax(1) == labels
    per_class = {str(c): round(float(correct[labels == c].double().mean()), 6) for c in range(NUM_CLASSES)}
    return {
        "accuracy": round(float(correct.double().mean()), 6),
        "loss": round(loss, 6),
        "cross_entropy_manual": round(manual, 6),
        "svm_loss": round(multiclass_svm_loss(logits, labels), 6),
        "per_class_accuracy": per_class,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("model", type=Path, help="the best model's weights")
    parser.add_argument("metrics", type=Path, help="JSON of the test metrics")
    parser.add_argument("predictions", type=Path, help="CSV of each test image's label and prediction")
    args = parser.parse_args()
    params = load_params()
    say_kernel_notes("evaluate")
    torch.set_num_threads(params.train.num_threads)
    deterministic_kernels()
    images, labels = load_mnist(args.raw, "t10k")
    model = Net()
    load_state_dict(args.model, model)
    logits = predict(model, to_tensor(deskew(images) if params.train.deskew else images), params.evaluate.batch_size)
    metrics = test_metrics(logits, torch.from_numpy(labels.astype(np.int64)))
    write_metrics(args.metrics, metrics)
    write_predictions(args.predictions, labels, logits.argmax(1).numpy())
    print(f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
          f"hand-written cross-entropy {metrics['cross_entropy_manual']:.6f}, SVM loss {metrics['svm_loss']:.4f}")


if __name__ == "__main__":
    run_stage(main)
