"""Two bundles in one service: a real `dreaming serve --bundle llama=A --bundle gpt2=B` (a tiny llama and a tiny GPT-2
of another shape) with one Ray worker; every scoped route answers what the library gives for its bundle."""

import pytest
from serving import TINY_CONFIG, serving, wait_for, worker_pid

from dreaming.explorer import Explorer
from dreaming.features import Feature
from dreaming.similar import similar_features


@pytest.fixture(scope="module")
def bundles(tiny_bundle, tiny_gpt2_bundle):
    return {"llama": tiny_bundle, "gpt2": tiny_gpt2_bundle}


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    with serving([f"{name}={bundle.directory}" for name, bundle in bundles.items()],
                 tmp_path_factory.mktemp("home"), DREAMING_FEATURES_PER_CALL="2") as server:
        yield server


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def poll_job(client, path):
    return wait_for(lambda: (job := client.get(path).json())["status"] in ("done", "failed", "cancelled") and job)


def test_the_bundles_are_listed_the_first_being_the_default(client, bundles):
    listed = client.get("/v1/bundles").json()
    assert [(b["name"], b["default"]) for b in listed] == [("llama", True), ("gpt2", False)]
    for entry in listed:
        bundle = bundles[entry["name"]]
        assert entry["identity"] == bundle.identity and entry["model"] == bundle.manifest["model_name"]
        assert entry["transcoder"] == "cross_layer_transcoder"
        assert entry["maxima_tokens"] == bundle.manifest["maxima"]["tokens"]
        assert (entry["layers"], entry["features_per_layer"]) == tuple(bundle.maxima().shape)
        info = client.get(f"/v1/bundles/{entry['name']}/info").json()
        assert info["name"] == entry["name"] and info["identity"] == bundle.identity
    assert client.get("/v1/info").json()["name"] == "llama"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_scoped_feature_routes_equal_the_library(client, bundles, name):
    bundle, scope = bundles[name], f"/v1/bundles/{name}"
    explorer = Explorer.open(bundle.directory, device="cpu")
    arrays = bundle.maxima().arrays
    layers, per_layer = arrays["density"].shape
    listing = client.get(f"{scope}/features", params={"limit": 500}).json()
    assert listing["total"] == layers * per_layer
    assert [row["dataset_max"] for row in listing["features"]] == pytest.approx(
        arrays["max_activation"].flatten().tolist())

    page = client.get(f"{scope}/features/1/3").json()
    expected = explorer.compare("1/3")
    assert page["dataset_max"] == pytest.approx(expected["dataset_max"])
    assert [e["context"] for e in page["examples"]] == [e["context"] for e in expected["examples"]]
    similar = client.get(f"{scope}/features/1/3/similar", params={"top": 4}).json()
    assert [s["feature"] for s in similar] == [s["feature"] for s in similar_features(bundle.directory / "transcoder",
                                                                                      "1/3", top=4)]
    (measured,) = client.post(f"{scope}/activations", json={"feature": "1/3", "texts": ["the cat sat"]}).json()
    (direct,) = explorer.activation("1/3", ["the cat sat"])
    assert measured["token_activations"] == pytest.approx(direct["token_activations"], abs=1e-6)
    found = client.post(f"{scope}/search", json={"text": "the dog ran on the mat", "top": 5}).json()
    assert [hit["feature"] for hit in found] == [hit["feature"] for hit in explorer.search("the dog ran on the mat", 5)]


