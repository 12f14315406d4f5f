"""Start a real `conveyor serve` process on a free 127.0.0.1 port, and stop it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, process: subprocess.Popen, port: int, log_path: str) -> None:
        self.process, self.port, self.log_path = process, port, log_path
        self.base_url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def metric(base_url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """A Prometheus metric's value, summed over its label sets (0 when absent)."""
    text = httpx.get(f"{base_url}/metrics", headers=headers).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@contextmanager
def running_server(*args: str, timeout: float = 120.0, log_path: str,
                   launcher: Sequence[str] = ("-m", "conveyor.cli")) -> Iterator[RunningServer]:
    """`launcher`: what follows the interpreter, before `serve` (e.g. `-c` and a script that injects faults,
    then calls `conveyor.cli.main(sys.argv[1:])`)."""
    port = free_port()
    command = [sys.executable, *launcher, "serve", "--port", str(port), *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    server = RunningServer(process, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
