"""Property-based fuzzing of the HTTP API: schemathesis generates requests from the live OpenAPI document of a real
server on the tiny bundle (with the API key, so the keyed endpoints are reached) and checks that none gets a server
error; the server is healthy afterwards."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from serving import API_KEY, serving

EXAMPLES = 8  # per operation and phase: with the coverage phase, over 2,500 requests in all (38 operations)


def test_no_generated_request_gets_a_server_error(tiny_bundle, tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    # accepted dreams must stay small on a 2-core CPU: the cost caps bound what the fuzzer can queue
    with serving(tiny_bundle.directory, tmp_path / "home", DREAMING_MAX_JOB_COST="2000",
                 DREAMING_MAX_BATCH_COST="8000", DREAMING_FEATURES_PER_CALL="8") as server:
        run = subprocess.run(
            [schemathesis, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", str(EXAMPLES), "--phases", "examples,coverage,fuzzing", "--seed", "0",
             "--header", f"X-API-Key: {API_KEY}", "--no-color"],
            capture_output=True, text=True, timeout=480, cwd=tmp_path)  # its cache stays out of the checkout
        report = run.stdout + run.stderr
        assert run.returncode == 0, report[-6000:]
        cases = sum(int(n) for n in re.findall(r"(\d+) generated", report)) or int(re.search(
            r"(\d+) test cases", report).group(1))
        assert cases >= 1000, report[-3000:]
        print(f"\nschemathesis: {cases} generated requests, no server error")
        health = httpx.get(f"{server.url}/v1/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok"
