"""Time to 99% test accuracy: the default recipe, the fast recipe of docs/parameters.md, and PyTorch's own MNIST
example.

Sections `default_recipe`, `fast_recipe` and `peer_recipe` of benchmarks/bench.py, and the peer's ratios to ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.workspace import Tensors, Workspace, split_tensors
from mnist_pipeline.digits import deskew
from mnist_pipeline.model import Net
from mnist_pipeline.params import Params
from mnist_pipeline.training import make_deterministic, predict, state_dict_bytes, train

# The fast recipe of docs/parameters.md: the overrides of its `dvc exp run -S` line, which a test checks
# against this. Chosen by time to 99.0% test accuracy among about 25 recipes tried on 2 cores (2-5 epochs, batch
# 64-512, peak lr 0.005-0.03, Adam or SGD, shifts of 0 or 1 pixel, deskewing or not). It names Adam without weight
# decay: the default AdamW's decay ends these 3 epochs (without deskewing) at 98.97%. Deskewed digits make 3 epochs
# enough whatever the seed: without deskewing they end at 99.04% with seed 42 and below 99.0% with seeds 1, 2 and 3;
# with it, at 99.03-99.14% (seeds 42, 1, 2, 3).
FAST_RECIPE = {"epochs": 3, "batch_size": 128, "lr": 0.01, "optimizer": "adam", "weight_decay": 0.0, "deskew": True}
FAST_BAR_S = 10.0  # the bar the fast recipe is held to: 99.0% within 10 s of training on 2 cores


def time_to_accuracy(data: Tensors, params: Params, target: float, probe_every: int) -> dict:
    """Train `params`' recipe, probing validation and test accuracy every `probe_every` iterations.

    The clock stops during the probes, and they change nothing in the training (this network has no
    dropout or batch norm, and the probes draw no random numbers), so the times are those of the
    recipe itself, at a finer grain than its reports every `log_every` iterations.
    """
    make_deterministic(params.seed, params.train.num_threads)
    model = Net()
    (val_x, val_y), (test_x, test_y) = data["val"], data["test"]
    marks: list[dict] = []
    start = time.perf_counter()
    paused = 0.0
    iteration = 0

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((predict(model, x).argmax(1) == y).double().mean())

    def on_step() -> None:
        nonlocal paused, iteration
        iteration += 1
        if iteration % probe_every:
            return
        began = time.perf_counter()
        marks.append({"iteration": iteration, "seconds": round(began - start - paused, 2),
                      "val_acc": accuracy(val_x, val_y), "test_acc": accuracy(test_x, test_y)})
        model.train()
        paused += time.perf_counter() - began

    result = train(model, data["train"], data["val"], params.train, params.seed, on_step=on_step)
    seconds = time.perf_counter() - start - paused
    model.load_state_dict(result.best_state)
    final = accuracy(test_x, test_y)
    weights = hashlib.sha256(state_dict_bytes(result.best_state)).hexdigest()

    def first(key: str) -> float | None:
        return next((m["seconds"] for m in marks if m[key] >= target), None)

    return {"train_seconds": round(seconds, 2), "probe_every": probe_every,
            "val_reaches_target_s": first("val_acc"), "test_reaches_target_s": first("test_acc"),
            "final_test_acc": final, "best_weights_sha256": weights, "marks": marks}


class PeerNet(torch.nn.Module):
    """PyTorch's own MNIST example network (pytorch/examples mnist/main.py): 1,199,882 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, 1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = torch.nn.Dropout(0.25)
        self.dropout2 = torch.nn.Dropout(0.5)
        self.fc1 = torch.nn.Linear(9216, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def peer_time_to_accuracy(data: Tensors, seed: int, threads: int, target: float, probe_every: int,
                          budget_s: float) -> dict:
    """PyTorch's example recipe (Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64, its 14 epochs) on our split.

    Its batches come from the same in-memory tensors as ours (no DataLoader), which only helps it. Test
    accuracy is probed every `probe_every` iterations with the clock stopped; it stops at `target` or
    after `budget_s` seconds of training, whichever comes first.
    """
    make_deterministic(seed, threads)
    model = PeerNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    (x, y), (test_x, test_y) = data["train"], data["test"]
    generator = torch.Generator().manual_seed(seed)
    seconds, iteration, reached, acc, below = 0.0, 0, None, 0.0, 0.0
    for _epoch in range(14):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            began = time.perf_counter()
            model.train()
            index = order[start : start + 64]
            loss = F.nll_loss(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - began
            iteration += 1
            if iteration % probe_every == 0:
                acc = float((predict(model, test_x).argmax(1) == test_y).double().mean())
                if acc >= target:
                    reached = round(seconds, 2)
                else:
                    below = seconds
            if reached is not None or seconds > budget_s:
                break
        if reached is not None or seconds > budget_s:
            break
        scheduler.step()
    # The time to the target lies between the last probe below it and the first at or above it.
    return {"test_reaches_target_s": reached, "last_probe_below_target_s": round(below, 2),
            "probe_every": probe_every, "train_seconds": round(seconds, 2), "iterations": iteration,
            "last_test_acc": acc, "budget_s": budget_s}


def fast_recipe_runs(workspace: Workspace, params: Params, runs: int, probe_every: int) -> dict:
    """The fast recipe's time to 99.0% test accuracy over `runs` runs: their spread, and how many were within the bar.

    The runs train the same bits (same seed, same threads), so only the clock differs between them: the
    spread is this machine's, not the recipe's luck. Deskewing the images, as the train and evaluate stages
    do before their work starts, is timed apart from training.
    """
    recipe = dataclasses.replace(params, train=dataclasses.replace(params.train, **FAST_RECIPE))
    images, test_images = workspace.images, workspace.test_images
    start = time.perf_counter()
    if recipe.train.deskew:
        images, test_images = deskew(images), deskew(test_images)
    deskew_s = time.perf_counter() - start
    data = split_tensors(images, workspace.labels, test_images, workspace.test_labels, workspace.train_idx,
                         workspace.val_idx, deskewed=False)  # done above
    results = [time_to_accuracy(data, recipe, 0.99, probe_every) for _ in range(runs)]
    times = [r["test_reaches_target_s"] for r in results]
    reached = sorted(t for t in times if t is not None)
    every = len(reached) == runs  # a median or range over only the runs that got there would flatter the recipe
    return {"overrides": FAST_RECIPE, "runs": runs, "probe_every": probe_every, "test_reaches_target_s": times,
            "deskew_70k_images_s": round(deskew_s, 2) if recipe.train.deskew else None,
            "runs_reaching_target": len(reached),
            "median_s": float(np.median(reached)) if every else None,
            "range_s": [reached[0], reached[-1]] if every else None,
            "bar_s": FAST_BAR_S, "runs_within_bar": sum(t <= FAST_BAR_S for t in reached),
            "train_seconds": [r["train_seconds"] for r in results],
            "final_test_acc": results[0]["final_test_acc"],
            "same_weights_every_run": len({r["best_weights_sha256"] for r in results}) == 1}


def peer_ratios(peer: dict, default: dict, fast: dict) -> dict:
    """The peer's time to 99.0% over each of ours (above 1: ours is faster).

    When the peer did not reach 99.0% within its budget, its training time stands in for its time to 99.0%,
    so the ratio is a lower bound, and says so.
    """
    reached = peer["test_reaches_target_s"] is not None
    peer_s = peer["test_reaches_target_s"] if reached else peer["train_seconds"]
    ours = {"default": default["test_reaches_target_s"], "fast": fast["median_s"]}
    return {"peer_reached": reached, **{name: round(peer_s / s, 2) if s else None for name, s in ours.items()}}
