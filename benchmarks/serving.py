"""Inference: scoring the test set, and `mlflow models serve` against the network's bare forward pass.

Sections `evaluate_10k_s` and `serving` of benchmarks/bench.py.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.record import REPO, record_seconds
from benchmarks.workspace import Tensors
from mnist_pipeline.digits import to_tensor
from mnist_pipeline.model import Net
from mnist_pipeline.params import Params
from mnist_pipeline.training import load_state_dict, predict
from tools.local_server import free_port, wait_until_ready


def evaluation_seconds(data: Tensors, params: Params) -> float:
    """Seconds to score the 10,000 test images, best of three."""
    model = Net()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        predict(model, data["test"][0], params.evaluate.batch_size)
        runs.append(time.perf_counter() - start)
    return round(min(runs), 3)


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """Calls a second (one after another), median and 99th-percentile latency in milliseconds."""
    return {"per_s": round(len(seconds) / sum(seconds), 1), "p50_ms": round(1000 * float(np.median(seconds)), 2),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 2)}


def serving_rates(images: np.ndarray, model_path: Path, threads: int, requests: int) -> dict:
    """`mlflow models serve` on single images and batches of 256, against the network's forward pass here.

    The record stage logs this workspace's model into a temporary store; the server runs it with the same
    thread count as the forward pass timed in this process, and one client sends requests one after another
    over one connection. Each row's ratio is the server's rate over the bare forward pass's at that batch size.
    """
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    payloads = {"single image (pixels)": (1, {"inputs": images[:1].tolist()}),
                "single image (PNG file)": (1, {"inputs": [base64.b64encode(png.getvalue()).decode()]}),
                "batch of 256 (pixels)": (256, {"inputs": images[:256].tolist()})}
    net = Net()
    load_state_dict(model_path, net)
    net.eval()
    torch.set_num_threads(threads)
    result = {}
    with tempfile.TemporaryDirectory() as root:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        record_seconds(REPO, Path(root), env)
        port = free_port()
        # `timeout` stops the server even if this process is killed first.
        server = subprocess.Popen(
            ["timeout", "1800", sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist-cnn@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "OMP_NUM_THREADS": str(threads)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            if not wait_until_ready(f"http://127.0.0.1:{port}/ping", server, 300):
                raise RuntimeError("mlflow models serve did not start")
            for name, (size, payload) in payloads.items():
                body = json.dumps(payload).encode()
                count = requests if size == 1 else max(10, requests // 10)
                # A connection per payload: the server drops one left idle while the forward pass is timed.
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                served = []
                for i in range(count + 3):  # three to warm up
                    start = time.perf_counter()
                    connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    answer = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"mlflow models serve answered {response.status}: {answer[:200]!r}")
                    if i >= 3:
                        served.append(time.perf_counter() - start)
                connection.close()
                x = to_tensor(images[:size])
                forward = []
                with torch.inference_mode():
                    for i in range(count + 3):
                        start = time.perf_counter()
                        net(x)
                        if i >= 3:
                            forward.append(time.perf_counter() - start)
                serve_stats, forward_stats = latency_stats(served), latency_stats(forward)
                result[name] = {"batch": size, "serve": serve_stats, "forward": forward_stats,
                                "ratio": round(serve_stats["per_s"] / forward_stats["per_s"], 4)}
        finally:
            server.terminate()
            server.wait(timeout=60)
    return result
