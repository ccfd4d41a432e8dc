"""Positional (first-token) features: those whose strongest dataset example is a text's first token. The rule
against a brute-force reading of the arrays, search ranking content above position, dreams of such features in the
bare template, and the flag where features and dreams show (compare, the CLI, exports)."""

import pytest

from dreaming.bundle import maxima_report
from dreaming.features import Feature

POSITIONAL = [Feature(1, 2), Feature(2, 4)]  # the tiny bundle's positional features (brute force below)


@pytest.fixture(scope="module")
def maxima(tiny_bundle):
    return tiny_bundle.maxima()


def test_the_rule_against_a_brute_force_reading_of_the_arrays(maxima, tiny_bundle):
    layers, per_layer = maxima.shape
    brute = []
    for feature in (Feature(layer, index) for layer in range(layers) for index in range(per_layer)):
        examples = maxima.top_examples(feature)  # strongest first; a dead feature has none
        positional = bool(examples) and examples[0][2] == 1
        brute += [feature] if positional else []
        summary = maxima.summary(feature)
        assert summary["first_token"] == maxima.first_token(feature) == positional
        at_first = [position for _, _, position in examples].count(1)
        assert summary["first_token_share"] == (at_first / len(examples) if examples else 0.0)
    assert brute == POSITIONAL
    assert maxima_report(maxima, tiny_bundle)["first_token"] == len(brute)


@pytest.fixture(scope="module")
def explorer(tiny_bundle):
    from dreaming.explorer import Explorer

    return Explorer.open(tiny_bundle.directory, device="cpu")


def measured_hits(explorer, text: str) -> list[tuple[str, float, bool]]:
    """(feature, fraction of max, positional) of every live feature active on `text`, measured in one forward pass
    with the whole transcoder's rows; positional: a positional feature whose max is at the text's first token."""
    import torch

    from dreaming.activation import feature_activations, tokenize_text

    layers, per_layer = explorer.maxima.shape
    features = [Feature(layer, index) for layer in range(layers) for index in range(per_layer)]
    ids = torch.tensor([tokenize_text(explorer.lm, text)])
    values = feature_activations(explorer.lm, explorer.transcoder, ids, features)[0]  # [pos, features]
    hits = []
    for feature, column in zip(features, values.T.tolist()):
        dataset_max = explorer.dataset_max(feature)
        if dataset_max > 0 and max(column) > 0:
            positional = explorer.maxima.first_token(feature) and column.index(max(column)) == 1
            hits.append((str(feature), max(column) / dataset_max, positional))
    return hits


def brute_force_order(hits: list[tuple[str, float, bool]], top: int, order: str) -> list[tuple[str, float, bool]]:
    """The hits sorted by fraction, after putting the positional ones last for "content"."""
    key = (lambda hit: (hit[2], -hit[1])) if order == "content" else (lambda hit: -hit[1])
    return sorted(hits, key=key)[:top]


@pytest.mark.parametrize("text", ["sun cat sat on the mat", "fast cat sat on the mat"])
def test_search_ranks_positional_hits_after_content_hits_unless_asked_by_fraction(explorer, text):
    by_fraction = explorer.search(text, 20, order="fraction")
    assert any(hit["positional"] for hit in by_fraction[:5])  # the texts are chosen for a strong positional hit
    hits = measured_hits(explorer, text)
    for order, top in (("content", 100), ("fraction", 100), ("content", 20), ("fraction", 5)):
        found = explorer.search(text, top, order=order)
        expected = brute_force_order(hits, top, order)
        assert [(hit["feature"], hit["positional"]) for hit in found] == [(f, p) for f, _, p in expected]
        assert [hit["fraction_of_max"] for hit in found] == pytest.approx([fraction for _, fraction, _ in expected])
        for hit in found:
            assert hit["first_token"] == (Feature(*map(int, hit["feature"].split("/"))) in POSITIONAL)
            assert hit["positional"] == (hit["first_token"] and hit["max_position"] == 1)
    assert explorer.search(text, 20) == explorer.search(text, 20, order="content")  # the default
    with pytest.raises(ValueError, match="order must be one of content, fraction"):
        explorer.search(text, 20, order="position")


def test_the_cli_search_says_which_ranking_it_uses(tiny_bundle, explorer, capsys):
    import json

    from dreaming.cli import main

    text, bundle = "sun cat sat on the mat", ["--bundle", str(tiny_bundle.directory)]
    for order in ("content", "fraction"):
        capsys.readouterr()
        main(["search", *bundle, "--text", text, "--order", order, "--json"])
        assert json.loads(capsys.readouterr().out) == explorer.search(text, 20, order)
    main(["search", *bundle, "--text", text, "--top", "100"])
    out = capsys.readouterr().out
    assert "positional features, which fire on a text's first token, are listed last" in out
    marked = [line.endswith("first-token") for line in out.splitlines()[2:]]
    assert marked[-1] and marked == sorted(marked) and "1/2" in out.splitlines()[2 + marked.index(True)]
    main(["search", *bundle, "--text", text, "--order", "fraction"])
    out = capsys.readouterr().out
    assert "ranked by % of max alone" in out and out.splitlines()[2].split()[0] == "1/2"


