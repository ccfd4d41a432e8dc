"""Stale yardsticks: a dream is cached under the dataset max it was scored against. After the maxima are rebuilt
and a feature's max changes, its cached dreams show as stale (never as current) in the explorer, the CLI and
the service's page, and the same dream requested again is computed again."""

import json

import pytest
from conftest import make_tiny_transcoder, random_windows
from dream_results import dream_result, dreamed_prompt
from tiny_bundle import build_tiny_bundle

from dreaming import explorer as explorer_module
from dreaming.cli import main
from dreaming.dream_cache import DreamCache, max_key
from dreaming.engine import DreamConfig
from dreaming.explorer import Explorer
from dreaming.features import Feature
from dreaming.maxima import MaximaConfig, build_maxima

FEATURE = Feature(1, 13)
TEMPLATE = "the {prompt} on"
CONFIG = DreamConfig(template=TEMPLATE, prompt_length=2, dtype="float32")
FLAGS = ["--template", TEMPLATE, "--prompt-length", "2", "--dtype", "float32"]


@pytest.fixture()
def bundle(tiny_lm, tmp_path):
    windows = random_windows(12, 16, len(tiny_lm.tokenizer))
    return build_tiny_bundle(tmp_path / "bundle", tiny_lm, make_tiny_transcoder(tiny_lm), windows)


def result_for(explorer: Explorer, prompts: list[str], dataset_max: float):
    points = [dreamed_prompt(explorer.lm, explorer.transcoder, FEATURE, p, TEMPLATE, dataset_max, origin="sampled",
                             longest_shared_run=1) for p in prompts]
    return dream_result(FEATURE, CONFIG, dataset_max, points, diverse=points)


def rebuild_maxima(bundle, lm, seed: int) -> None:
    """`dreaming maxima build` on another corpus: new windows, the same model and transcoder."""
    windows = random_windows(12, 16, len(lm.tokenizer), seed=seed)
    build_maxima(lm, bundle.load_transcoder(), windows, bundle.directory / "maxima", bundle.identity,
                 MaximaConfig(top_k=4), progress=False)


def compare_text(capsys, bundle) -> str:
    capsys.readouterr()
    main(["compare", "--bundle", str(bundle.directory), "--feature", str(FEATURE), "--top", "2"])
    return capsys.readouterr().out


def test_a_maxima_rebuild_makes_cached_dreams_stale_and_a_new_request_recomputes(bundle, tiny_lm, capsys,
                                                                                 monkeypatch):
    cache, identity = DreamCache(bundle.directory / "dreams"), bundle.identity
    explorer = Explorer.open(bundle.directory, device="cpu")
    old_max = explorer.dataset_max(FEATURE)
    old = result_for(explorer, ["cat sat", "dog ran"], old_max)
    path = cache.put(identity, old)
    assert path.name.endswith(f"-{max_key(old_max)}.json")
    assert cache.get(identity, FEATURE, CONFIG, old_max) == old
    page = explorer.compare(FEATURE, top=2)
    assert {d["prompt"] for d in page["dreams"]} == {"cat sat", "dog ran"} and page["stale_dreams"] == []
    assert "stale" not in compare_text(capsys, bundle)

    rebuild_maxima(bundle, tiny_lm, seed=5)
    explorer = Explorer.open(bundle.directory, device="cpu")
    new_max = explorer.dataset_max(FEATURE)
    assert new_max > 0 and new_max != old_max
    # the cached dream is kept, but only as stale: it does not answer a request under the new max
    assert cache.get(identity, FEATURE, CONFIG, new_max) is None
    [cached] = cache.for_feature(identity, FEATURE, new_max)
    assert cached.result == old and not cached.current
    page = explorer.compare(FEATURE, top=2)
    assert page["dreams"] == [] and page["diverse"] == []
    assert {d["prompt"] for d in page["stale_dreams"]} == {"cat sat", "dog ran"}
    for stale in page["stale_dreams"]:
        point = next(p for p in old.frontier if p.prompt == stale["prompt"])
        assert stale["scored_against"] == old_max and stale["fraction_of_max"] == point.fraction_of_max
    text = compare_text(capsys, bundle)
    assert "stale (scored against another dataset max)" in text
    stale_part = text.split("stale (scored against another dataset max)")[1]
    assert "'cat sat'" in stale_part and "'dog ran'" in stale_part and "'cat sat'" not in text.split("stale (")[0]
    assert f"{old_max:.3f}" in stale_part

    # the same dream asked for again is computed (against the new max), not served from the stale entry
    calls = []

    def fake_dream_many(lm, transcoder, features, config, maxes, progress=None, measure_lm=None, contexts=None,
                        continue_from=None):
        calls.append((features, config, maxes))
        return [result_for(explorer, ["red sun"], maxes[0])]

    monkeypatch.setattr(explorer_module, "dream_many", fake_dream_many)
    capsys.readouterr()
    main(["dream", "--bundle", str(bundle.directory), "--feature", str(FEATURE), *FLAGS, "--json"])
    fresh = json.loads(capsys.readouterr().out)
    assert calls == [([FEATURE], CONFIG, [new_max])] and fresh["dataset_max"] == new_max
    main(["dream", "--bundle", str(bundle.directory), "--feature", str(FEATURE), *FLAGS, "--json"])
    assert json.loads(capsys.readouterr().out) == fresh and len(calls) == 1  # now cached under the new max
    assert [c.current for c in cache.for_feature(identity, FEATURE, new_max)] == [True, False]
    page = explorer.compare(FEATURE, top=2)
    assert [d["prompt"] for d in page["dreams"]] == [d["prompt"] for d in page["diverse"]] == ["red sun"]
    assert {d["prompt"] for d in page["stale_dreams"]} == {"cat sat", "dog ran"}
    assert [d["prompt"] for d in explorer.dreams(FEATURE, current_only=True)[0]["frontier"]] == ["red sun"]
    text = compare_text(capsys, bundle)
    assert "'red sun'" in text.split("stale (")[0] and "diverse" in text


