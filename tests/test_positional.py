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


def test_the_rule_against_a_brute_force_reading_of_the_arrays(maxima):
    layers, per_layer = maxima.shape
    brute = []
    for layer in range(layers):
        for index in range(per_layer):
            examples = maxima.top_examples(Feature(layer, index))  # strongest first; a dead feature has none
            if examples and examples[0][2] == 1:
                brute.append(Feature(layer, index))
            summary = maxima.summary(Feature(layer, index))
            assert summary["first_token"] == maxima.first_token(Feature(layer, index)) == (Feature(layer, index) in brute)
            at_first = [position for _, _, position in examples].count(1)
            assert summary["first_token_share"] == (at_first / len(examples) if examples else 0.0)
    assert brute == POSITIONAL
    assert maxima_report(maxima)["first_token"] == len(brute)


@pytest.fixture(scope="module")
def explorer(tiny_bundle):
    from dreaming.explorer import Explorer

    return Explorer.open(tiny_bundle.directory, device="cpu")


def measured_hits(explorer, text: str) -> list[tuple[str, float, bool]]:
    """(feature, fraction of max, positional) of every live feature active on `text`, each measured alone;
    positional: a positional feature whose max on the text is at its first token."""
    layers, per_layer = explorer.maxima.shape
    hits = []
    for feature in (Feature(layer, index) for layer in range(layers) for index in range(per_layer)):
        dataset_max = explorer.dataset_max(feature)
        (measured,) = explorer.activation(feature, [text])
        if dataset_max > 0 and measured["activation"] > 0:
            values = measured["token_activations"]
            positional = explorer.maxima.first_token(feature) and values.index(max(values)) == 1
            hits.append((str(feature), measured["activation"] / dataset_max, positional))
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
