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
