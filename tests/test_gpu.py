"""On a CUDA machine the same training code runs unchanged; `train.device: auto` picks the GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_pipeline.model import Net
from mnist_pipeline.params import load_params
from mnist_pipeline.training import make_deterministic, predict, select_device, to_tensor, train
from tests.conftest import REPO, tiny_arrays

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
