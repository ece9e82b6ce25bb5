"""Helpers for the HTTP tests: the real server (`python -m server`) on a free loopback port.

Test modules import the fixtures they use from here (tests/conftest.py belongs to the model
tests). Servers log to a file in the test's tmp dir; its tail is shown when startup fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "random:tiny-qwen2"
DEFAULT_MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A `python -m server` subprocess and clients for it."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="nanoserve-", suffix=".log")[1])
        command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def openai(self, api_key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """(sample name, sorted labels without model_name) -> value, from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
                samples[(sample.name, labels)] = sample.value
        return samples

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal the server and wait; kills it if it does not exit in time. Returns its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def run_server(*args: str, model: str = TINY_MODEL, env: dict[str, str] | None = None,
               timeout_s: float = 120.0) -> Iterator[RunningServer]:
    server = RunningServer(["--model", model, *args], env)
    try:
        server.wait_healthy(timeout_s)
        yield server
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def gauge(server: RunningServer, name: str) -> float:
    return server.metrics()[(name, ())]


def assert_idle(server: RunningServer, timeout_s: float = 10.0) -> None:
    """Within `timeout_s`: nothing running or waiting, no KV block held, /health 200."""
    def idle() -> bool:
        m = server.metrics()
        return (m[("nanoserve_num_requests_running", ())] == 0 and m[("nanoserve_num_requests_waiting", ())] == 0
                and m[("nanoserve_kv_cache_usage_perc", ())] == 0)

    assert wait_for(idle, timeout_s), server.metrics()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[RunningServer]:
    """One float32 tiny-Qwen2 server shared by the HTTP tests (fp32: greedy comparisons
    across batch compositions stay exact)."""
    with run_server("--dtype", "float32") as server:
        yield server


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    """The real default model (bf16 where the CPU has it), shared by the structured-output and
    tool tests."""
    with run_server(model=DEFAULT_MODEL) as server:
        yield server
