"""How several bundles share one worker, measured in one run: a real `dreaming serve --bundle A --bundle B` with
one CPU or GPU worker actor, the worker's resident memory (RSS) after it opened both bundles (no model loaded yet),
after a dream on A (A's models loaded) and after one on B (both held), the bytes of each bundle's loaded models
(parameters and buffers: fp32 for measuring, plus the search dtype when it differs), and the wall time of each dream
(the first on a bundle includes loading its model).

Attaches the server to a local Ray started here, so the worker actor can be asked about itself (it reports its RSS
and what it holds); a fresh job database (DREAMING_DB in a temporary directory), so nothing is cached.

    python benchmarks/bench_bundles.py --bundle A --bundle B [--iterations 3] [--population 4]
"""

import argparse
import tempfile
import time

import httpx
import ray
from bench_service import live_features, start_server

from dreaming.bundle import Bundle, parse_bundles
from service.workers import NAMESPACE

MB = 1024**2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", required=True, help="DIR or NAME=DIR (as dreaming serve takes)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    served = parse_bundles(",".join(args.bundle))
    config = {"iterations": args.iterations, "population": args.population, "template": "{prompt}"}

    ray.init(address="local", include_dashboard=False)
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(args.bundle, scratch, args.port, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=60)
            [worker] = client.get("/v1/info").json()["workers"]
            actor = ray.get_actor(worker["name"], namespace=NAMESPACE)
            rss = [("both bundles opened, no model loaded", ray.get(actor.describe.remote())["rss_bytes"])]
            print(f"worker device: {worker['device']}")
            for name, directory in served:
                feature = live_features(Bundle.open(directory), 1)[0]
                started = time.perf_counter()
                job = client.post(f"/v1/bundles/{name}/dreams", json={"feature": feature, "config": config}).json()
                while job["status"] not in ("done", "failed", "cancelled"):
                    time.sleep(0.2)
                    job = client.get(f"/v1/bundles/{name}/jobs/{job['job_id']}").json()
                seconds = time.perf_counter() - started
                described = ray.get(actor.describe.remote())
                identity = client.get(f"/v1/bundles/{name}/info").json()["identity"]
                rss.append((f"after a dream on {name}", described["rss_bytes"]))
                print(f"{name}: dream of {feature} {job['status']} in {seconds:.1f} s (model load included); "
                      f"its loaded models hold {described['loaded'][identity]:,} bytes")
            print(f"bundles whose models the worker holds: {len(described['loaded'])}")
            for stage, value in rss:
                print(f"worker RSS {stage}: {value / MB:.1f} MiB (+{(value - rss[0][1]) / MB:.1f} MiB)")
        finally:
            server.terminate()
            server.wait(60)
    ray.shutdown()


if __name__ == "__main__":
    main()
