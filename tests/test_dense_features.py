"""experiments/dense_features.py on the tiny bundle: the co-firing counts of its batched pass equal a direct count on
each window alone, its concatenated decoder cosines equal dreaming.similar's, and a document's opening."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dreaming.activation import layer_activations
from dreaming.similar import similar_features

spec = importlib.util.spec_from_file_location(
    "dense_features", Path(__file__).parents[1] / "experiments" / "dense_features.py")
dense_features = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dense_features)


def test_co_firing_counts_equal_a_direct_count(tiny_bundle):
    maxima, lm, transcoder = tiny_bundle.maxima(), tiny_bundle.load_model(), tiny_bundle.load_transcoder()
    windows = maxima.windows
    pairs = dense_features.random_pairs(maxima, 30, np.random.default_rng(0))
    watched = dense_features.densest(maxima, 3)
    sample = np.array([0, 3, 5, 10, 11, 17])  # 0, 5 and 10 are padded windows
    counted = dense_features.corpus_pass(lm, transcoder, maxima, sample, pairs, watched, batch_windows=4)

    keys = {"token": [], "source": [], "document": []}
    active = {layer: [] for layer in range(transcoder.config.n_layers)}
    for w in sample:  # each window alone, its tokens after the BOS
        window = torch.tensor(windows.tokens[w, : windows.lengths[w]], dtype=torch.long)
        keys["token"].append(window[1:])
        keys["source"].append(torch.full((len(window) - 1,), int(windows.source[w])))
        keys["document"].append(torch.full((len(window) - 1,), int(windows.document[w])))
        for layer, acts in layer_activations(lm, transcoder, window[None]).items():
            active[layer].append(acts[0, 1:] > 0)
    keys, active = {k: torch.cat(v) for k, v in keys.items()}, {layer: torch.cat(v) for layer, v in active.items()}
    ids = keys["token"]

    assert counted["tokens"] == len(ids) == sum(int(windows.lengths[w]) - 1 for w in sample)
    expected = [[int(active[a.layer][:, a.index].sum()), int(active[b.layer][:, b.index].sum()),
                 int((active[a.layer][:, a.index] & active[b.layer][:, b.index]).sum())] for a, b in pairs]
    assert counted["pairs"].tolist() == expected
    assert sum(both for _, _, both in expected) > 0  # the test sees co-firing, not only zeros
    for key, values in keys.items():
        size = counted["seen"][key].shape[0]
        assert counted["seen"][key].tolist() == torch.bincount(values, minlength=size).tolist()
        for row, f in zip(counted["fired"][key], watched):
            assert row.tolist() == torch.bincount(values[active[f.layer][:, f.index]], minlength=size).tolist()


@pytest.mark.parametrize("lowest", [False, True])
def test_decoder_cosines_equal_similar_features(tiny_bundle, lowest):
    directory = tiny_bundle.directory / "transcoder"
    for feature in ["0/3", "1/7", "2/12"]:
        (hit,) = similar_features(directory, feature, top=1, lowest=lowest)
        a, b = dense_features.unit_decoders(directory, [dense_features.parse_feature(f)
                                                        for f in (feature, hit["feature"])])
        assert float(a @ b) == pytest.approx(hit["cosine"], abs=1e-5)


def test_opening_drops_what_every_document_of_the_source_starts_with(tiny_bundle):
    maxima, lm = tiny_bundle.maxima(), tiny_bundle.load_model()
    windows = maxima.windows  # one window per document; every window starts with the BOS, then random tokens
    expected = lm.tokenizer.decode(windows.tokens[3, 1 : windows.lengths[3]])[:80]
    assert dense_features.opening(lm, maxima, 3) == ("odd", expected)