@pytest.fixture()
def own_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle with an empty dream cache (other tests' dreams left out), which a test may fill."""
    import shutil

    from dreaming.bundle import Bundle

    return Bundle.open(shutil.copytree(tiny_bundle.directory, tmp_path / "bundle",
                                       ignore=lambda directory, names: ["dreams"] if "bundle.json" in names else []))


def fake_engine(explorer, calls: list):
    """An engine (epo.dream_many's signature) that records each call's features, template and runs continued, and
    returns results of prompts measured for real in the call's template ("{prompt}" for the chat template, which
    the tiny model lacks)."""
    from dream_results import dream_result, dreamed_prompt

    def dream_many(lm, transcoder, features, config, maxes, progress=None, measure_lm=None, contexts=None,
                   continue_from=None):
        calls.append(([str(f) for f in features], config.template, [r is not None for r in continue_from]))
        results = []
        for feature, dataset_max in zip(features, maxes):
            points = [dreamed_prompt(explorer.lm, explorer.encoder, feature, prompt, config.template or "{prompt}",
                                     dataset_max, cross_entropy, longest_shared_run=run)
                      for prompt, cross_entropy, run in (("cat sat", 3.0, 5), ("dog ran on", 4.0, 2))]
            result = dream_result(feature, config, dataset_max, points, diverse=points)
            results.append(result.model_copy(update={"best_fluent": points[0], "best_novel": points[1], "state": {}}))
        return results

    return dream_many


def test_dream_many_dreams_a_positional_feature_in_the_bare_template(own_bundle, monkeypatch):
    from dreaming import explorer as explorer_module
    from dreaming.engine import DreamConfig
    from dreaming.explorer import FIRST_TOKEN_TEMPLATE, REACHABLE_YARDSTICK, UNREACHABLE_YARDSTICK, Explorer

    explorer = Explorer(own_bundle, device="cpu")
    calls = []
    monkeypatch.setattr(explorer_module, "dream_many", fake_engine(explorer, calls))
    features = ["1/2", "1/3", "2/4", "0/5"]  # positional, content, positional, content
    config = DreamConfig(prompt_length=2, iterations=2)  # template None: the model's chat template
    results = explorer.dream_many(features, config, features_per_call=8)
    assert calls == [(["1/2", "2/4"], FIRST_TOKEN_TEMPLATE, [False, False]), (["1/3", "0/5"], None, [False, False])]
    assert [r.feature for r in results] == features
    assert [r.config.template for r in results] == [FIRST_TOKEN_TEMPLATE, None, FIRST_TOKEN_TEMPLATE, None]
    assert [r.yardstick for r in results] == [REACHABLE_YARDSTICK, None, REACHABLE_YARDSTICK, None]
    for feature, result in zip(features, results):  # cached under the config each was dreamed under
        effective = explorer.dream_config(feature, config)
        assert effective.template == result.config.template
        assert explorer.cache.get(own_bundle.identity, explorer.feature(feature), effective,
                                  explorer.dataset_max(feature)) == result
    assert explorer.dream_many(features, config) == results and len(calls) == 2  # read back from the cache
    explorer.dream_many(["2/4", "1/3"], config, more=True)  # continues the runs dreamed under those configs
    assert calls[2:] == [(["2/4"], FIRST_TOKEN_TEMPLATE, [True]), (["1/3"], None, [True])]

    given = DreamConfig(prompt_length=2, iterations=2, template="the {prompt} on")  # a template asked for is kept
    assert [r.config.template for r in explorer.dream_many(["1/2", "1/3"], given)] == [given.template] * 2
    assert calls[-1] == (["1/2", "1/3"], given.template, [False, False])
    assert explorer.dream_many(["1/2"], given)[0].yardstick == UNREACHABLE_YARDSTICK
    assert explorer.yardstick("1/2", DreamConfig(template="{prompt} on")) == REACHABLE_YARDSTICK


def test_compare_the_cli_and_exports_flag_the_feature_and_show_the_best_and_the_yardstick(own_bundle, monkeypatch,
                                                                                          capsys, tmp_path):
    import json

    from dream_results import dream_result

    from dreaming import explorer as explorer_module
    from dreaming.cli import main, print_dream
    from dreaming.engine import DreamConfig
    from dreaming.explorer import REACHABLE_YARDSTICK, Explorer
    from dreaming.exports import BEST_GROUPS, DREAMS_GROUP, FIRST_TOKEN_GROUP, TOP_GROUP, cantor_id, \
        export_circuit_tracer

    explorer = Explorer(own_bundle, device="cpu")
    monkeypatch.setattr(explorer_module, "dream_many", fake_engine(explorer, []))
    (positional,) = explorer.dream_many(["1/2"], DreamConfig(prompt_length=2, iterations=2))
    capsys.readouterr()
    print_dream(positional)
    text = capsys.readouterr().out
    assert f"yardstick: {REACHABLE_YARDSTICK} (template '{{prompt}}')" in text
    assert "best novel (fluent, sharing no run of 4 tokens" in text and "shared run 2, origin sampled" in text
    rows = {prompt: next(line for line in text.splitlines() if line.endswith(f"{prompt!r}{mark}"))
            for prompt, mark in (("cat sat", " *"), ("dog ran on", " +"))}
    assert " 2  'dog ran on'" in rows["dog ran on"] and " 5  'cat sat'" in rows["cat sat"]
    print_dream(dream_result(Feature(1, 3), DreamConfig(template="{prompt}"), 1.0, []))
    text = capsys.readouterr().out
    assert "yardstick" not in text and "best novel (fluent" in text and text.count(": none") == 2

    page = explorer.compare("1/2", top=2)
    assert page["first_token"] and page["first_token_share"] == explorer.maxima.summary(Feature(1, 2))[
        "first_token_share"]
    assert {dream["yardstick"] for dream in page["dreams"]} == {REACHABLE_YARDSTICK}
    assert page["best_fluent"]["prompt"] == "cat sat" and not page["best_fluent"]["novel"]
    assert page["best_novel"]["prompt"] == "dog ran on" and page["best_novel"]["novel"]
    assert page["best_novel"]["tokens"] and page["best_novel"]["activations"]  # shaded like every dream
    assert not explorer.compare("1/3", top=2)["first_token"]
    similar = explorer.similar("1/3", top=23)
    assert [hit["first_token"] for hit in similar] == [hit["feature"] in ("1/2", "2/4") for hit in similar]
    assert any(hit["first_token"] for hit in similar)
    main(["compare", "--bundle", str(own_bundle.directory), "--feature", "1/2", "--top", "2"])
    text = capsys.readouterr().out
    assert "positional: fires on a text's first token" in text and f"yardstick: {REACHABLE_YARDSTICK}" in text
    assert "best fluent: " in text and "best novel: " in text and "'dog ran on'" in text.split("best novel: ")[1]
    main(["compare", "--bundle", str(own_bundle.directory), "--feature", "1/3", "--top", "2"])
    assert "positional" not in capsys.readouterr().out

    export_circuit_tracer(explorer, tmp_path / "out", [Feature(1, 2), Feature(1, 3)], scan="s", progress=False)
    names = {feature: [group["quantile_name"] for group in json.loads(
        (tmp_path / f"out/features/s/{cantor_id(feature)}.json").read_text())["examples_quantiles"]]
        for feature in (Feature(1, 2), Feature(1, 3))}
    assert names[Feature(1, 2)][0] == FIRST_TOKEN_GROUP and names[Feature(1, 3)][0] == TOP_GROUP
    fluent, novel, dreams = names[Feature(1, 2)][-3:]  # the best ones' names say how far they got, then the yardstick
    assert dreams == f"{DREAMS_GROUP} ({REACHABLE_YARDSTICK})"
    for name, group in zip((fluent, novel), BEST_GROUPS.values()):
        assert name.startswith(f"{group}: ") and "% of the dataset max" in name
        assert name.endswith(f" ({REACHABLE_YARDSTICK})")


def test_the_batch_csv_and_summary_show_the_best_novel_prompt_and_the_yardstick():
    import csv
    import io

    from service.routes.dreams import batch_csv, job_summary
    from service.store import DONE, Job

    best = {"fraction_of_max": 0.5, "activation": 1.0, "cross_entropy": 3.0, "prompt": "cat sat"}
    novel = {"fraction_of_max": 0.25, "activation": 0.5, "cross_entropy": 4.0, "prompt": "dog ran"}
    results = [{"best_fluent": best, "best_novel": novel, "yardstick": "at the first token", "dataset_max": 2.0,
                "iterations": 3}, {"best_fluent": best, "best_novel": None, "dataset_max": 2.0, "iterations": 3}]
    jobs = [Job(f"j{i}", "k", "id", "1/2", {}, 2.0, DONE, result=result) for i, result in enumerate(results)]
    lines = list(csv.DictReader(io.StringIO(batch_csv(jobs))))
    assert [line["best_novel_prompt"] for line in lines] == ["dog ran", ""]
    assert [line["best_novel_fraction_of_max"] for line in lines] == ["0.25", ""]
    assert [line["best_fluent_prompt"] for line in lines] == ["cat sat"] * 2
    assert [line["yardstick"] for line in lines] == ["at the first token", ""]
    summaries = [job_summary(job) for job in jobs]
    assert [s.best_novel_prompt for s in summaries] == ["dog ran", None]
    assert [s.best_novel_cross_entropy for s in summaries] == [4.0, None]
    assert [s.yardstick for s in summaries] == ["at the first token", None]
