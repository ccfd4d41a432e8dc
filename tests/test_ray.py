"""Ray placement: one CPU worker on a local Ray without GPUs, one worker per GPU on a two-node cluster (one
node with a fake GPU resource), a worker for a GPU node that joins a running service, a worker that refuses a
different bundle; and ray_cluster.yaml against the
cluster launcher's schema."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.exceptions import RayActorError
from serving import TINY_CONFIG, Server, wait_for

from dreaming.features import parse_feature
from service.settings import Settings
from service.workers import start_workers, stop_workers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2)
    yield
    ray.shutdown()


def test_cpu_only_cluster_gets_one_cpu_worker_that_dreams(local_ray, tiny_bundle, tmp_path):
    settings = Settings(database=tmp_path / "jobs.sqlite")
    workers = start_workers(settings, {tiny_bundle.identity: str(tiny_bundle.directory)})
    try:
        assert [worker.gpus for worker in workers] == [0]
        actor = workers[0].actor
        assert ray.get(actor.describe.remote())["device"] == "cpu"
        maxima = tiny_bundle.maxima()
        maxes = [maxima.dataset_max(parse_feature(feature)) for feature in ("1/2", "2/5")]
        results = ray.get(actor.dream.remote("call-1", tiny_bundle.identity, ["1/2", "2/5"], TINY_CONFIG, maxes))
        assert ray.get(actor.collect.remote("call-1")) == results  # kept for a caller that lost the reply
        assert [result["feature"] for result in results] == ["1/2", "2/5"]
        assert all(result["frontier"] and result["dataset_max"] == m for result, m in zip(results, maxes))
    finally:
        stop_workers(workers)


def test_worker_refuses_a_bundle_with_another_identity(local_ray, tiny_bundle, tmp_path):
    settings = Settings(database=tmp_path / "jobs.sqlite")
    [worker] = start_workers(settings, {"some-other-bundle": str(tiny_bundle.directory)})
    with pytest.raises(RayActorError, match="copy the same bundle to every node"):
        ray.get(worker.actor.describe.remote(), timeout=120)


@pytest.mark.slow  # a two-node Ray cluster: `make test-slow`
def test_one_worker_per_gpu_on_a_two_node_cluster(tiny_bundle, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                           "object_store_memory": 100 * 1024**2})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=100 * 1024**2)
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        assert ray.cluster_resources()["GPU"] == 2
        settings = Settings(database=tmp_path / "jobs.sqlite")
        workers = start_workers(settings, {tiny_bundle.identity: str(tiny_bundle.directory)})
        described = ray.get([worker.actor.describe.remote() for worker in workers], timeout=180)
        assert [worker.gpus for worker in workers] == [1, 1]
        assert {d["node"] for d in described} == {gpu_node.node_id}
        assert sorted(d["gpu_ids"][0] for d in described) == [0, 1]  # each its own GPU
        stop_workers(workers)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a node joins a running cluster: `make test-slow`
def test_a_gpu_that_joins_the_cluster_gets_a_worker_without_a_restart(tiny_bundle, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                           "object_store_memory": 100 * 1024**2})
    server = Server(tiny_bundle.directory, tmp_path / "home", cluster.address, DREAMING_GPU_CHECK_SECONDS="0.5")
    try:
        server.start()
        with server.client() as client:
            assert [worker["gpus"] for worker in client.get("/v1/info").json()["workers"]] == [0]  # a CPU actor
            cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 1024**2)
            workers = wait_for(lambda: len(w := client.get("/v1/info").json()["workers"]) == 2
                               and w[1]["state"] == "ready" and w, timeout=180)
            assert [worker["gpus"] for worker in workers] == [0, 1]
            assert client.get("/v1/health").json()["workers_ready"] == 2
    finally:
        server.stop()
        cluster.shutdown()


def test_ray_cluster_yaml_validates_against_the_launcher_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any(node["resources"].get("GPU", 0) >= 1 for node in types.values())
    # Ray's default AMI has a driver too old for torch 2.13's CUDA 13: every node names its image, GPU nodes
    # check their driver before Ray starts
    assert all(node["node_config"].get("ImageId") for node in types.values())
    assert all("580" in " ".join(node.get("initialization_commands", [])) for node in types.values()
               if node["resources"].get("GPU", 0))
    # the bundle is shipped, and named: no node converts the model or builds a bundle of its own
    serve = " ".join(config["head_start_ray_commands"])
    assert "DREAMING_BUNDLE=" in serve and "DREAMING_DB=" in serve and "dreaming serve" in serve
    assert all("DREAMING_HOME=" in " ".join(config[key]) for key in ("head_start_ray_commands",
                                                                       "worker_start_ray_commands"))