def test_a_dream_and_a_batch_on_each_bundle_complete_with_their_own_results(client, server, bundles):
    jobs = {}
    for name, bundle in bundles.items():
        job = client.post(f"/v1/bundles/{name}/dreams", json={"feature": "1/5", "config": TINY_CONFIG}).json()
        assert job["dataset_max"] == pytest.approx(bundle.maxima().dataset_max(Feature(1, 5)))
        jobs[name] = job["job_id"]
    assert jobs["llama"] != jobs["gpt2"]  # the same request on two bundles: two jobs
    batch = client.post("/v1/bundles/gpt2/batches", json={"features": ["0/2", "1/7"], "config": TINY_CONFIG}).json()
    for name, bundle in bundles.items():
        done = poll_job(client, f"/v1/bundles/{name}/jobs/{jobs[name]}")
        assert done["status"] == "done", done
        assert done["result"]["feature"] == "1/5"
        dataset_max = bundle.maxima().dataset_max(Feature(1, 5))
        assert done["result"]["dataset_max"] == done["dataset_max"] == pytest.approx(dataset_max)
        best = max(done["result"]["frontier"], key=lambda point: point["activation"])
        (direct,) = Explorer.open(bundle.directory, device="cpu").activation("1/5", [best["text"]])
        assert direct["activation"] == pytest.approx(best["activation"], rel=1e-4, abs=1e-5)  # its own model
        listed = client.get(f"/v1/bundles/{name}/jobs").json()["jobs"]
        assert jobs[name] in [job["job_id"] for job in listed]
        assert {jobs[other] for other in bundles if other != name}.isdisjoint(job["job_id"] for job in listed)
        page = client.get(f"/v1/bundles/{name}/features", params={"dreams": "true"}).json()
        assert "1/5" in [row["feature"] for row in page["features"]]
    finished = wait_for(lambda: (b := client.get(f"/v1/bundles/gpt2/batches/{batch['batch_id']}").json())["status"]
                        != "running" and b)
    assert finished["status"] == "done" and [job["result"]["feature"] for job in finished["jobs"]] == ["0/2", "1/7"]
    assert [b["batch_id"] for b in client.get("/v1/bundles/gpt2/batches").json()["batches"]] == [batch["batch_id"]]
    assert client.get("/v1/bundles/llama/batches").json()["total"] == 0

    import ray  # the one worker now holds the models of both bundles

    from service.workers import NAMESPACE

    [worker] = client.get("/v1/info").json()["workers"]
    described = ray.get(ray.get_actor(worker["name"], namespace=NAMESPACE).describe.remote(), timeout=60)
    assert set(described["loaded"]) == {bundle.identity for bundle in bundles.values()}
    assert worker_pid(worker) == described["pid"]


def test_unscoped_routes_mean_the_first_bundle(client):
    assert client.get("/v1/features/1/3").json() == client.get("/v1/bundles/llama/features/1/3").json()
    job = client.post("/v1/dreams", json={"feature": "2/1", "config": TINY_CONFIG}).json()
    assert client.get(f"/v1/bundles/llama/jobs/{job['job_id']}").status_code == 200
    assert client.get("/v1/features/2/1").status_code == 200 and client.get("/v1/bundles/gpt2/features/2/1"
                                                                            ).status_code == 404  # gpt2: 2 layers


def test_unknown_bundles_and_other_bundles_jobs_are_not_found(client):
    unknown = client.get("/v1/bundles/nope/features")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "unknown bundle 'nope': this server serves llama, gpt2"
    assert client.post("/v1/bundles/nope/dreams", json={"feature": "1/2"}).status_code == 404
    job = client.post("/v1/bundles/gpt2/dreams", json={"feature": "0/3", "config": TINY_CONFIG}).json()
    batch = client.post("/v1/bundles/gpt2/batches", json={"features": ["0/4"], "config": TINY_CONFIG}).json()
    for path in (f"/jobs/{job['job_id']}", f"/jobs/{job['job_id']}/events", f"/batches/{batch['batch_id']}",
                 f"/batches/{batch['batch_id']}/summary", f"/batches/{batch['batch_id']}/results"):
        assert client.get(f"/v1/bundles/gpt2{path}").status_code == 200
        for wrong in ("/v1", "/v1/bundles/llama"):
            missing = client.get(wrong + path)
            assert missing.status_code == 404 and "of bundle 'llama'" in missing.json()["detail"], path
    assert client.delete(f"/v1/jobs/{job['job_id']}").status_code == 404
    assert client.delete(f"/v1/batches/{batch['batch_id']}").status_code == 404


def test_the_bundle_list_and_its_one_line_errors(tmp_path, monkeypatch):
    from dreaming.cli import main
    from dreaming.bundle import parse_bundles

    assert parse_bundles(f"{tmp_path}/a, b={tmp_path}/c") == (("a", f"{tmp_path}/a"), ("b", f"{tmp_path}/c"))
    assert parse_bundles(None) == parse_bundles("") == (("default", None),)
    monkeypatch.delenv("DREAMING_BUNDLE", raising=False)
    with pytest.raises(SystemExit, match=r"^error: bundle names must be unique, but a is served twice"):
        main(["serve", "--bundle", str(tmp_path / "a"), "--bundle", f"a={tmp_path}/b"])
    with pytest.raises(SystemExit, match=r"^error: bundle name 'a b' .* is not URL-safe"):
        main(["serve", "--bundle", str(tmp_path / "a b")])
    monkeypatch.setenv("DREAMING_BUNDLE", f"x={tmp_path}/a,x={tmp_path}/b")
    with pytest.raises(SystemExit, match="served twice"):
        main(["serve"])
