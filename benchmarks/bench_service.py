"""The HTTP service on loopback, measured in one run:
  1. load while a dream job runs on the same machine: the cached feature page's p50/p99 latency and requests/s at
     1, 16 and 64 concurrent clients, and the p99 of POST /v1/activations (one short text) under 16 clients;
  2. job throughput (features/minute) for batches of 1, 4 and 16 features.

Starts `dreaming serve` on loopback with a fresh job database (DREAMING_DB in a temporary directory), so no
dream is cached when the batches start. Dream features are live, non-dense features spread over the layers. The
worker groups up to 16 features with one config into one engine call. The background dream of part 1 is
cancelled (DELETE /v1/jobs/{id}) before part 2.

    python benchmarks/bench_service.py [--bundle DIR] [--iterations 10] [--requests 640]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from dreaming.bundle import Bundle


def live_features(bundle: Bundle, count: int) -> list[str]:
    """`count` features with a dataset max and density <= 10%, round-robin over the layers."""
    maxima = bundle.maxima()
    live = (maxima.arrays["max_activation"] > 0) & (maxima.arrays["density"] <= 0.1)
    per_layer = [np.flatnonzero(live[layer].numpy()).tolist() for layer in range(live.shape[0])]
    chosen = []
    while len(chosen) < count and any(per_layer):
        for layer, indices in enumerate(per_layer):
            if indices and len(chosen) < count:
                chosen.append(f"{layer}/{indices.pop(0)}")
    return chosen


def start_server(bundle_dirs: list[str], scratch: str, port: int, **env: str) -> subprocess.Popen:
    """`dreaming serve` of the bundles (`--bundle` each) on loopback with a fresh job database and no API key; returns
    once a worker is ready."""
    env = {**os.environ, "DREAMING_DB": f"{scratch}/jobs.sqlite", "DREAMING_FEATURES_PER_CALL": "16", **env}
    env.pop("DREAMING_API_KEY", None)
    log = open(Path(scratch) / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "dreaming.cli", "serve",
                               *(f"--bundle={bundle}" for bundle in bundle_dirs), "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited; see {scratch}/server.log")
        try:
            workers = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=5).json()["workers"]
        except httpx.HTTPError:
            workers = []
        if any(worker.get("state") == "ready" for worker in workers):
            return server
        if any(worker.get("state") == "error" for worker in workers):
            server.terminate()
            raise SystemExit(f"the worker could not start: {workers}")
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in 10 minutes")


async def load(url: str, method: str, path: str, clients: int, requests: int, body: dict | None = None
               ) -> tuple[list[float], float, int]:
    """`requests` calls of one path spread over `clients` concurrent connections: the latencies of the answered
    ones, the wall time, and how many were refused as busy (503, the bounded interactive queue)."""
    latencies, refused = [], 0

    async def client_loop(client: httpx.AsyncClient, count: int):
        for _ in range(count):
            started = time.perf_counter()
            response = await client.request(method, path, json=body)
            if response.status_code == 503:
                nonlocal refused
                refused += 1
                continue
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, requests // clients) for _ in range(clients)))
        return latencies, time.perf_counter() - started, refused


def until_running(client: httpx.Client, job_id: str) -> None:
    while (status := client.get(f"/v1/jobs/{job_id}").json()["status"]) != "running":
        if status != "queued":
            raise SystemExit(f"the background dream ended before the load test ({status})")
        time.sleep(0.2)


def run_batch(client: httpx.Client, features: list[str], config: dict) -> float:
    """Seconds from submitting a batch to its last result."""
    started = time.perf_counter()
    batch = client.post("/v1/batches", json={"features": features, "config": config}).json()
    while True:
        state = client.get(f"/v1/batches/{batch['batch_id']}").json()
        if state["status"] != "running":
            if state["status"] != "done":
                raise SystemExit(f"batch failed: {[job['error'] for job in state['jobs'] if job['error']]}")
            return time.perf_counter() - started
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory (default: the default bundle)")
    parser.add_argument("--iterations", type=int, default=10, help="EPO iterations per dream")
    parser.add_argument("--template", help="dream template with one {prompt} (default: the model's chat template)")
    parser.add_argument("--requests", type=int, default=640, help="feature-page requests per concurrency level")
    parser.add_argument("--clients", default="1,16,64", help="concurrency levels for the feature page")
    parser.add_argument("--activation-requests", type=int, default=160, help="POST /v1/activations under 16 clients")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes")
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    sizes = [int(size) for size in args.batches.split(",")]
    features = live_features(bundle, 2 + sum(sizes))
    port = 8700 + os.getpid() % 200
    url = f"http://127.0.0.1:{port}"
    config = {"iterations": args.iterations, **({"template": args.template} if args.template else {})}
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server([str(bundle.directory)], scratch, port)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                info = client.get("/v1/info").json()
                print(f"bundle {info['identity']} ({info['bundle']['model']['name']}), "
                      f"workers {[w.get('device') for w in info['workers']]}")
                page = f"/v1/features/{features[0]}"
                run_batch(client, features[:1], config)  # a dream on the page, and a warm worker
                started = time.perf_counter()
                client.get(page).raise_for_status()
                print(f"feature page {features[0]}: first (uncached) request {time.perf_counter() - started:.3f}s")
                # a dream that outlasts the load test: iterations at the cap, stopped by DELETE
                background = client.post("/v1/dreams", json={"feature": features[1], "config": {
                    **config, "iterations": 4000}}).json()
                until_running(client, background["job_id"])
                print(f"while dreaming {features[1]} (job {background['job_id']}):")
                print(f"{'':<22} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'503s':>5}")

                def report(name: str, clients: int, latencies: list[float], wall: float, refused: int) -> None:
                    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
                    print(f"{name:<22} {clients:>7} {p50:8.1f} {p99:8.1f} {len(latencies) / wall:8.0f} {refused:>5}")

                for clients in [int(c) for c in args.clients.split(",")]:
                    report("cached feature page", clients, *asyncio.run(load(url, "GET", page, clients, args.requests)))
                body = {"feature": features[0], "texts": ["The quick brown fox jumps over the lazy dog."]}
                report("activations (1 text)", 16,
                       *asyncio.run(load(url, "POST", "/v1/activations", 16, args.activation_requests, body)))
                still = client.get(f"/v1/jobs/{background['job_id']}").json()
                print(f"the background dream was {still['status']} throughout "
                      f"({(still['progress'] or {}).get('done')} steps done); cancelling it")
                client.delete(f"/v1/jobs/{background['job_id']}").raise_for_status()
                print(f"job throughput, DreamConfig defaults except {config}:")
                print(f"{'batch':>6} {'seconds':>8} {'features/min':>13}")
                rest = features[2:]
                for size in sizes:
                    batch, rest = rest[:size], rest[size:]
                    seconds = run_batch(client, batch, config)
                    print(f"{size:>6} {seconds:8.1f} {size / seconds * 60:13.2f}")
        finally:
            server.terminate()
            server.wait(120)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
