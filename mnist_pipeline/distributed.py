"""Training on several processes and machines with torchrun: the checks before launching, the launch, joining the
job, one line for a failure."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mnist_pipeline import import_gc
from mnist_pipeline.cpu_kernels import PINS
from mnist_pipeline.errors import PipelineError, first_line, interrupt, interrupted
from mnist_pipeline.params import PARAMS_FILE, Params, ParamsError, flatten

# torchrun takes each of its flags from a PET_<FLAG> variable too. The stage run by DVC on the first machine
# joins a job over several machines through these; the other machines run torchrun with the same flags
# (docs/distributed.md).
NODES_ENV, ENDPOINT_ENV, BACKEND_ENV = "PET_NNODES", "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND"
# Marks, in a process's error file, a collective that failed because a peer had gone.
LOST = "lost"
# The pid of the train stage that launched this machine's processes: they end with it (die_with_launcher).
LAUNCHER_ENV = "MNIST_PIPELINE_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
# The modules whose code makes a training's result, which every process of a job must run alike: the train stage's
# code deps in dvc.yaml (tests/test_distributed.py holds the two lists equal).
TRAINING_CODE = (
    "stages", "stages.train", "mnist_pipeline.train_job", "mnist_pipeline.training", "mnist_pipeline.distributed",
    "mnist_pipeline.reports", "mnist_pipeline.digits", "mnist_pipeline.model", "mnist_pipeline.cpu_kernels",
    "mnist_pipeline.data", "mnist_pipeline.files", "mnist_pipeline.params",
)


class JobFailed(PipelineError):
    """A process of the job failed; the message names its rank and the cause."""


@dataclass(frozen=True)
class Rank:
    """This process's place in the job torchrun started."""

    rank: int
    local_rank: int
    world_size: int
    backend: str

    @property
    def writes(self) -> bool:
        """Whether this process writes the result: the first on each machine.

        Every process ends with the same weights and reports. With torchrun's c10d rendezvous the job's rank 0
        may land on any machine (it sorts machines by host name), so the first process of each machine writes
        into that machine's checkout: on one machine, that is rank 0 alone.
        """
        return self.local_rank == 0


def machines() -> int:
    """The number of machines of the job, from PET_NNODES (1 when unset)."""
    text = os.environ.get(NODES_ENV, "1")
    if not text.isdigit() or int(text) < 1:
        raise PipelineError(f"{NODES_ENV}={text}: expected the number of machines of the job, a whole number >= 1")
    return int(text)


def processes_here(processes: int, device: torch.device) -> int:
    """How many of the job's processes run on this machine; more than it can hold is a params error."""
    nodes = machines()
    if processes % nodes:
        raise ParamsError(PARAMS_FILE, "train.processes",
                          f"{processes} processes cannot be shared evenly by {NODES_ENV}={nodes} machines")
    here = processes // nodes
    if device.type == "cuda":
        limit, what = torch.cuda.device_count(), "CUDA devices (one per process)"
    else:
        limit, what = len(os.sched_getaffinity(0)), "usable CPU cores (os.sched_getaffinity)"
    if here > limit:
        raise ParamsError(PARAMS_FILE, "train.processes", f"{here} processes on this machine, but it has {limit} "
                          f"{what}; set at most {limit * nodes}, or spread them over more machines "
                          "(docs/distributed.md)")
    return here


