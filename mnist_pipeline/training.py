"""The seed's training loop, made fast and reproducible: in-memory tensors, seeded batches, best model by validation."""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# The normalization is the served model's input contract, so it lives with the served model's preprocessing.
from mnist_pipeline.digits import PIXEL_MEAN, PIXEL_STD
from mnist_pipeline.errors import PipelineError, text_lines
from mnist_pipeline.params import TrainParams
from mnist_pipeline.reports import LogRow

BACKGROUND = -PIXEL_MEAN / PIXEL_STD  # a black pixel after normalization
EVAL_BATCH = 500  # measured: small batches stay in cache; 2,000 was twice as slow on 2 cores
NOT_LEARNED = 0.2  # a best validation accuracy below this is a model that learned nothing (check_learned)


@dataclass(frozen=True)
class TrainResult:
    """The best weights by validation accuracy, where they were reached, and every report."""

    best_state: dict[str, torch.Tensor]
    best_val_acc: float
    best_iteration: int
    log: list[LogRow]


def select_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml: train.device: 'cuda' asked for, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def deterministic_kernels() -> None:
    """Deterministic kernels only (an error where an op has none): torch.use_deterministic_algorithms(True), minus its
    import of the compiler (torch._inductor) to set the compiler's own flag, about 2 s of evaluate's start (train
    imports it anyway, through the optimizer). The pipeline never compiles; torch is pinned in the lock, so the
    private switch it calls stays where it is."""
    torch._C._set_deterministic_algorithms(True)


def make_deterministic(seed: int, num_threads: int) -> None:
    """Fix every source of run-to-run variation: the seed, the thread count, the kernels."""
    # Deterministic cuBLAS needs a fixed workspace, set before its first call: without it, every nn.Linear on CUDA
    # raises a RuntimeError in deterministic mode (PyTorch's reproducibility notes). CPU runs ignore it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    deterministic_kernels()
    torch.backends.cudnn.benchmark = False


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset of up to `max_shift` pixels, filling with background."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=BACKGROUND)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).to(x.device)
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits for all of `x`, computed in batches on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


def share(n: int, world_size: int, rank: int) -> slice:
    """This process's contiguous part of n items split over the world: sizes differ by at most one, no padding."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def share_loss(logits: torch.Tensor, labels: torch.Tensor, batch_n: int, world_size: int) -> torch.Tensor:
    """This process's part of the global batch's mean cross-entropy, weighted for DDP's average of gradients.

    DDP averages gradients over processes; weighting the mean over a share of k of the batch's n samples by
    k * world_size / n makes that average the gradient of the global batch's mean, even when shares differ in
    size (the last batch). With one process the weight is exactly 1.0.
    """
    if len(labels) == 0:  # a last batch smaller than the world: this process adds a zero gradient
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels) * (len(labels) * world_size / batch_n)


def count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, world_size: int, rank: int) -> int:
    """Correct predictions on (x, y): each process scores its share, the counts are summed (exact integers)."""
    part = share(len(y), world_size, rank)
    logits = predict(model, x[part])
    correct = (logits.argmax(1) == y[part].to(logits.device)).sum()  # on the device: NCCL reduces GPU tensors
    if world_size > 1:
        dist.all_reduce(correct)
    return int(correct)


def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with Nesterov momentum, as params.yaml says.

    Adam adds weight_decay * w to the gradient (L2); AdamW first multiplies the weights by 1 - lr * weight_decay
    (lr: the scheduled rate of the step), apart from the gradient (decoupled). The default is AdamW with 0.1: see
    docs/performance.md for what was measured.
    """
    # Fused kernels update all parameters in one call: measurably faster for this many small tensors.
    if params.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if params.optimizer == "adam" else torch.optim.AdamW
        return adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True)
    return torch.optim.SGD(
        model.parameters(), lr=params.lr, momentum=params.momentum,
        nesterov=params.momentum > 0, weight_decay=params.weight_decay, fused=True,
    )


