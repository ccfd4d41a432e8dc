"""Helpers of the service tests: a shared local Ray, and a real `dreaming serve` process attached to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

API_KEY = "test-key"
# A dream small enough for a 2-core CPU: a few iterations of a tiny population on the tiny bundle.
TINY_CONFIG = {"iterations": 3, "population": 2, "children": 4, "prompt_length": 3, "topk": 8,
               "template": "{prompt}"}


@contextmanager
def local_ray():
    """A local Ray for a test module: 2 CPUs, no dashboard; yields its address for servers to attach to."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


Bundles = Path | str | list[Path | str]  # what `dreaming serve --bundle` takes: DIR or NAME=DIR, one or several


@contextmanager
def serving(bundles: Bundles, home: Path, **env: str):
    """A started `dreaming serve` on the bundles, in a local Ray of its own, stopped at the end."""
    with local_ray() as address:
        server = Server(bundles, home, address, **env).start()
        try:
            yield server
        finally:
            server.stop()


def worker_pid(worker: dict) -> int:
    """The process id of a worker listed by /v1/info (which shows no pids), asked of its actor through Ray."""
    import ray

    from service.workers import NAMESPACE

    return ray.get(ray.get_actor(worker["name"], namespace=NAMESPACE).describe.remote(), timeout=120)["pid"]


def wait_for(condition, timeout: float = 180, every: float = 0.2):
    """Poll `condition()` until it returns something truthy; return that (a safety timeout, not a timing test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"condition not met within {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m dreaming.cli serve` on a free loopback port, with its own environment and log file; `bundles`
    as `--bundle` takes them (the first is the default one)."""

    def __init__(self, bundles: Bundles, home: Path, ray_address: str, **env: str):
        self.bundles = list(bundles) if isinstance(bundles, list) else [bundles]
        self.home, self.ray_address, self.env = home, ray_address, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "DREAMING_HOME": str(self.home), "RAY_ADDRESS": self.ray_address,
               "DREAMING_API_KEY": API_KEY, **self.env}
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / f"server-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dreaming.cli", "serve", *(f"--bundle={bundle}" for bundle in self.bundles),
             "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready)
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}; log in {self.home}")
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=5).json()["workers_ready"] >= 1
        except httpx.HTTPError:
            return False

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=60, **kwargs)

    def kill(self) -> None:
        """Stop at once, as a crash would (no shutdown code runs)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
