"""Data-parallel training with the real torchrun and Gloo: shares, one result, faults, two "machines" on 127.0.0.1.

The runs on the tiny data call the train stage as DVC does; those on the real data go through `dvc` itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
import yaml

from mnist_pipeline import distributed, machine
from mnist_pipeline.model import Net
from mnist_pipeline.training import share, share_loss
from tests.conftest import (
    REPO, copy_workdir, doc_block, dvc, free_port, pipeline_commands, project_env,
)
from tests.test_faults import assert_stage_refused, runs, snapshot

TRAIN_ARGS = pipeline_commands()["train"]
CORES = len(os.sched_getaffinity(0))


def set_train(root: Path, **train: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(("n", "world_size"), [(256, 2), (16, 2), (7, 3), (1, 2), (10, 1)])
def test_shares_cover_every_item_once_without_padding(n: int, world_size: int) -> None:
    parts = [share(n, world_size, rank) for rank in range(world_size)]
    assert [i for part in parts for i in range(n)[part]] == list(range(n))
    sizes = [part.stop - part.start for part in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("batch", "world_size"), [(256, 2), (7, 2), (10, 3), (1, 2)])
def test_shares_weighted_for_ddp_average_give_the_global_mean_gradient(batch: int, world_size: int) -> None:
    # DDP averages the processes' gradients; that average must be the gradient of the whole batch's mean loss,
    # also when shares differ in size or one is empty. PyTorch's own mean over the whole batch is the reference.
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    F.cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(world_size):
        model.zero_grad()
        part = share(batch, world_size, rank)
        share_loss(model(x[part]), y[part], batch, world_size).backward()
        total = [t + p.grad / world_size for t, p in zip(total, model.parameters())]
    for got, want in zip(total, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_one_process_weighs_its_loss_by_exactly_one() -> None:
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    assert torch.equal(share_loss(logits, labels, 32, 1), F.cross_entropy(logits, labels))


def test_more_processes_than_cores_is_one_line_before_training(pipeline: Path, monkeypatch) -> None:
    set_train(pipeline, processes=CORES + 1, epochs=1000)
    before = snapshot(pipeline)
    assert_stage_refused("train", monkeypatch, "params.yaml: train.processes:", f"but it has {CORES} usable CPU cores")
    assert snapshot(pipeline) == before
    assert len(runs(pipeline)) == 1  # the pipeline's own: nothing started, nothing recorded


def test_rendezvous_port_in_use_is_one_line_before_training(pipeline: Path, monkeypatch) -> None:
    set_train(pipeline, processes=2, num_threads=1, epochs=1000)
    before = snapshot(pipeline)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        monkeypatch.setenv("PET_NNODES", "2")
        monkeypatch.setenv("PET_RDZV_ENDPOINT", endpoint)
        assert_stage_refused("train", monkeypatch, f"PET_RDZV_ENDPOINT={endpoint}", "already in use on this machine")
    assert snapshot(pipeline) == before


def start_training(root: Path, **env: str) -> subprocess.Popen[str]:
    """The train stage, run as DVC runs it, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", *TRAIN_ARGS], cwd=root, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=project_env(PYTHONPATH=str(REPO), DVC_ROOT=str(root), PYTHONUNBUFFERED="1", **env),
    )


def wait_for_rendezvous(port: int, process: subprocess.Popen[str], timeout_s: float = 120) -> None:
    """Wait until the first machine's stage listens for the rendezvous on `port`, as it does before the other
    machines may join (on one host, each would else take itself for the rendezvous' host)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)


def ranks_of(pid: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started under `pid`, read from their environment."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_text().split("\0")
        except (FileNotFoundError, ProcessLookupError):
            continue  # it has just exited
        rank = next((line.removeprefix("RANK=") for line in environ if line.startswith("RANK=")), None)
        if rank is not None:
            found[int(rank)] = int(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def listening(pid: int) -> set[str]:
    """The addresses `pid` listens on for TCP: its sockets (/proc/PID/fd) found in /proc/PID/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, wildcard, loopback in (("tcp", "00000000", "0100007F"), ("tcp6", "0" * 32, "0" * 24 + "01000000")):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address = fields[1].split(":")[0]
                found.add({wildcard: "any", loopback: "loopback"}.get(address, address))
    return found