def train(
    model: nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor],
    val_data: tuple[torch.Tensor, torch.Tensor],
    params: TrainParams,
    seed: int,
    on_log: Callable[[LogRow, bool], None] = lambda row, improved: None,
    on_step: Callable[[], None] = lambda: None,
) -> TrainResult:
    """Train, reporting every `log_every` iterations and at the end; keep the best model by validation accuracy.

    Under torch.distributed (torchrun), every process draws the same global batches (same order, same shifts)
    and trains on its share through DDP, so the steps and the schedule do not depend on the number of processes;
    the reports are summed over processes, and every process ends with the same weights.
    """
    device = next(model.parameters()).device
    # channels_last lets oneDNN skip layout conversions in the convolutions (about 20% faster on CPU).
    model.to(memory_format=torch.channels_last)
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    # DDP wraps the model after its layout change: its gradient buckets take the parameters' strides.
    net = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    x, y = train_data[0].to(device), train_data[1].to(device)
    val_x, val_y = val_data
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / params.batch_size)
    total_steps = params.epochs * steps_per_epoch
    optimizer = make_optimizer(model, params)
    scheduler = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=params.lr, total_steps=total_steps)
        if params.schedule == "onecycle" else None
    )
    best_state, best_acc, best_iteration, log = None, -1.0, 0, []
    window_loss = torch.zeros((), device=device)
    window_correct = torch.zeros((), dtype=torch.long, device=device)
    window_n, iteration = 0, 0
    for epoch in range(params.epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        model.train()
        for start in range(0, len(x), params.batch_size):
            index = order[start : start + params.batch_size]
            xb, yb = x[index], y[index]
            if params.shift:
                xb = random_shift(xb, params.shift, generator)
            part = share(len(index), world_size, rank)
            xb, yb = xb[part], yb[part]
            logits = net(xb.contiguous(memory_format=torch.channels_last))
            loss = share_loss(logits, yb, len(index), world_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            iteration += 1
            on_step()
            # Accumulate on the device: no host sync per iteration.
            window_loss += loss.detach() * (len(index) / world_size)  # this process's sum of losses
            window_correct += (logits.argmax(1) == yb).sum()
            window_n += len(index)
            if iteration % params.log_every and iteration != total_steps:
                continue
            if world_size > 1:
                dist.all_reduce(window_loss)
                dist.all_reduce(window_correct)
            val_acc = count_correct(model, val_x, val_y, world_size, rank) / len(val_y)
            row = LogRow(iteration, epoch, float(window_correct) / window_n, float(window_loss) / window_n, val_acc)
            log.append(row)
            improved = val_acc > best_acc
            if improved:
                best_acc, best_iteration = val_acc, iteration
                best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
            on_log(row, improved)
            window_loss.zero_()
            window_correct.zero_()
            window_n = 0
            model.train()
    return TrainResult(best_state, best_acc, best_iteration, log)


def check_learned(result: TrainResult, params: TrainParams) -> None:
    """Refuse a model that learned nothing, before it is written, recorded or crowned.

    A loss that is not finite, or a best validation accuracy under NOT_LEARNED: a network answering one digit
    for everything scores the share of that digit, at most 11.4% on MNIST (the 1s), and guessing scores 10%;
    every recipe tried that learned passed 90% at its first report. 20% leaves room for tiny data sets, and
    no model that learned comes near it.
    """
    recipe = (f"look at train.lr ({params.lr}), train.optimizer ({params.optimizer}), train.batch_size "
              f"({params.batch_size}) and train.weight_decay ({params.weight_decay})")
    broken = next((row for row in result.log if not math.isfinite(row.train_loss)), None)
    if broken is not None:
        raise PipelineError(f"the training diverged: train loss {broken.train_loss} at iteration "
                            f"{broken.iteration}; nothing is written; {recipe}")
    if result.best_val_acc < NOT_LEARNED:
        last = result.log[-1]
        raise PipelineError(f"the model did not learn: best validation accuracy "
                            f"{100 * result.best_val_acc:.2f}% (one digit for everything scores about 11%), train "
                            f"loss {last.train_loss:.4g} at iteration {last.iteration}; nothing is written; {recipe}")


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialize weights to bytes: saving to memory keeps temporary file names out of the archive."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_state_dict(path: str, model: nn.Module) -> None:
    """Load weights with weights_only=True: tensors only, never arbitrary pickled objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        # torch's message spans many lines and suggests weights_only=False; keep the line that says why.
        lines = text_lines(str(err)) or [type(err).__name__]
        why = next((line for line in lines if line.startswith("Unsupported")), lines[0])
        raise PipelineError(f"{path}: not a model weights file, refused without loading it ({why})") from None
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise PipelineError(f"{path}: weights do not fit the seed's network: {' '.join(str(err).split())}") from None
