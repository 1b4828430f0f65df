"""On a CUDA machine the same training code runs unchanged, deterministic; `train.device: auto` picks the GPU."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mnist_pipeline.digits import to_tensor
from mnist_pipeline.model import Net
from mnist_pipeline.params import load_params
from mnist_pipeline.training import make_deterministic, predict, select_device, train
from tests.conftest import REPO, project_env, tiny_arrays
from tests.test_faults import assert_refused, stage

# CUDA exists only on some machines; everywhere else this check has nothing to run on.
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_device_trains_on_the_gpu_like_on_the_cpu() -> None:
    params = load_params(REPO / "params.yaml")
    recipe = dataclasses.replace(params.train, epochs=3, batch_size=32, log_every=5)
    arrays = tiny_arrays()
    x = to_tensor(arrays["train-images-idx3-ubyte"])
    y = torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype("int64"))
    assert select_device("auto").type == "cuda"
    results = {}
    for device in ("cpu", "cuda"):
        make_deterministic(params.seed, recipe.num_threads)
        model = Net().to(device)
        result = train(model, (x[:200], y[:200]), (x[200:], y[200:]), recipe, params.seed)
        assert next(model.parameters()).device.type == device
        model.load_state_dict(result.best_state)
        results[device] = predict(model, x[200:]).cpu()
    # The same seeded batches on both devices; kernels differ, so the logits agree closely, not bit for bit.
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=1e-2, rtol=1e-2)


def test_deterministic_cublas_runs_in_a_fresh_process() -> None:
    # A fresh process, without CUBLAS_WORKSPACE_CONFIG: make_deterministic must set it before the first matmul,
    # or nn.Linear's cuBLAS call raises in deterministic mode. Twice the same bits, too.
    code = (
        "import torch\n"
        "from mnist_pipeline.training import make_deterministic\n"
        "make_deterministic(0, 1)\n"
        "layer = torch.nn.Linear(300, 140).cuda()\n"
        "x = torch.randn(256, 300, device='cuda', requires_grad=True)\n"
        "layer(x).square().sum().backward()\n"
        "print(x.grad.double().sum().item())\n"
    )
    env = project_env(PYTHONPATH=str(REPO))
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    outputs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
               for _ in range(2)]
    assert outputs[0] == outputs[1] != ""


def set_train_params(**values: object) -> None:
    """Change train params in the current folder's params.yaml."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train_twice(pipeline: Path) -> dict:
    """Run the train stage twice; check both runs wrote the same model bytes; return train.json's section."""
    models = []
    for _ in range(2):
        result = stage(pipeline, "train")
        assert result.returncode == 0, result.stderr
        models.append(Path("models/model.pt").read_bytes())
    assert models[0] == models[1]
    return json.loads(Path("reports/train.json").read_text())["train"]


@pytest.fixture
def cuda_pipeline(pipeline: Path) -> Path:
    """The tiny pipeline's copy, set to train on CUDA."""
    set_train_params(device="cuda")
    return pipeline


def test_train_stage_on_cuda_records_the_device_and_reruns_bit_for_bit(cuda_pipeline: Path) -> None:
    summary = train_twice(cuda_pipeline)
    assert (summary["device"], summary["world_size"], summary["backend"]) == ("cuda", 1, "none")


def test_more_processes_than_gpus_is_one_line_before_training(cuda_pipeline: Path) -> None:
    set_train_params(processes=torch.cuda.device_count() + 1)
    assert_refused(stage(cuda_pipeline, "train"), "params.yaml: train.processes:", "CUDA devices")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process: 2 GPUs")
def test_two_processes_on_two_gpus_train_with_nccl(cuda_pipeline: Path) -> None:
    set_train_params(processes=2)
    summary = train_twice(cuda_pipeline)
    assert (summary["device"], summary["world_size"], summary["backend"]) == ("cuda", 2, "nccl")