@pytest.mark.slow
def test_the_job_listens_where_the_docs_say_and_killing_the_stage_ends_its_processes(pipeline: Path) -> None:
    set_train(pipeline, processes=2, num_threads=1, epochs=1000)
    before = snapshot(pipeline)
    process = start_training(pipeline)
    while (line := process.stdout.readline()) and "Iteration 8 statistics" not in line:
        pass
    workers = ranks_of(process.pid)
    assert len(workers) == 2 and all(alive(pid) for pid in workers.values())
    # Where docs/distributed.md says the job listens: torchrun's rendezvous on every interface (it has no option to
    # do otherwise), Gloo between the processes on the loopback interface only.
    try:
        assert listening(process.pid) == {"any"}
        assert all(listening(pid) == {"loopback"} for pid in workers.values())
    finally:
        # What an OOM killer or a closed terminal does to the stage that launched the job: SIGKILL, no chance to
        # clean up.
        process.kill()
        process.wait()
    killed = time.monotonic()
    try:
        while any(alive(pid) for pid in workers.values()):
            assert time.monotonic() - killed < 5, "a training process outlived the stage that started it"
            time.sleep(0.1)
    finally:
        for pid in filter(alive, workers.values()):  # an orphan left by a regression would train for hours
            os.kill(pid, signal.SIGKILL)
    assert snapshot(pipeline) == before  # nothing written before or after the kill
    page = " ".join((REPO / "docs" / "distributed.md").read_text().split())
    assert "torchrun's rendezvous listens on every network interface" in page
    assert "Gloo connects them over the loopback interface only" in page


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "cause"), [(signal.SIGKILL, "was killed by signal SIGKILL"),
                                            (signal.SIGTERM, "failed: interrupted (stopped by signal SIGTERM)")])
def test_a_rank_that_dies_ends_the_job_in_one_line(pipeline: Path, sig: signal.Signals, cause: str) -> None:
    set_train(pipeline, processes=2, num_threads=1, epochs=1000)
    before = snapshot(pipeline)
    process = start_training(pipeline)
    while (line := process.stdout.readline()) and "Iteration 8 statistics" not in line:
        pass
    victim = ranks_of(process.pid)[1]
    os.kill(victim, sig)
    killed = time.monotonic()
    while ranks_of(process.pid):  # torchrun stops the other process
        assert time.monotonic() - killed < 10, "the job went on after a process died"
        time.sleep(0.1)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 1
    error = stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in stderr, stderr
    assert error[0].startswith(f"error: train: rank 1 of 2 (pid {victim}) {cause}; MLflow run 'workspace' (")
    assert error[0].endswith(") is marked FAILED; the outputs are left as they were")
    assert snapshot(pipeline) == before
    assert not [p for p in pipeline.rglob("*.partial-*")]
    failed = runs(pipeline)[0]
    assert failed.info.status == "FAILED" and failed.info.run_id in error[0]
    assert cause in failed.data.tags["failure"] and failed.data.tags["train.world_size"] == "2"
    assert failed.data.tags["train.backend"] == "gloo" and failed.data.params["train.processes"] == "2"
    assert {k: v for k, v in failed.data.tags.items() if k.startswith("machine.")} == machine.provenance()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, real_baseline: Path) -> Path:
    """A copy of the session's real-data baseline (one epoch on one process, committed), then `dvc exp run` on two."""
    root = copy_workdir(real_baseline, tmp_path_factory.mktemp("ddp") / "repo")
    dvc(root, "exp", "run", "-n", "ddp2", "-S", "train.processes=2", "-S", "train.num_threads=1")
    return root


def metrics(root: Path) -> dict:
    return json.loads((root / "reports/metrics.json").read_text())["test"]