def test_the_service_keeps_a_current_and_a_stale_result_of_one_config_apart():
    from service.routes.features import merge_dreams

    config = CONFIG.model_dump(mode="json")
    served = [{"config": config, "dataset_max": 1.5, "n": 1}]
    local = [{"config": config, "dataset_max": 2.0, "n": 2}, {"config": config, "dataset_max": 1.5, "n": 3}]
    assert [d["n"] for d in merge_dreams(served, local)] == [1, 2]


def test_cache_keys_tell_yardsticks_apart():
    assert max_key(None) == max_key(0.0) == "none"  # no yardstick: no maxima, or a dead feature
    assert max_key(1.5) == max_key(json.loads(json.dumps(1.5))) != max_key(1.5000001)


def test_a_prompt_dreamed_again_by_a_newer_engine_is_listed_once(bundle, capsys, monkeypatch):
    """A re-dream under a new engine version is new work (a new cache key), and the old result stays current
    (same dataset max); the page lists each prompt once, as the newest engine found it, and keeps the old
    engine's other prompts, marked with their engine in `compare`."""
    from dreaming import dream_cache
    from dreaming.engine import ENGINE_VERSION

    cache, identity = DreamCache(bundle.directory / "dreams"), bundle.identity
    explorer = Explorer.open(bundle.directory, device="cpu")
    dataset_max = explorer.dataset_max(FEATURE)
    old = result_for(explorer, ["cat sat", "dog ran"], dataset_max).model_copy(update={"engine_version": 5})
    monkeypatch.setattr(dream_cache, "ENGINE_VERSION", 5)
    cache.put(identity, old)
    monkeypatch.undo()
    cache.put(identity, result_for(explorer, ["cat sat", "red sun"], dataset_max))
    assert len(cache.for_feature(identity, FEATURE, dataset_max)) == 2

    page = explorer.compare(FEATURE, top=2)
    engines = sorted((d["prompt"], d["engine_version"]) for d in page["dreams"])
    assert engines == [("cat sat", ENGINE_VERSION), ("dog ran", 5), ("red sun", ENGINE_VERSION)]
    assert sorted(d["prompt"] for d in page["diverse"]) == ["cat sat", "dog ran", "red sun"]
    activations = [d["activation"] for d in page["dreams"]]
    assert activations == sorted(activations, reverse=True)
    listed = compare_text(capsys, bundle).split("dreamed prompts")[1].split("\nbest fluent")[0]
    assert listed.count("'cat sat'") == 1 and "'dog ran' [engine 5]" in listed and "'red sun' [engine" not in listed