def check_rendezvous_port() -> None:
    """Fail in one line when this machine should host the rendezvous (PET_RDZV_ENDPOINT) but its port is taken.

    torchrun would connect to whatever holds the port and wait there; a test bind says it now. An endpoint
    on another machine cannot be bound here (EADDRNOTAVAIL): that machine hosts it.
    """
    endpoint = os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        return
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PipelineError(f"{ENDPOINT_ENV}={endpoint}: expected host:port, the first machine's address and a free "
                            "port, the same on every machine")
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise PipelineError(f"{ENDPOINT_ENV}={endpoint}: host {host} not found ({err.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections closing do not count
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise PipelineError(
                        f"{ENDPOINT_ENV}={endpoint}: port {port} is already in use on this machine; pick a free port "
                        "for the rendezvous and give the same to every machine") from None
                if err.errno != errno.EADDRNOTAVAIL:
                    raise PipelineError(f"{ENDPOINT_ENV}={endpoint}: cannot listen there ({err.strerror})") from None


def launch(processes: int, module: str, args: list[str], threads: int) -> None:
    """Run `python -m module args` as this machine's share of the job under torchrun (its own code, in this
    process) and wait for it; a failed process becomes JobFailed naming its rank and the cause."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    nodes = machines()
    flags = ["--nnodes", str(nodes), "--nproc-per-node", str(processes), "--max-restarts", "0"]
    if nodes == 1 and ENDPOINT_ENV not in os.environ:
        flags.append("--standalone")  # a rendezvous on a free local port
        # One machine: Gloo's connections between the processes on the loopback interface, not the network's.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    elif BACKEND_ENV not in os.environ:
        flags += ["--rdzv-backend", "c10d"]
    # Each process sets its own thread count; this keeps torchrun from setting OMP_NUM_THREADS=1 and saying so.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="torchrun-") as logs:
        arguments = torchrun.parse_args([*flags, "--log-dir", logs, "-m", module, *args])
        # torchrun's agent logs every step, and each failure over dozens of lines: the failure becomes one line here.
        logging.disable(logging.CRITICAL)
        try:
            torchrun.run(arguments)
        except ChildFailedError as err:
            raise JobFailed(describe_failure(err.failures, processes * nodes)) from None
        except RendezvousError as err:
            raise PipelineError(f"torchrun's rendezvous failed ({one_line(err)}); check {ENDPOINT_ENV} and "
                                f"{NODES_ENV}, and that every machine's torchrun is started") from None
        except SignalException as err:
            raise KeyboardInterrupt(f"stopped by signal {err.sigval.name}") from None
        finally:
            logging.disable(logging.NOTSET)


def describe_failure(failures: dict, world_size: int) -> str:
    """One line for torchrun's failures (rank: ProcessFailure): the process whose failure started it all.

    When one process dies the others fail after it, having lost their peers or been stopped by torchrun: a death
    by signal (it leaves no error file) comes first, then the earliest by the time in the error files.
    """
    def info(failure: object) -> dict:
        data = failure.error_file_data.get("message")
        return data if isinstance(data, dict) else {"message": str(data or ""), "extraInfo": {}}

    def order(item: tuple) -> tuple:
        failure = item[1]
        extra = info(failure)["extraInfo"]
        return failure.exitcode >= 0, float(extra.get("time", failure.timestamp)), item[0]

    rank, failure = min(failures.items(), key=order)
    where = f"rank {rank} of {world_size} (pid {failure.pid})"
    if failure.exitcode < 0:
        return f"{where} was killed by signal {failure.signal_name()}"
    message = info(failure)["message"]
    if not message:
        return f"{where} exited with code {failure.exitcode} without saying why"
    if info(failure)["extraInfo"].get(LOST) == "true":
        return f"{where} failed: {message}; a process on another machine stopped first: its torchrun says why"
    return f"{where} failed: {message}"


def join(processes: int, device: torch.device) -> tuple[Rank, torch.device]:
    """Join the job torchrun started: Gloo on CPU, NCCL on CUDA with one GPU per process."""
    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if world_size != processes:
        raise ParamsError(PARAMS_FILE, "train.processes", f"{processes}, but torchrun started {world_size} processes "
                          "in all (WORLD_SIZE); make them agree on every machine")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Rank(dist.get_rank(), local_rank, world_size, backend), device


def training_code() -> list[Path]:
    """The files of TRAINING_CODE, found as this process imports them (a module run by `-m` is found, not rerun)."""
    return [Path(importlib.util.find_spec(name).origin) for name in TRAINING_CODE]


def check_same_inputs(params: Params, arrays: list, code: list[Path]) -> None:
    """Refuse to train when processes differ in params, data or code: they would train different models silently."""
    def digest(chunks: list[bytes]) -> str:
        hasher = hashlib.sha256()
        for chunk in chunks:
            hasher.update(chunk)
        return hasher.hexdigest()

    kernels = {key: os.environ.get(key) for key in PINS} | {"capability": torch.backends.cpu.get_cpu_capability()}
    mine = {
        PARAMS_FILE: digest([json.dumps(flatten(params), sort_keys=True).encode()]),
        "data": digest([memoryview(a).cast("B") for a in arrays]),
        "code": digest([path.read_bytes() for path in code] + [torch.__version__.encode()]),
        "CPU kernels": digest([json.dumps(kernels, sort_keys=True).encode()]),
    }
    everyone: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = sorted({key for other in everyone for key in mine if other[key] != everyone[0][key]})
    if differ:
        ranks = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
        raise PipelineError(f"{', '.join(differ)} of ranks {ranks} differ from rank 0's: every machine needs the same "
                            "commit, params.yaml and data (`dvc pull`), and CPUs that run the pinned kernels "
                            "(docs/reproducibility.md)")


def one_line(err: BaseException) -> str:
    """An exception as one line: a PipelineError's own message, else its type and first line."""
    if isinstance(err, PipelineError):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return interrupted(err)
    first = first_line(str(err))
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def die_with_launcher() -> None:
    """End this process as soon as the process that started it ends, however it ends (Linux).

    torchrun's processes are the train stage's children: killed by a signal it cannot catch (an OOM killer, a
    closed terminal's SIGKILL), the stage cannot stop them, and they would train on and write their outputs
    after DVC had reported the failure. The kernel sends them SIGKILL instead; a launcher already gone before
    this call is caught by its pid.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except AttributeError:  # not Linux: no such call
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and os.getppid() != int(launcher):
        os._exit(1)


def run_rank(main: Callable[[], None]) -> None:
    """Run one process of the job: a failure goes in one line to the error file torchrun reads, exit code 1.

    torchrun stops the other processes with SIGTERM when one fails: raised as KeyboardInterrupt here, it lets
    atomic writes remove their temporary files. A launcher that dies takes the processes with it.
    """
    import_gc.resume()  # paused for the imports (stages/__init__.py)
    die_with_launcher()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except BaseException as err:  # every failure, so that torchrun learns its cause
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        _record_failure(err)
        sys.stdout.flush()
        os._exit(1)  # not sys.exit: interpreter shutdown could wait on peers that are gone
    if dist.is_initialized():
        dist.destroy_process_group()
    import_gc.before_exit()


def _record_failure(err: BaseException) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    # A collective that fails because a peer is gone raises one of torch.distributed's errors, or Gloo's RuntimeError.
    lost = isinstance(err, dist.DistError) or isinstance(err, RuntimeError) and "/gloo/" in str(err)
    now = time.time()
    # torchrun reads message and timestamp (whole seconds); describe_failure orders by the finer time.
    data = {"message": {"message": one_line(err),
                        "extraInfo": {"timestamp": str(int(now)), "time": repr(now), LOST: str(lost).lower()}}}
    if path:
        Path(path).write_text(json.dumps(data))
    else:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