@pytest.mark.slow
def test_dvc_exp_run_on_two_processes_gives_one_run_of_the_same_quality(repo: Path) -> None:
    one = json.loads(subprocess.run(["git", "show", "HEAD:reports/metrics.json"], cwd=repo, capture_output=True,
                                    text=True, check=True).stdout)["test"]
    summary = json.loads((repo / "reports/train.json").read_text())["train"]
    assert (summary["world_size"], summary["backend"]) == (2, "gloo")
    # The same batches and shifts on 1 and 2 processes: only the order of float sums differs.
    assert abs(metrics(repo)["accuracy"] - one["accuracy"]) <= 0.005
    assert metrics(repo)["accuracy"] >= 0.95

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert sorted((r.info.run_name, r.info.status) for r in found) == [("ddp2", "FINISHED"), ("workspace", "FINISHED")]
    (run,) = [r for r in found if r.info.run_name == "ddp2"]
    assert run.data.tags["train.world_size"] == "2" and run.data.tags["train.backend"] == "gloo"
    assert run.data.params["train.processes"] == "2" and run.data.metrics["train.world_size"] == 2
    assert run.data.metrics["test.accuracy"] == metrics(repo)["accuracy"]


@pytest.mark.slow
def test_two_machines_on_127_0_0_1_give_the_bytes_of_one_machine_with_two_processes(
    repo: Path, tmp_path: Path
) -> None:
    # Machine 0 runs the stage through DVC, machine 1 the torchrun command of the docs, each in its own clone.
    first = copy_workdir(repo, tmp_path / "machine0")
    second = copy_workdir(repo, tmp_path / "machine1")
    lock = (first / "dvc.lock").read_bytes()
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    dvc_run = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"], cwd=first, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=project_env(PET_NNODES="2", PET_RDZV_ENDPOINT=endpoint),
    )
    wait_for_rendezvous(port, dvc_run)  # machine 0 hosts it
    documented = shlex.split(doc_block("torchrun --nnodes", "bash").replace("\\\n", " "))
    assert documented[documented.index("-m") + 2:] == TRAIN_ARGS  # the docs' command is the stage's, as in dvc.yaml
    launcher = subprocess.run(
        [part.replace("host0:29400", endpoint) for part in documented],
        cwd=second, capture_output=True, text=True, env=project_env(), timeout=300,
    )
    out = dvc_run.communicate(timeout=300)[0]
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    assert dvc_run.returncode == 0, out[-3000:]
    assert "2 processes (gloo)" in out
    # dvc.lock holds the hashes of the one-machine run: the model and reports are byte for byte the same.
    assert (first / "dvc.lock").read_bytes() == lock
    assert (second / "models/model.pt").read_bytes() == (repo / "models/model.pt").read_bytes()


def test_every_process_compares_the_code_dvc_yaml_says_makes_the_model() -> None:
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    code = [path.relative_to(REPO).as_posix() for path in distributed.training_code()]
    assert sorted(code) == sorted(dep for dep in deps if dep.endswith(".py"))


@pytest.mark.slow  # two torchruns, four processes that import torch, a live run: 30-50 s on 2 shared cores
def test_a_machine_whose_model_py_differs_is_refused_before_training(pipeline: Path, tmp_path: Path) -> None:
    # Two machines on 127.0.0.1, a process each; machine 1's checkout has a model.py that differs by a comment alone
    # (it trains the same network), yet every machine must run the same commit: the job stops before training.
    set_train(pipeline, processes=2, num_threads=1)
    before = snapshot(pipeline)
    code = tmp_path / "machine1-code"  # machine 1's checkout: the repo's code, model.py edited
    for package in ("mnist_pipeline", "stages"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    model = code / "mnist_pipeline" / "model.py"
    model.write_text(model.read_text() + "# edited on machine 1 alone\n")
    second = copy_workdir(pipeline, tmp_path / "machine1")
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    first = start_training(pipeline, PET_NNODES="2", PET_RDZV_ENDPOINT=endpoint, GLOO_SOCKET_IFNAME="lo")
    wait_for_rendezvous(port, first)
    other = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", endpoint, "-m", "stages.train", *TRAIN_ARGS],
        cwd=second, capture_output=True, text=True, timeout=300,
        env=project_env(PYTHONPATH=str(code), DVC_ROOT=str(second), GLOO_SOCKET_IFNAME="lo"),
    )
    stdout, stderr = first.communicate(timeout=300)

    assert first.returncode == 1 and other.returncode != 0, stderr
    error = stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in stderr, stderr
    assert re.search(r"failed: code of ranks \[[01]\] differ from rank 0's: every machine needs the same", error[0])
    assert error[0].endswith("is marked FAILED; the outputs are left as they were")
    assert "Iteration" not in stdout + other.stdout  # refused before the first step
    assert snapshot(pipeline) == before and snapshot(second) == before
