"""End to end: a real `dreaming serve` process (uvicorn) on the tiny bundle, its worker in a local Ray, the real
EPO engine with a tiny config, and a real HTTP client."""

import asyncio
import json

import httpx
import pytest
from serving import API_KEY, TINY_CONFIG, serving, wait_for

from service.store import SQLiteStore


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with serving(tiny_bundle.directory, tmp_path_factory.mktemp("home"), DREAMING_FEATURES_PER_CALL="2",
                 DREAMING_WORKER_STEP_DELAY="0.1", DREAMING_MAX_BATCH_FEATURES="8", DREAMING_MAX_TEXTS="4",
                 DREAMING_MAX_TEXT_CHARS="200", DREAMING_MAX_REQUEST_BYTES="4096",
                 DREAMING_MAX_REQUEST_TOKENS="100") as server:
        yield server


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def poll_job(client, job_id):
    return wait_for(lambda: (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("done", "failed") and job)


def same_search(a: dict, b: dict) -> bool:
    """Two dream results (JSON) of one search: the same prompts and figures, history and final population."""
    figures = lambda r: [(p["token_ids"], round(p["activation"], 6), round(p["cross_entropy"], 6))  # noqa: E731
                         for p in r["frontier"] + r["diverse"]]
    members = lambda r: [task["members"]["ids"] for task in r["state"]["tasks"]]  # noqa: E731
    return figures(a) == figures(b) and a["history"] == b["history"] and members(a) == members(b)


def test_dream_submit_poll_result_then_cached(client, tiny_bundle):
    first = client.post("/v1/dreams", json={"feature": "1/2", "config": TINY_CONFIG})
    assert first.status_code == 200 and first.json()["status"] in ("queued", "running")
    job = poll_job(client, first.json()["job_id"])
    assert job["status"] == "done" and job["attempts"] == 1, job
    result = job["result"]
    assert result["feature"] == "1/2" and result["config"]["iterations"] == 3
    assert result["frontier"] and set(result["frontier"][0]) >= {"prompt", "text", "token_ids", "activation",
                                                                 "fraction_of_max", "cross_entropy"}
    assert "best_fluent" in result
    ces = [point["cross_entropy"] for point in result["frontier"]]
    assert ces == sorted(ces)

    again = client.post("/v1/dreams", json={"feature": "1/2", "config": TINY_CONFIG}).json()
    assert again["job_id"] == job["job_id"] and again["status"] == "done" and again["result"] == result

    best = max(result["frontier"], key=lambda point: point["activation"])
    measured = client.post("/v1/activations", json={"feature": "1/2", "texts": [best["text"]]}).json()[0]
    assert measured["token_ids"] == best["token_ids"]
    assert measured["activation"] == pytest.approx(best["activation"], rel=1e-4, abs=1e-5)

    more = client.post("/v1/dreams", json={"feature": "1/2", "config": TINY_CONFIG, "more": True})
    assert more.status_code == 200 and more.json()["job_id"] != job["job_id"]
    longer = poll_job(client, more.json()["job_id"])["result"]  # the stored run, continued for 3 iterations
    assert longer["config"]["iterations"] == 6 and longer["iterations"] == 6
    assert longer["history"]["best"][:3] == result["history"]["best"]
    # equal to one run of 6 iterations, computed here apart by the library (the server's job for 6 would be the
    # continued one: the same key)
    from dreaming.engine import DreamConfig
    from dreaming.explorer import Explorer

    (one_run,) = Explorer.open(tiny_bundle.directory, device="cpu").dream_many(
        ["1/2"], DreamConfig(**{**TINY_CONFIG, "iterations": 6}), read_cache=False, write_cache=False)
    assert same_search(longer, one_run.model_dump(mode="json"))
    nothing = client.post("/v1/dreams", json={"feature": "0/1", "config": TINY_CONFIG, "more": True})
    assert nothing.status_code == 409 and "nothing to continue" in nothing.json()["detail"]

    page = client.get("/v1/features/1/2").json()
    assert page["feature"] == "1/2" and page["dataset_max"] > 0 and page["examples"]
    # the service's result, plus any dream cached on the bundle by `dreaming dream` (other tests make some)
    assert {point["text"] for point in result["frontier"]} <= {d["text"] for d in page["dreams"]}


def test_progress_is_reported_while_running(client):
    job = client.post("/v1/dreams", json={"feature": "2/3", "config": {**TINY_CONFIG, "iterations": 12}}).json()
    progress = wait_for(lambda: ((p := client.get(f"/v1/jobs/{job['job_id']}").json()["progress"]) or {}).get("done")
                        and p)
    assert progress["total"] == 12 and 1 <= progress["done"] <= 12 and progress["eta_seconds"] is not None
    assert poll_job(client, job["job_id"])["status"] == "done"


def test_batch_of_several_features_completes(client):
    features = ["0/1", "0/2", "1/5", "2/7", "2/8"]
    batch = client.post("/v1/batches", json={"features": features, "config": {**TINY_CONFIG, "seed": 7}}).json()
    assert [job["feature"] for job in batch["jobs"]] == features
    done = wait_for(lambda: (b := client.get(f"/v1/batches/{batch['batch_id']}").json())["status"] != "running" and b)
    assert done["status"] == "done" and done["counts"]["done"] == len(features)
    assert [job["result"]["feature"] for job in done["jobs"]] == features


def test_browse_equals_a_direct_filter_of_the_maxima(client, tiny_bundle):
    arrays = tiny_bundle.maxima().arrays
    layers, per_layer = arrays["density"].shape
    every = [(layer, index) for layer in range(layers) for index in range(per_layer)]

    def listed(**params):
        rows, offset = [], 0
        while True:  # page by page: the pages put together are the whole listing, each row once
            page = client.get("/v1/features", params={**params, "offset": offset, "limit": 7}).json()
            rows += page["features"]
            offset += 7
            if offset >= page["total"]:
                assert len(rows) == page["total"]
                return rows

    live = [f"{l}/{i}" for l, i in every if arrays["active_count"][l, i] > 0]
    assert [row["feature"] for row in listed(live="true")] == live
    by_density = sorted((at for at in every if at[0] == 1), key=lambda at: -float(arrays["density"][at]))
    assert [row["feature"] for row in listed(layer=1, sort="density")] == [f"{l}/{i}" for l, i in by_density]
    dense = [f"{l}/{i}" for l, i in every if arrays["density"][l, i] > 0.1]
    assert [row["feature"] for row in listed(dense="true")] == dense
    row = listed(layer=2)[3]
    assert row["feature"] == "2/3" and row["dataset_max"] == pytest.approx(float(arrays["max_activation"][2, 3]))

    job = client.post("/v1/dreams", json={"feature": "2/9", "config": {**TINY_CONFIG, "seed": 5}}).json()
    assert poll_job(client, job["job_id"])["status"] == "done"
    dreamed = listed(dreams="true")
    assert "2/9" in [row["feature"] for row in dreamed] and all(row["has_dreams"] for row in dreamed)
    for row in dreamed:
        page = client.get(f"/v1/features/{row['feature']}").json()
        assert page["dreams"] or page["stale_dreams"]


def test_similar_features_and_batch_views(client, tiny_bundle):
    from dreaming.similar import similar_features

    similar = client.get("/v1/features/1/2/similar", params={"top": 5}).json()
    expected = similar_features(tiny_bundle.directory / "transcoder", "1/2", top=5)
    assert [s["feature"] for s in similar] == [e["feature"] for e in expected]
    assert [s["cosine"] for s in similar] == pytest.approx([e["cosine"] for e in expected])

    features = ["0/4", "1/6"]
    batch = client.post("/v1/batches", json={"features": features, "config": {**TINY_CONFIG, "seed": 11}}).json()
    wait_for(lambda: client.get(f"/v1/batches/{batch['batch_id']}/summary").json()["status"] == "done")
    summary = client.get(f"/v1/batches/{batch['batch_id']}/summary").json()
    full = client.get(f"/v1/batches/{batch['batch_id']}").json()
    for light, job in zip(summary["jobs"], full["jobs"]):
        best = job["result"]["best_fluent"]
        assert light["feature"] == job["feature"] and "result" not in light
        assert light["best_fluent_fraction_of_max"] == (best["fraction_of_max"] if best else None)
    as_csv = client.get(f"/v1/batches/{batch['batch_id']}/results", params={"format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    lines = as_csv.text.splitlines()
    assert lines[0].startswith("feature,status,best_fluent_fraction_of_max") and len(lines) == 3
    assert client.get(f"/v1/batches/{batch['batch_id']}/results", params={"format": "xml"}).status_code == 422
    as_json = client.get(f"/v1/batches/{batch['batch_id']}/results").json()
    assert as_json == full["jobs"]


def test_activations_and_search(client):
    measured = client.post("/v1/activations", json={"feature": "1/2", "texts": ["the cat sat", "dog ran fast"]})
    assert measured.status_code == 200
    first = measured.json()[0]
    assert first["tokens"] == ["<bos>", "the", "cat", "sat"] and first["token_activations"][0] == 0
    assert first["activation"] == max(first["token_activations"][1:])
    found = client.post("/v1/search", json={"text": "the cat sat on the mat", "top": 5}).json()
    assert 1 <= len(found) <= 5
    fractions = [item["fraction_of_max"] for item in found]
    assert fractions == sorted(fractions, reverse=True) and all(f > 0 for f in fractions)


def test_activations_inside_a_template(client):
    body = {"feature": "1/2", "texts": ["dog ran"], "template": "the cat {prompt} on the mat"}
    measured = client.post("/v1/activations", json=body)
    assert measured.status_code == 200, measured.text
    (inside,) = measured.json()
    (whole,) = client.post("/v1/activations", json={"feature": "1/2", "texts": [inside["text"]]}).json()
    assert inside["text"] == "the cat dog ran on the mat" and inside["counted_from"] == 3 and whole["counted_from"] == 1
    assert inside["token_activations"] == pytest.approx(whole["token_activations"], abs=1e-6)
    assert inside["activation"] == max(inside["token_activations"][3:])
    assert inside["template_activation"] == max(inside["token_activations"][1:3])


def test_concurrent_identical_requests_make_one_job(server):
    body = {"feature": "0/9", "config": {**TINY_CONFIG, "seed": 123}}

    async def hundred():
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/dreams", json=body) for _ in range(100)))

    responses = asyncio.run(hundred())
    assert {response.status_code for response in responses} == {200}
    assert len({response.json()["job_id"] for response in responses}) == 1
    store = SQLiteStore(server.home / "service" / "jobs.sqlite")
    rows = store._db.execute("SELECT COUNT(*) FROM jobs WHERE feature = '0/9'").fetchone()[0]
    store.close()
    assert rows == 1


def big_text(chars):
    return "the " * (chars // 4)


BAD_REQUESTS = [
    # (what, method, path, json body, headers, status, words expected in the message)
    ("no api key", "post", "/v1/dreams", {"feature": "1/2"}, {"X-API-Key": ""}, 401, "API key"),
    ("wrong api key", "post", "/v1/dreams", {"feature": "1/2"}, {"X-API-Key": "nope"}, 401, "API key"),
    ("malformed feature", "post", "/v1/dreams", {"feature": "12-3"}, {}, 422, "LAYER/INDEX"),
    ("layer out of range", "post", "/v1/dreams", {"feature": "9/0"}, {}, 404, "0..2"),
    ("index out of range", "post", "/v1/dreams", {"feature": "1/999"}, {}, 404, "0..23"),
    ("too many iterations", "post", "/v1/dreams", {"feature": "1/2", "config": {"iterations": 10**6}}, {}, 422,
     "iterations"),
    ("zero population", "post", "/v1/dreams", {"feature": "1/2", "config": {"population": 0}}, {}, 422, "population"),
    ("prompt too long", "post", "/v1/dreams", {"feature": "1/2", "config": {"prompt_length": 10**4}}, {}, 422,
     "prompt_length"),
    ("template without slot", "post", "/v1/dreams", {"feature": "1/2", "config": {"template": "hi"}}, {}, 422,
     "{prompt}"),
    ("a model named in the config", "post", "/v1/dreams", {"feature": "1/2", "config": {"model": "gpt2"}}, {}, 422,
     "model"),
    ("a path in the body", "post", "/v1/dreams", {"feature": "1/2", "bundle": "/etc"}, {}, 422, "bundle"),
    ("no feature", "post", "/v1/dreams", {}, {}, 422, "feature"),
    ("empty batch", "post", "/v1/batches", {"features": []}, {}, 422, "features"),
    ("a dream too costly", "post", "/v1/dreams",
     {"feature": "1/2", "config": {"iterations": 5000, "population": 64, "children": 512}}, {}, 422, "too costly"),
    ("a batch too costly", "post", "/v1/batches",
     {"features": [f"1/{i}" for i in range(8)], "config": {"iterations": 5000}}, {}, 422, "batch too costly"),
    ("a template too long", "post", "/v1/dreams",
     {"feature": "1/2", "config": {"template": "the " * 300 + "{prompt}"}}, {}, 422, "template too long"),
    ("batch too large", "post", "/v1/batches", {"features": [f"1/{i}" for i in range(9)]}, {}, 422, "at most 8"),
    ("unknown feature in a batch", "post", "/v1/batches", {"features": ["1/2", "1/99"]}, {}, 404, "1/99"),
    ("too many texts", "post", "/v1/activations", {"feature": "1/2", "texts": ["the"] * 5}, {}, 422, "at most 4"),
    ("text too long", "post", "/v1/activations", {"feature": "1/2", "texts": [big_text(400)]}, {}, 422,
     "at most 200"),
    ("too many tokens in all", "post", "/v1/activations", {"feature": "1/2", "texts": ["the cat sat " * 15] * 4}, {},
     422, "at most 100 per request"),
    ("blank text", "post", "/v1/activations", {"feature": "1/2", "texts": ["  "]}, {}, 422, "empty"),
    ("unknown feature for activations", "post", "/v1/activations", {"feature": "3/0", "texts": ["the"]}, {}, 404,
     "0..2"),
    ("template without slot", "post", "/v1/activations", {"feature": "1/2", "texts": ["the"], "template": "hi"}, {},
     422, "{prompt}"),
    ("prompt merging with its template", "post", "/v1/activations",
     {"feature": "1/2", "texts": ["t sat"], "template": "the ca{prompt}"}, {}, 422, "merges with the template"),
    ("chat template of a model without one", "post", "/v1/activations",
     {"feature": "1/2", "texts": ["the"], "template": "chat"}, {}, 422, "no chat template"),
    ("search text too long", "post", "/v1/search", {"text": big_text(400)}, {}, 422, "at most 200"),
    ("search top too large", "post", "/v1/search", {"text": "the", "top": 1000}, {}, 422, "at most 100"),
    ("body too large", "post", "/v1/activations", {"feature": "1/2", "texts": [big_text(5000)]}, {}, 413,
     "too large"),
    ("unknown job", "get", "/v1/jobs/nope", None, {}, 404, "nope"),
    ("unknown batch", "get", "/v1/batches/nope", None, {}, 404, "nope"),
    ("unknown feature page", "get", "/v1/features/1/24", None, {}, 404, "0..23"),
    ("negative feature page", "get", "/v1/features/-1/0", None, {}, 404, "0..2"),
    ("non-numeric feature page", "get", "/v1/features/a/b", None, {}, 422, "layer"),
    ("browse an unknown layer", "get", "/v1/features?layer=3", None, {}, 422, "0..2"),
    ("browse by an unknown order", "get", "/v1/features?sort=name", None, {}, 422, "sort"),
    ("browse pages too long", "get", "/v1/features?limit=501", None, {}, 422, "limit"),
    ("browse from a negative offset", "get", "/v1/features?offset=-1", None, {}, 422, "offset"),
    ("similar to an unknown feature", "get", "/v1/features/1/24/similar", None, {}, 404, "0..23"),
    ("too many similar features", "get", "/v1/features/1/2/similar?top=101", None, {}, 422, "top"),
    ("events of an unknown job", "get", "/v1/jobs/nope/events", None, {}, 404, "nope"),
    ("jobs of an unknown status", "get", "/v1/jobs?status=lost", None, {}, 422, "status"),
    ("batch pages too long", "get", "/v1/batches?limit=501", None, {}, 422, "limit"),
    ("cancel an unknown job", "delete", "/v1/jobs/nope", None, {}, 404, "nope"),
    ("cancel without the key", "delete", "/v1/jobs/nope", None, {"X-API-Key": ""}, 401, "API key"),
    ("summary of an unknown batch", "get", "/v1/batches/nope/summary", None, {}, 404, "nope"),
    ("results of an unknown batch", "get", "/v1/batches/nope/results", None, {}, 404, "nope"),
]


@pytest.mark.parametrize("what,method,path,body,headers,status,words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_gets_its_4xx(client, what, method, path, body, headers, status, words):
    response = client.request(method.upper(), path, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert words in response.text


def test_chunked_body_over_the_limit_and_invalid_json(client):
    chunks = (b'{"feature": "1/2", "texts": ["' + b"the " * 300 + b'"]}' for _ in range(5))
    assert client.post("/v1/activations", content=chunks).status_code == 413
    assert client.post("/v1/dreams", content=b"{not json", headers={"content-type": "application/json"}
                       ).status_code == 422


def test_server_stays_healthy_after_bad_input(client):
    for _, method, path, body, headers, _, _ in BAD_REQUESTS:
        client.request(method.upper(), path, json=body, headers=headers)
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["workers_ready"] == 1 and health["jobs"]["failed"] == 0
    job = client.post("/v1/dreams", json={"feature": "2/2", "config": TINY_CONFIG}).json()
    assert poll_job(client, job["job_id"])["status"] == "done"


def test_api_key_as_bearer_token_and_gets_without_key(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"feature": "1/2", "texts": ["the cat"]}
        assert client.post("/v1/activations", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
                           ).status_code == 200
        assert client.post("/v1/activations", json=body).status_code == 401
        assert client.get("/v1/health").status_code == 200


def test_info_and_openapi(client, tiny_bundle):
    info = client.get("/v1/info").json()
    assert info["bundle"]["transcoder"]["layers"] == 3 and info["api_key_required"] is True
    assert "bundle" not in info["bundle"]  # no server path in an answer
    assert info["bundle"]["model"]["source"] == "model" and "/" not in json.dumps(info["bundle"]["model"])
    assert info["bundle"]["transcoder"]["reference"] == "transcoder"
    assert str(tiny_bundle.directory.parent) not in json.dumps(info)  # nothing of the server's disk
    assert [set(worker) <= {"index", "gpus", "name", "state", "device", "error"} for worker in info["workers"]] == [True]
    assert info["limits"]["max_batch_features"] == 8 and info["dream_config"]["iterations"] >= 1
    openapi = client.get("/openapi.json").json()
    assert "/v1/dreams" in openapi["paths"]
    schemes = openapi["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"apiKey", "http"}
    assert openapi["paths"]["/v1/dreams"]["post"]["security"]  # declared on the keyed endpoints
    untyped = [f"{method.upper()} {path}" for path, methods in openapi["paths"].items() for method, op in methods.items()
               if "application/json" in op["responses"].get("200", {}).get("content", {})
               and not op["responses"]["200"]["content"]["application/json"]["schema"]]
    assert untyped == []  # every JSON answer has a declared shape
    malformed = client.post("/v1/dreams", json={"feature": "1/2", "config": {"population": 0}}).json()
    assert isinstance(malformed["detail"], str) and "config.population" in malformed["detail"]  # one error shape
    assert client.get("/docs").status_code == 200


def test_eta_extrapolates_and_keeps_within_a_time_budget():
    from service.scheduler import eta

    assert eta({"done": 2, "total": 10, "seconds": 4.0})["eta_seconds"] == 16.0
    assert eta({"done": 2, "total": 10, "seconds": 4.0}, budget_seconds=10)["eta_seconds"] == 6.0
    assert eta({"done": 2, "total": 10, "seconds": 12.0}, budget_seconds=10)["eta_seconds"] == 0.0
    assert eta({"done": 0, "total": 10, "seconds": 1.0}, budget_seconds=10)["eta_seconds"] is None


def test_jobs_and_batches_are_listed(client):
    everything = client.get("/v1/jobs", params={"limit": 500}).json()
    assert everything["total"] == len(everything["jobs"]) > 0 and "result" not in everything["jobs"][0]
    done = client.get("/v1/jobs", params={"status": "done", "limit": 2}).json()
    assert done["total"] == sum(job["status"] == "done" for job in everything["jobs"])
    assert len(done["jobs"]) == min(2, done["total"]) and {job["status"] for job in done["jobs"]} <= {"done"}
    batches = client.get("/v1/batches").json()
    assert batches["total"] >= 1 and batches["batches"][0]["jobs"] >= 1


def test_prometheus_metrics(client):
    text = client.get("/metrics").text
    counts = client.get("/v1/health").json()["jobs"]
    for status, count in counts.items():
        assert f'dreaming_jobs{{status="{status}"}} {float(count)}' in text
    assert 'dreaming_workers{state="ready"} 1.0' in text and "dreaming_interactive_waiting 0.0" in text
    assert 'dreaming_call_seconds_count{outcome="iterations"}' in text  # the dreams of the earlier tests


def test_answers_cut_server_paths_to_their_last_part_but_keep_hub_references():
    from service.routes.ops import without_paths

    shown = without_paths({"reference": "/srv/bundles/clt", "hub": "hf://owner/repo/sub@main", "list": ["/a/b.yaml"],
                           "warning": "/srv/t/config.yaml: made for 'x', used with 'y'", "layers": 3})
    assert shown == {"reference": "clt", "hub": "hf://owner/repo/sub@main", "list": ["b.yaml"],
                     "warning": "config.yaml: made for 'x', used with 'y'", "layers": 3}

