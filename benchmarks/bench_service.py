"""The HTTP service on loopback, measured in one run: cached feature-page latency and requests/s under
concurrent clients, and job throughput (features/minute) for batches of 1, 4 and 16 features.

Starts `dreaming serve` on loopback with a fresh job database (DREAMING_DB in a temporary directory), so no
dream is cached when the batches start. Dream features are live, non-dense
features spread over the layers. The worker groups up to 16 features with one config into one engine call.

    python benchmarks/bench_service.py [--bundle DIR] [--iterations 10] [--requests 400]
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


def start_server(bundle_dir: str, scratch: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "DREAMING_DB": f"{scratch}/jobs.sqlite", "DREAMING_FEATURES_PER_CALL": "16"}
    env.pop("DREAMING_API_KEY", None)
    log = open(Path(scratch) / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "dreaming.cli", "serve", "--bundle", bundle_dir,
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited; see {scratch}/server.log")
        try:
            workers = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=5).json()["workers"]
        except httpx.HTTPError:
            workers = []
        if any("pid" in worker for worker in workers):
            return server
        if any("error" in worker for worker in workers):
            server.terminate()
            raise SystemExit(f"the worker could not start: {workers}")
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in 10 minutes")


async def page_load(url: str, path: str, clients: int, requests: int) -> tuple[list[float], float]:
    """`requests` GETs of one path spread over `clients` concurrent connections: latencies and wall time."""
    latencies = []

    async def client_loop(client: httpx.AsyncClient, count: int):
        for _ in range(count):
            started = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, requests // clients) for _ in range(clients)))
        return latencies, time.perf_counter() - started


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
    parser.add_argument("--requests", type=int, default=400, help="feature-page requests per concurrency level")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels for the feature page")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes")
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    sizes = [int(size) for size in args.batches.split(",")]
    features = live_features(bundle, 1 + sum(sizes))
    port = 8700 + os.getpid() % 200
    url = f"http://127.0.0.1:{port}"
    config = {"iterations": args.iterations, **({"template": args.template} if args.template else {})}
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(str(bundle.directory), scratch, port)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                info = client.get("/v1/info").json()
                print(f"bundle {info['bundle']['bundle']} ({info['bundle']['model']['name']}), "
                      f"workers {[w.get('device') for w in info['workers']]}")
                page = f"/v1/features/{features[0]}"
                run_batch(client, features[:1], config)  # a dream on the page, and a warm worker
                started = time.perf_counter()
                client.get(page).raise_for_status()
                print(f"feature page {features[0]}: first (uncached) request {time.perf_counter() - started:.3f}s")
                print(f"{'cached feature page':<22} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
                for clients in [int(c) for c in args.clients.split(",")]:
                    latencies, wall = asyncio.run(page_load(url, page, clients, args.requests))
                    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
                    print(f"{'':<22} {clients:>7} {p50:8.1f} {p99:8.1f} {len(latencies) / wall:8.0f}")
                print(f"job throughput, DreamConfig defaults except {config}:")
                print(f"{'batch':>6} {'seconds':>8} {'features/min':>13}")
                rest = features[1:]
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
