"""The web pages in a real headless Chromium (Playwright driving Debian's `chromium`, offline), against a real
`dreaming serve` on the tiny bundle (the default), a second one, the tiny model's neurons (no decoders) and SAEs of
some layers, with its Ray worker: what the pages show must be what the API returns."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from serving import API_KEY, TINY_CONFIG, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No background networking: this machine's closed network refuses it, and it would log errors.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DREAM_SETTINGS = {name: value for name, value in TINY_CONFIG.items() if name != "iterations"}


@pytest.fixture(scope="module")
def neurons_bundle(tiny_bundle, tmp_path_factory):
    """The tiny model's MLP neurons as a dictionary: no decoders."""
    from test_bundle_create import write_corpus

    from dreaming.build.create import create_bundle

    root = tmp_path_factory.mktemp("neurons")
    return create_bundle(str(tiny_bundle.directory / "model"), "neurons", str(write_corpus(root / "corpus.jsonl", 20)),
                         root / "bundle", device="cpu", progress=False)


@pytest.fixture(scope="module")
def sae_bundle(tiny_bundle, tmp_path_factory):
    """Residual-stream SAEs (written by SAELens) for layers 0 and 2 of the tiny model's three."""
    from test_bundle_create import write_corpus
    from test_saelens import saved

    from dreaming.build.create import create_bundle

    root = tmp_path_factory.mktemp("sae")
    saved(root, "standard")
    return create_bundle(str(tiny_bundle.directory / "model"), str(root / "standard"),
                         str(write_corpus(root / "corpus.jsonl", 20)), root / "bundle", device="cpu", progress=False)


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_gpt2_bundle, neurons_bundle, sae_bundle, tmp_path_factory):
    bundles = [tiny_bundle.directory, f"second={tiny_gpt2_bundle.directory}", f"neurons={neurons_bundle.directory}",
               f"sae={sae_bundle.directory}"]
    with serving(bundles, tmp_path_factory.mktemp("home"), DREAMING_FEATURES_PER_CALL="2") as server:
        yield server


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("no chromium on this machine: `make setup` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """A browser tab on the server (with the API key saved, unless `key` is None) that records console errors."""

    def __init__(self, browser, server, key: str | None = API_KEY):
        self.context = browser.new_context()
        if key is not None:
            self.context.add_init_script(f"localStorage.setItem('dreaming-api-key', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", lambda response: response.status >= 400 and self.errors.append(
            f"{response.status} {response.url}"))
        self.url = server.url

    def open(self, path: str):
        self.page.goto(self.url + path)
        self.page.wait_for_selector("body[data-ready=true]")
        return self.page

    def tokens(self, selector: str) -> list[tuple[str, float]]:
        shaded = self.page.eval_on_selector_all(
            f"{selector} >> .tok", "tokens => tokens.map(t => [t.textContent, Number(t.dataset.activation)])")
        return [tuple(token) for token in shaded]

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser, server):
    tab = Tab(browser, server)
    yield tab
    tab.close()


def shown(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "→")


def test_search_then_feature_page_shows_the_api_values(tab, client):
    page = tab.open("/")
    page.fill("#search-text", "the cat sat on the mat")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#search-results tbody a.feature")
    found = client.post("/v1/search", json={"text": "the cat sat on the mat", "top": 20}).json()
    rows = page.eval_on_selector_all("#search-results tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
    assert [row[0] for row in rows] == [hit["feature"] for hit in found]
    assert rows[0][1] == f"{100 * found[0]['fraction_of_max']:.1f}%"

    page.click("#search-results tbody a.feature >> nth=0")
    page.wait_for_url(f"**/features/{found[0]['feature']}")
    page.wait_for_selector("body[data-ready=true]")
    feature = client.get(f"/v1/features/{found[0]['feature']}").json()
    assert page.inner_text("#feature-id") == feature["feature"]
    examples = page.query_selector_all("#examples-table tr.example")
    assert len(examples) == len(feature["examples"]) > 0
    for i, example in enumerate(feature["examples"]):
        shaded = tab.tokens(f"#examples-table tr.example >> nth={i}")
        assert shaded == [(shown(text), value) for text, value in zip(example["tokens"], example["activations"])]
        marked = page.eval_on_selector_all(f"#examples-table tr.example >> nth={i} >> .tok.max",
                                           "tokens => tokens.map(t => Number(t.dataset.activation))")
        assert marked == [example["activation"]] == [example["activations"][example["max_index"]]]
    interval_examples = [example for interval in feature["intervals"] for example in interval["examples"]]
    assert len(page.query_selector_all("#intervals-table tr.interval")) == len(interval_examples) > 0
    for i, example in enumerate(interval_examples):
        shaded = tab.tokens(f"#intervals-table tr.interval >> nth={i}")
        assert shaded == [(shown(text), value) for text, value in zip(example["tokens"], example["activations"])]
    assert page.eval_on_selector_all("#top-tokens .tag", "tags => tags.map(t => t.textContent)") == \
        [shown(token) for token, _ in feature["output_tokens"]["top"]]
    assert page.is_visible("#source-chart") and page.is_visible("#pareto-chart")
    similar = client.get(f"/v1/features/{found[0]['feature']}/similar?top=10").json()
    assert page.eval_on_selector_all("#similar-table a.feature", "links => links.map(a => a.textContent)") == \
        [entry["feature"] for entry in similar]
    assert tab.errors == []


def test_search_lists_positional_features_last_unless_ordered_by_fraction_and_badges_them(tab, client):
    page = tab.open("/")
    text = "sun cat sat on the mat"  # 1/2, a positional feature, peaks at its first token
    for order in ("content", "fraction"):
        page.select_option("#search-order", order)
        page.fill("#search-text", text)
        page.click("#search-form button[type=submit]")
        found = client.post("/v1/search", json={"text": text, "top": 20, "order": order}).json()
        first = found[0]["feature"]
        page.wait_for_function(f"document.querySelector('#search-results tbody a.feature')?.textContent === '{first}'")
        rows = page.eval_on_selector_all("#search-results tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
        assert [row[0] for row in rows] == [hit["feature"] for hit in found]
        assert [row[-1] == "fires on a text's first token" for row in rows] == [hit["first_token"] for hit in found]
        note = page.inner_text("#search-note")
        assert ("are listed last" in note) == (order == "content") and "fire on a text's first token" in note
    assert first == "1/2"  # by fraction alone the positional feature comes first; content first, past the top 20
    assert found[0]["positional"] and not any(hit["positional"] for hit in client.post(
        "/v1/search", json={"text": text, "top": 20}).json())
    assert tab.errors == []


def test_a_positional_feature_is_explained_and_dreamed_in_the_bare_template(tab, client):
    page = tab.open("/features/1/2")
    assert page.is_visible("#first-token") and "fires on a text's first token" in page.inner_text("#first-token")
    assert "bare template {prompt}" in page.inner_text("#first-token")
    page.fill("#dream-iterations", "3")
    page.click("#dream-form summary")
    chat = {name: value for name, value in DREAM_SETTINGS.items() if name != "template"}  # the chat template
    page.fill("#dream-config", json.dumps(chat))
    page.click("#dream-button")
    page.wait_for_function("document.querySelector('#dream-progress').textContent.startsWith('done')")
    page.wait_for_selector("#frontier-table tr.dream")
    job = client.post("/v1/dreams", json={"feature": "1/2", "config": {**chat, "iterations": 3}}).json()
    assert job["status"] == "done" and job["result"]["config"]["template"] == "{prompt}"  # the same job
    yardstick = job["result"]["yardstick"]
    assert yardstick.startswith("dataset max at a text's first token: dreamed with the prompt first")
    feature = client.get("/v1/features/1/2").json()
    assert feature["first_token"] and yardstick in {dream["yardstick"] for dream in feature["dreams"]}
    assert f"Yardstick: {yardstick}." in page.inner_text("#dream-yardstick")
    best = page.eval_on_selector_all("#best-table tr.dream", "rows => rows.map(r => r.innerText.split('\\t'))")
    expected = [(name, feature[key]) for name, key in (("best fluent", "best_fluent"), ("best novel", "best_novel"))
                if feature[key]]
    assert [(row[0], row[1]) for row in best] == [(name, f"{100 * dream['fraction_of_max']:.1f}%")
                                                  for name, dream in expected]
    assert tab.errors == []


def test_the_second_bundle_picked_on_the_home_page_is_carried_to_its_feature_page(tab, client):
    page = tab.open("/")
    assert page.is_visible("#bundle-picker")
    page.select_option("#bundle-picker", "second")
    page.wait_for_url("**/?bundle=second")
    page.wait_for_selector("body[data-ready=true]")
    listing = client.get("/v1/bundles/second/features", params={"live": "true", "limit": 50}).json()
    assert page.eval_on_selector_all("#browse-table a.feature", "links => links.map(a => a.textContent)") == \
        [row["feature"] for row in listing["features"]]
    page.fill("#search-text", "the dog ran on the mat")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#search-results tbody a.feature")
    found = client.post("/v1/bundles/second/search", json={"text": "the dog ran on the mat", "top": 20}).json()
    assert found != client.post("/v1/search", json={"text": "the dog ran on the mat", "top": 20}).json()
    rows = page.eval_on_selector_all("#search-results tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
    assert [row[0] for row in rows] == [hit["feature"] for hit in found]

    page.click("#search-results tbody a.feature >> nth=0")
    page.wait_for_url(f"**/features/{found[0]['feature']}?bundle=second")
    page.wait_for_selector("body[data-ready=true]")
    feature = client.get(f"/v1/bundles/second/features/{found[0]['feature']}").json()
    assert len(page.query_selector_all("#examples-table tr.example")) == len(feature["examples"]) > 0
    for i, example in enumerate(feature["examples"]):
        shaded = tab.tokens(f"#examples-table tr.example >> nth={i}")
        assert shaded == [(shown(text), value) for text, value in zip(example["tokens"], example["activations"])]
    assert page.get_attribute("header a.brand", "href") == "/?bundle=second"
    assert page.inner_text("#feature-bundle") == "of bundle second" and "(second)" in page.title()
    assert tab.errors == []


def test_a_neurons_page_says_it_has_no_decoders(tab, client):
    """A dictionary without decoders (a model's neurons): the page loads without an error and says so where the
    output tokens and the similar features would be; the API's similar is a 404 saying why."""
    feature = client.get("/v1/bundles/neurons/features", params={"live": "true", "limit": 1}).json()["features"][0]
    similar = client.get(f"/v1/bundles/neurons/features/{feature['feature']}/similar")
    assert similar.status_code == 404 and "has no decoders" in similar.json()["detail"]
    page = tab.open(f"/features/{feature['feature']}?bundle=neurons")
    assert all("no decoders" in page.inner_text(place) for place in ("#top-tokens", "#bottom-tokens", "#similar-table"))
    assert tab.errors == []


def test_previous_and_next_step_over_the_layers_a_dictionary_lacks(tab, client):
    """An SAE for layers 0 and 2: the next feature after layer 0's last is 2/0, and back."""
    last = client.get("/v1/bundles/sae/info").json()["bundle"]["transcoder"]["features_per_layer"] - 1
    page = tab.open(f"/features/0/{last}?bundle=sae")
    assert page.get_attribute("#next-feature", "href") == "/features/2/0?bundle=sae"
    page = tab.open("/features/2/0?bundle=sae")
    assert page.get_attribute("#previous-feature", "href") == f"/features/0/{last}?bundle=sae"
    assert page.get_attribute("#next-feature", "href") == "/features/2/1?bundle=sae"
    assert tab.errors == []


def test_browse_filters_and_pages(tab, client):
    page = tab.open("/")
    listing = client.get("/v1/features", params={"live": "true", "limit": 50}).json()
    features = page.eval_on_selector_all("#browse-table a.feature", "links => links.map(a => a.textContent)")
    assert features == [row["feature"] for row in listing["features"]]
    assert page.inner_text("#browse-range") == f"1–{min(50, listing['total'])} of {listing['total']}"
    if listing["total"] > 50:
        page.click("#browse-next")
        page.wait_for_function("document.querySelector('#browse-range').textContent.startsWith('51')")
    page.select_option("#browse-layer", "2")
    page.select_option("#browse-sort", "density")
    layer_two = client.get("/v1/features", params={"layer": 2, "live": "true", "sort": "density"}).json()
    first = layer_two["features"][0]["feature"]
    page.wait_for_function(f"document.querySelector('#browse-table a.feature').textContent === '{first}'")
    densities = [row["density"] for row in layer_two["features"]]
    assert densities == sorted(densities, reverse=True)
    assert tab.errors == []


def test_a_prompt_is_shaded_live(tab, client):
    page = tab.open("/features/1/2")
    page.type("#test-text", "the cat sat")
    page.wait_for_function("document.querySelectorAll('#test-result .tok').length === 3")
    (measured,) = client.post("/v1/activations", json={"feature": "1/2", "texts": ["the cat sat"]}).json()
    shaded = tab.tokens("#test-result")
    assert shaded == list(zip([shown(p) for p in measured["pieces"][1:]], measured["token_activations"][1:]))
    assert f"{100 * measured['fraction_of_max']:.1f}% of max" in page.inner_text("#test-result")
    assert tab.errors == []


def test_dream_from_the_page(tab, client):
    page = tab.open("/features/2/5")
    assert "No dream yet" in page.inner_text("#frontier-table") and page.is_hidden("#first-token")
    page.fill("#dream-iterations", "3")
    page.click("#dream-form summary")
    page.fill("#dream-config", json.dumps(DREAM_SETTINGS))
    page.click("#dream-button")
    page.wait_for_function("document.querySelector('#dream-progress').textContent.startsWith('done')")
    page.wait_for_selector("#frontier-table tr.dream")
    feature = client.get("/v1/features/2/5").json()
    assert len(page.query_selector_all("#frontier-table tr.dream")) == len(feature["dreams"]) > 0
    for i, dream in enumerate(feature["dreams"]):
        shaded = tab.tokens(f"#frontier-table tr.dream >> nth={i}")
        assert shaded == [(shown(text), value) for text, value in zip(dream["tokens"], dream["activations"])]
        assert max(dream["activations"]) == pytest.approx(dream["activation"], rel=1e-5, abs=1e-6)
    assert tab.errors == []


def test_batch_fills_its_table_and_downloads(tab, client, tmp_path):
    page = tab.open("/batch")
    listed = tmp_path / "features.txt"
    listed.write_text("0/3, 1/4\n2/6\n")
    page.set_input_files("#batch-file", str(listed))
    page.wait_for_function("document.querySelector('#batch-features').value.includes('2/6')")
    page.fill("#batch-iterations", "3")
    page.click("#batch-form summary")
    page.fill("#batch-config", json.dumps(DREAM_SETTINGS))
    page.click("#batch-button")
    page.wait_for_selector("body[data-batch=done]")
    batch_id = page.inner_text("#batch-id")
    summary = client.get(f"/v1/batches/{batch_id}/summary").json()
    rows = page.eval_on_selector_all("#batch-table tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
    assert [row[0] for row in rows] == [job["feature"] for job in summary["jobs"]] == ["0/3", "1/4", "2/6"]
    assert [row[1] for row in rows] == ["done"] * 3
    expected = [f"{100 * job['best_fluent_fraction_of_max']:.1f}%" if job["best_fluent_fraction_of_max"] is not None
                else "–" for job in summary["jobs"]]
    assert [row[2] for row in rows] == expected
    def shown(job, field):
        return f"{100 * job[field]:.1f}%" if job[field] is not None else "–"
    assert [row[3] for row in rows] == [shown(job, "best_fluent_fraction_of_length_matched") for job in summary["jobs"]]
    assert [row[5] for row in rows] == [shown(job, "best_novel_fraction_of_max") for job in summary["jobs"]]
    assert [row[6] for row in rows] == [shown(job, "best_novel_fraction_of_length_matched") for job in summary["jobs"]]
    assert page.url.endswith(f"/batch?id={batch_id}")

    downloaded = page.request.get(tab.url + page.get_attribute("#download-csv", "href"))
    lines = list(csv.DictReader(io.StringIO(downloaded.text())))
    assert [line["feature"] for line in lines] == ["0/3", "1/4", "2/6"] and {line["status"] for line in lines} == {"done"}
    assert [line["best_novel_prompt"] for line in lines] == [job["best_novel_prompt"] or "" for job in summary["jobs"]]
    results = page.request.get(tab.url + page.get_attribute("#download-json", "href")).json()
    assert [job["result"]["feature"] for job in results] == ["0/3", "1/4", "2/6"]
    with page.expect_download() as clicked:  # the link itself fetches (with the key, when reads need it)
        page.click("#download-csv")
    saved = Path(clicked.value.path()).read_text()
    assert [line["feature"] for line in csv.DictReader(io.StringIO(saved))] == ["0/3", "1/4", "2/6"]
    assert tab.errors == []


def test_the_api_key_is_asked_for_and_kept(browser, server):
    tab = Tab(browser, server, key=None)
    page = tab.open("/")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    assert page.is_hidden("#key-form") and "API key saved" in page.inner_text("#key-state")
    page.fill("#search-text", "the cat sat")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#search-results tbody a.feature")
    assert tab.errors == []
    tab.close()

    tab = Tab(browser, server, key="a wrong key")
    page = tab.open("/features/1/2")
    page.type("#test-text", "the cat")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "refused" in page.inner_text("#key-message")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#test-result .tok').length === 2")
    assert all("401" in error for error in tab.errors)  # the refused call, and nothing else
    tab.close()


def test_an_unknown_feature_says_so(tab):
    tab.page.goto(tab.url + "/features/9/0")
    tab.page.wait_for_selector("#error:not([hidden])")
    assert "unknown feature 9/0: layer must be in 0..2" in tab.page.inner_text("#error")
    assert all("404" in error for error in tab.errors), tab.errors


def test_progress_streams_as_server_sent_events(client):
    job = client.post("/v1/dreams", json={"feature": "0/7", "config": {**TINY_CONFIG, "iterations": 6}}).json()
    updates = []
    with client.stream("GET", f"/v1/jobs/{job['job_id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                updates.append(json.loads(line[5:]))
    statuses = [update["status"] for update in updates]
    assert statuses[-1] == "done" and updates[-1]["result"]["feature"] == "0/7"
    assert len(updates) == len({json.dumps(update, sort_keys=True) for update in updates})  # only changes
    assert client.get("/v1/jobs/nope/events").status_code == 404


def test_with_the_key_required_on_reads_the_pages_ask_for_it_first(browser, server, tiny_bundle, tmp_path):
    import httpx
    from serving import Server

    guarded = Server(tiny_bundle.directory, tmp_path / "home", server.ray_address, DREAMING_KEY_ON_READS="1").start()
    try:
        assert httpx.get(f"{guarded.url}/v1/jobs").status_code == 401
        assert httpx.get(f"{guarded.url}/metrics").status_code == 401
        assert httpx.get(f"{guarded.url}/v1/health").status_code == 200  # probes stay open
        with guarded.client() as client:
            assert client.get("/v1/jobs").status_code == 200 and client.get("/v1/info").json()["key_on_reads"]
        tab = Tab(browser, guarded, key=None)
        tab.page.goto(guarded.url + "/")
        tab.page.wait_for_selector("#key-form:not([hidden])")
        tab.page.fill("#key-input", API_KEY)
        tab.page.click("#key-form button[type=submit]")
        tab.page.wait_for_selector("body[data-ready=true]")
        assert tab.page.query_selector_all("#browse-table a.feature")
        assert all("401" in error for error in tab.errors)  # the first read, refused before the key was given
        assert tab.page.is_hidden("#bundle-choice")  # one bundle served: no picker
        tab.close()
    finally:
        guarded.stop()
