"""Faults, end to end: the worker actor killed mid-job, and the service killed mid-batch and started again.

Workers sleep at every progress report (DREAMING_WORKER_STEP_DELAY) so that "mid-job" is a state the test can
wait for, not a race."""

import os
import signal

import pytest
from serving import TINY_CONFIG, Server, local_ray, wait_for, worker_pid

from service.store import SQLiteStore

SLOW = {**TINY_CONFIG, "iterations": 10}


@pytest.fixture(scope="module")
def ray_address():
    with local_ray() as address:
        yield address


def test_killed_workers_and_cancelled_jobs(tiny_bundle, tmp_path, ray_address):
    """One kill: the worker restarts and the job completes on its second attempt. DREAMING_MAX_ATTEMPTS (2 here)
    kills: the job fails with the reason, and the worker serves again. A job cancelled mid-call keeps its best and
    the rest of its call goes back to the queue; then its batch is cancelled. (One server for all three.)"""
    server = Server(tiny_bundle.directory, tmp_path / "home", ray_address, DREAMING_WORKER_STEP_DELAY="0.3",
                    DREAMING_MAX_ATTEMPTS="2", DREAMING_FEATURES_PER_CALL="2").start()
    try:
        with server.client() as client:
            job = client.post("/v1/dreams", json={"feature": "1/3", "config": SLOW}).json()
            wait_for(lambda: (client.get(f"/v1/jobs/{job['job_id']}").json()["progress"] or {}).get("done"))
            [worker] = client.get("/v1/info").json()["workers"]
            assert "pid" not in worker and "node" not in worker  # process ids stay in the log
            pid = worker_pid(worker)
            os.kill(pid, signal.SIGKILL)
            done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['job_id']}").json())["status"] != "running"
                            and j["attempts"] >= 2 and j["status"] != "queued" and j)
            assert done["status"] == "done" and done["attempts"] == 2 and done["result"]["feature"] == "1/3"
            health = wait_for(lambda: (h := client.get("/v1/health").json())["workers_ready"] == 1 and h)
            assert health["status"] == "ok"
            [restarted] = client.get("/v1/info").json()["workers"]
            assert restarted["state"] == "ready" and worker_pid(restarted) != pid

            job = client.post("/v1/dreams", json={"feature": "0/6", "config": SLOW}).json()
            for attempt in (1, 2):
                wait_for(lambda: (j := client.get(f"/v1/jobs/{job['job_id']}").json())["attempts"] == attempt
                         and (j["progress"] or {}).get("done"))
                [worker] = client.get("/v1/info").json()["workers"]
                os.kill(worker_pid(worker), signal.SIGKILL)
            ended = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['job_id']}").json())["status"] == "failed"
                             and j)
            assert ended["attempts"] == 2 and "died 2 times" in ended["error"]
            assert wait_for(lambda: client.get("/v1/health").json()["status"] == "ok")  # the worker serves again

            long = {**TINY_CONFIG, "iterations": 200}
            batch = client.post("/v1/batches", json={"features": ["0/5", "1/5"], "config": long}).json()
            target, other = (job["job_id"] for job in batch["jobs"])
            wait_for(lambda: (client.get(f"/v1/jobs/{target}").json()["progress"] or {}).get("done"))
            assert client.delete(f"/v1/jobs/{target}").status_code == 200
            ended = wait_for(lambda: (j := client.get(f"/v1/jobs/{target}").json())["status"] != "running" and j,
                             timeout=30)  # within seconds: the engine stops after its current iteration
            assert ended["status"] == "cancelled" and ended["result"]["stopped"] == "cancelled"
            assert 1 <= ended["result"]["iterations"] < 200 and ended["result"]["frontier"]
            rest = client.get(f"/v1/jobs/{other}").json()  # stopped with it, back in the queue, no attempt lost
            assert rest["status"] in ("queued", "running") and rest["attempts"] <= 1
            assert client.delete(f"/v1/batches/{batch['batch_id']}").json()["status"] in ("running", "cancelled")
            final = wait_for(lambda: (b := client.get(f"/v1/batches/{batch['batch_id']}/summary").json())["status"]
                             != "running" and b, timeout=60)
            assert final["status"] == "cancelled" and final["counts"]["cancelled"] == 2
            assert client.delete(f"/v1/jobs/{target}").status_code == 409  # already ended
            assert client.get("/v1/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_service_killed_mid_batch_resumes_without_losing_or_repeating_results(tiny_bundle, tmp_path, ray_address):
    home = tmp_path / "home"
    features = ["0/4", "1/4", "2/4"]
    env = dict(DREAMING_FEATURES_PER_CALL="1", DREAMING_WORKER_STEP_DELAY="0.3")
    server = Server(tiny_bundle.directory, home, ray_address, **env).start()
    with server.client() as client:
        batch_id = client.post("/v1/batches", json={"features": features, "config": SLOW}).json()["batch_id"]
        before = wait_for(lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["counts"]["done"] >= 1 and b)
    server.kill()
    finished_before = {job["job_id"]: job["result"] for job in before["jobs"] if job["status"] == "done"}
    assert 1 <= len(finished_before) < len(features)

    server = Server(tiny_bundle.directory, home, ray_address, **env).start()
    try:
        with server.client() as client:
            after = wait_for(lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["status"] != "running" and b)
    finally:
        server.stop()
    assert after["status"] == "done" and [job["feature"] for job in after["jobs"]] == features
    for job in after["jobs"]:
        if job["job_id"] in finished_before:  # done before the crash: kept as it was, never run again
            assert job["result"] == finished_before[job["job_id"]] and job["attempts"] == 1
    store = SQLiteStore(home / "service" / "jobs.sqlite")
    stored = store._db.execute("SELECT feature, COUNT(*) FROM results GROUP BY feature").fetchall()
    store.close()
    assert sorted(stored) == sorted((feature, 1) for feature in features)


def test_a_dead_actor_is_replaced_and_the_deadline_stops_a_job_keeping_its_best(tiny_bundle, tmp_path,
                                                                               ray_address):
    import ray

    from service.workers import NAMESPACE

    server = Server(tiny_bundle.directory, tmp_path / "home", ray_address, DREAMING_WORKER_STEP_DELAY="0.3",
                    DREAMING_JOB_DEADLINE="1").start()
    try:
        with server.client() as client:
            [worker] = client.get("/v1/info").json()["workers"]
            ray.kill(ray.get_actor(worker["name"], namespace=NAMESPACE), no_restart=True)  # dead for good
            replaced = wait_for(lambda: (w := client.get("/v1/info").json()["workers"][0])["name"] != worker["name"]
                                and w["state"] == "ready" and w, timeout=120)
            assert replaced["index"] == worker["index"]
            # the new actor dreams; a job longer than the deadline stops there, its best kept
            long = {**TINY_CONFIG, "iterations": 200}
            job = client.post("/v1/dreams", json={"feature": "2/6", "config": long}).json()
            done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['job_id']}").json())["status"]
                            in ("done", "failed") and j)
            result = done["result"]
            assert done["status"] == "done" and result["stopped"] == "deadline", done
            assert 1 <= result["iterations"] < 200 and result["frontier"]
            assert client.get("/v1/health").json()["status"] == "ok"
    finally:
        server.stop()
