"""Servers started on this machine by the tools, the tests and the benchmark: a free port, and waiting for an answer."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 within 5 seconds."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Poll `url` every half second until it answers 200 (True), or until `process` ends or `timeout_s` pass (False)."""
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True
