"""Dataset maxima against a brute-force computation, one window at a time; storage; measuring texts; search."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_transcoder, random_windows
from dream_results import dream_result, dreamed_prompt
from dreaming.activation import measure_texts, tokenize_text
from dreaming.dashboard import feature_page, render_examples
from dreaming.engine.length import cut_examples
from dreaming.engine import DreamConfig
from dreaming.features import Feature, parse_feature, parse_features
from dreaming.maxima import (
    HISTOGRAM_EDGES,
    INTERVAL_EDGES,
    MaximaConfig,
    build_maxima,
    load_maxima,
    search_features,
)
from dreaming.models import HOOK_MLP_IN

TOP_K = 5


@pytest.fixture(scope="module")
def tiny_transcoder(tiny_lm):
    return make_tiny_transcoder(tiny_lm)


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    windows = random_windows(30, 20, len(tiny_tokenizer), seed=3)
    windows.source = (np.arange(30) % 3).astype(np.int16)
    windows.sources = ["a", "b", "c"]
    return windows


@pytest.fixture(scope="module")
def maxima(tiny_lm, tiny_transcoder, windows, tmp_path_factory):
    out = tmp_path_factory.mktemp("maxima") / "maxima"
    return build_maxima(tiny_lm, tiny_transcoder, windows, out, identity="tiny", progress=False,
                        config=MaximaConfig(top_k=TOP_K, batch_windows=7))  # batches cut across sources


def brute_force(lm, transcoder, windows):
    """Each window run alone at its own length: per-token activations [n_windows] of [length - 1, L, F]."""
    per_window = []
    for tokens, length in zip(windows.tokens, windows.lengths):
        ids = torch.tensor(tokens[:length], dtype=torch.long)[None]
        captured = lm.capture(ids, [(HOOK_MLP_IN, layer) for layer in range(lm.n_layers)])
        acts = torch.stack([transcoder.encode(captured[(HOOK_MLP_IN, layer)][0], layer)
                            for layer in range(lm.n_layers)], dim=1)  # [pos, L, F]
        per_window.append(acts[1:].detach().numpy())  # BOS dropped
    return per_window


def test_statistics_equal_brute_force(tiny_lm, tiny_transcoder, windows, maxima):
    per_window = brute_force(tiny_lm, tiny_transcoder, windows)
    everything = np.concatenate(per_window)  # [tokens, L, F]
    arrays = {name: t.numpy() for name, t in maxima.arrays.items()}
    assert maxima.metadata["tokens"] == len(everything) == int(windows.lengths.sum()) - len(windows)
    np.testing.assert_allclose(arrays["density"], (everything > 0).mean(0), rtol=1e-6)
    active_sum = np.where(everything > 0, everything, 0).sum(0)
    np.testing.assert_allclose(arrays["mean_active"], active_sum / np.maximum((everything > 0).sum(0), 1), rtol=1e-4)
    np.testing.assert_allclose(arrays["max_activation"], everything.max(0), rtol=1e-5)
    expected_histogram = np.stack([np.bincount(np.searchsorted(HISTOGRAM_EDGES, everything[:, l, f], side="left"),
                                               minlength=len(HISTOGRAM_EDGES) + 1)
                                   for l in range(everything.shape[1]) for f in range(everything.shape[2])])
    np.testing.assert_array_equal(arrays["histogram"].reshape(expected_histogram.shape), expected_histogram)
    assert arrays["histogram"][..., 0].sum() == (everything == 0).sum()  # bin 0 = inactive tokens

    window_max = np.stack([acts.max(0) for acts in per_window])  # [windows, L, F]
    for source in range(3):
        np.testing.assert_allclose(arrays["source_max"][..., source], window_max[windows.source == source].max(0),
                                   rtol=1e-5)
    for layer in range(window_max.shape[1]):
        for index in range(window_max.shape[2]):
            strongest = np.sort(window_max[:, layer, index])[::-1][:TOP_K]
            examples = maxima.top_examples(Feature(layer, index))
            np.testing.assert_allclose([v for v, _, _ in examples], strongest[strongest > 0], rtol=1e-5)
            assert len({w for _, w, _ in examples}) == len(examples)  # at most one example per window
            for value, window, position in examples:
                assert value == pytest.approx(window_max[window, layer, index], rel=1e-5)
                assert per_window[window][position - 1, layer, index] == pytest.approx(value, rel=1e-5)


def reference_priority(window: int, position: int, layer: int, feature: int) -> int:
    """example_priority in Python integers: two's-complement int64 arithmetic, written out."""
    wrap = 2**64

    def signed(x):
        x %= wrap
        return x - wrap if x >= 2**63 else x

    key = signed(((int(window) * 8192 + int(position)) * 1024 + layer) * 2**24 + feature)
    mixed = signed(key * 0x9E3779B97F4A7C15)
    mixed = signed(mixed ^ (mixed >> 29))
    mixed = signed(mixed * 0xBF58476D1CE4E5B9)
    return (mixed >> 11) & (2**53 - 1)


def test_interval_examples_equal_brute_force(tiny_lm, tiny_transcoder, windows, maxima):
    """Per feature and activation range: the examples of lowest priority among every active token, as a direct
    enumeration of the windows finds them."""
    per_window = brute_force(tiny_lm, tiny_transcoder, windows)
    kept = maxima.metadata["interval_examples"]
    ranges = len(INTERVAL_EDGES) + 1
    assert maxima.arrays["interval_window"].shape[-2:] == (ranges, kept)
    for layer in range(tiny_lm.n_layers):
        for feature in range(tiny_transcoder.config.d_transcoder):
            expected = {}
            for window, acts in enumerate(per_window):
                for position in np.flatnonzero(acts[:, layer, feature] > 0):
                    value = float(acts[position, layer, feature])
                    r = int(np.searchsorted(INTERVAL_EDGES, value, side="left"))
                    priority = reference_priority(window, position + 1, layer, feature)  # +1: the BOS was dropped
                    expected.setdefault(r, []).append((priority, window, position + 1, value))
            found = maxima.interval_examples(Feature(layer, feature))
            assert [r["examples"] for r in found] == [sorted(r["examples"], reverse=True) for r in found]
            assert sorted(expected, reverse=True) == [int(np.searchsorted([0.0, *INTERVAL_EDGES], r["low"]))
                                                      for r in found]
            for r in found:
                index = int(np.searchsorted([0.0, *INTERVAL_EDGES], r["low"]))
                lowest = sorted(expected[index])[:kept]
                assert sorted((w, p) for _, w, p in r["examples"]) == sorted((w, p) for _, w, p, _ in lowest)
                assert sorted(v for v, _, _ in r["examples"]) == pytest.approx(sorted(v for *_, v in lowest), rel=1e-5)
                assert all(r["low"] < v and (r["high"] is None or v <= r["high"]) for v, _, _ in r["examples"])


def test_interval_examples_do_not_depend_on_batching(tiny_lm, tiny_transcoder, windows, maxima, tmp_path):
    other = build_maxima(tiny_lm, tiny_transcoder, windows, tmp_path / "other", identity="tiny", progress=False,
                         config=MaximaConfig(top_k=TOP_K, batch_windows=30))
    for name in ("interval_window", "interval_position"):
        assert torch.equal(other.arrays[name], maxima.arrays[name])
    torch.testing.assert_close(other.arrays["interval_values"], maxima.arrays["interval_values"])


def test_dead_feature_has_no_examples_and_counts_as_dead(maxima):
    assert maxima.top_examples(Feature(0, 0)) == []
    summary = maxima.summary(Feature(0, 0))
    assert summary["dead"] and summary["dataset_max"] == 0.0 and summary["density"] == 0.0


def test_storage_round_trip(maxima, tmp_path, tiny_lm, tiny_transcoder, windows):
    out = tmp_path / "m"
    built = build_maxima(tiny_lm, tiny_transcoder, windows, out, identity="tiny", progress=False,
                         config=MaximaConfig(top_k=TOP_K, batch_windows=30))
    loaded = load_maxima(out, identity="tiny")
    for name, array in built.arrays.items():
        torch.testing.assert_close(loaded.arrays[name], array)
        if name not in ("top_window", "top_position"):  # ties (same first tokens) may pick other windows
            torch.testing.assert_close(maxima.arrays[name], array, rtol=1e-5, atol=1e-6)  # batch size is irrelevant
    np.testing.assert_array_equal(loaded.windows.tokens, windows.tokens)
    assert loaded.sources == ["a", "b", "c"]
    with pytest.raises(ValueError, match="another model/transcoder"):
        load_maxima(out, identity="other")
    with pytest.raises(FileNotFoundError, match="dreaming maxima build"):
        load_maxima(tmp_path / "missing")
    assert not (tmp_path / "m.partial").exists()


def test_examples_reproduce_by_remeasuring(tiny_lm, tiny_transcoder, maxima):
    feature = Feature(1, 3)
    examples = render_examples(tiny_lm, tiny_transcoder, maxima, feature)
    assert examples and examples[0]["fraction_of_max"] == pytest.approx(1.0, rel=1e-5)
    for example, (stored, _, position) in zip(examples, maxima.top_examples(feature)):
        assert example["activation"] == pytest.approx(stored, rel=1e-5)
        assert example["source"] in ("a", "b", "c")
        assert "[[" in example["context"]
        text = tiny_lm.tokenizer.decode(example["token_ids"][1:])
        (measured,) = measure_texts(tiny_lm, tiny_transcoder, feature, [text], maxima.dataset_max(feature))
        assert measured.token_ids == example["token_ids"]
        assert measured.activation >= example["activation"] - 1e-5  # the max over the whole window


def test_measure_texts(tiny_lm, tiny_transcoder):
    (result,) = measure_texts(tiny_lm, tiny_transcoder, Feature(2, 4), ["the cat sat on the mat"], dataset_max=2.0)
    assert result.token_ids[0] == tiny_lm.bos_token_id and len(result.token_activations) == 7
    assert result.token_activations[0] == 0.0
    assert result.activation == max(result.token_activations[1:])
    assert result.fraction_of_max == pytest.approx(result.activation / 2.0)
    together = measure_texts(tiny_lm, tiny_transcoder, Feature(2, 4), ["the cat", "the cat sat on the mat"])
    assert together[1].token_activations == pytest.approx(result.token_activations, abs=1e-5)  # padding-proof
    assert tokenize_text(tiny_lm, "<bos> the cat") == tokenize_text(tiny_lm, "the cat")  # BOS never doubled


def test_bad_input_gets_clear_errors(tiny_lm, tiny_transcoder, maxima):
    with pytest.raises(ValueError, match="empty text"):
        measure_texts(tiny_lm, tiny_transcoder, Feature(0, 1), ["  "])
    with pytest.raises(ValueError, match="no texts"):
        measure_texts(tiny_lm, tiny_transcoder, Feature(0, 1), [])
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.2"):
        measure_texts(tiny_lm, tiny_transcoder, Feature(3, 1), ["the cat"])
    with pytest.raises(ValueError, match=r"index must be in 0\.\.23"):
        maxima.dataset_max(Feature(0, 24))
    for bad in ("12", "a/b", "1/2/3", "-1/2", ""):
        with pytest.raises(ValueError, match="malformed feature id"):
            parse_feature(bad)
    assert parse_features("1/2, 0/3,1/2") == [Feature(1, 2), Feature(0, 3)]
    with pytest.raises(ValueError, match="too long"):
        tokenize_text(tiny_lm, "the " * 2000)


def test_search_ranks_by_fraction_of_max(tiny_lm, tiny_transcoder, maxima):
    text = "the cat sat on the mat"
    found = search_features(tiny_lm, tiny_transcoder, maxima, text, top=10)
    assert found and [f["fraction_of_max"] for f in found] == sorted((f["fraction_of_max"] for f in found), reverse=True)
    for hit in found[:3]:
        feature = parse_feature(hit["feature"])
        (measured,) = measure_texts(tiny_lm, tiny_transcoder, feature, [text], maxima.dataset_max(feature))
        assert hit["fraction_of_max"] == pytest.approx(measured.fraction_of_max, rel=1e-5)
    brute = [measure_texts(tiny_lm, tiny_transcoder, Feature(l, i), [text], maxima.dataset_max(Feature(l, i)))[0]
             for l in range(3) for i in range(1 if l == 0 else 0, 24)]
    assert found[0]["fraction_of_max"] == pytest.approx(max(r.fraction_of_max or 0 for r in brute), rel=1e-5)


def test_feature_page_puts_dreams_beside_examples(tiny_lm, tiny_transcoder, maxima):
    feature, config = Feature(1, 13), DreamConfig(template="the {prompt} on", prompt_length=2)
    dataset_max = maxima.dataset_max(feature)

    def prompt(text, ce=3.0, origin="sampled", run=2, against=dataset_max):
        return dreamed_prompt(tiny_lm, tiny_transcoder, feature, text, config.template, against, ce, origin, run)

    a, b, c = prompt("cat sat"), prompt("dog ran", 4.0, "dataset #0", 5), prompt("red sun", 2.0, "random", None)
    assert len({a.activation, b.activation, c.activation}) == 3 and min(a.activation, b.activation, c.activation) > 0
    first = dream_result(feature, config, dataset_max, [a, b], diverse=[b, a])
    second = dream_result(feature, config.model_copy(update={"seed": 1}), dataset_max, [c], diverse=[c, a])
    stale = dream_result(feature, config, dataset_max * 2, [prompt("big tree", against=dataset_max * 2)])
    dreams = [r.model_dump(mode="json") for r in (first, second, stale)]
    page = feature_page(tiny_lm, tiny_transcoder, maxima, feature, dreams, top=3)
    assert len(page["examples"]) == 3 and page["examples"][0]["fraction_of_max"] == pytest.approx(1.0, rel=1e-5)
    assert "length_matched" not in page["examples"][0] and page["length"] is None
    by_activation = [p.prompt for p in sorted([a, b, c], key=lambda p: -p.activation)]
    assert [d["prompt"] for d in page["dreams"]] == by_activation
    for d in page["dreams"]:
        point = {p.prompt: p for p in (a, b, c)}[d["prompt"]]
        assert d["fraction_of_max"] == pytest.approx(point.activation / dataset_max)
        assert (d["origin"], d["longest_shared_run"], d["cross_entropy"]) == (
            point.origin, point.longest_shared_run, point.cross_entropy)
    # the union of the current results' diverse sets, one entry per token sequence, most active first
    assert [d["prompt"] for d in page["diverse"]] == by_activation
    assert {d["origin"] for d in page["diverse"]} == {"sampled", "dataset #0", "random"}
    # a result scored against another max is never current: listed apart, with its own yardstick and fraction
    (old,) = page["stale_dreams"]
    assert old["prompt"] == "big tree" and old["scored_against"] == dataset_max * 2
    assert old["fraction_of_max"] == pytest.approx(stale.frontier[0].activation / (dataset_max * 2))
    # a result without a yardstick (dreamed before the maxima were built) is stale too
    unscaled = dream_result(feature, config, None, [prompt("big tree", against=None)]).model_dump(mode="json")
    page = feature_page(tiny_lm, tiny_transcoder, maxima, feature, [unscaled], top=1)
    assert page["dreams"] == [] and page["stale_dreams"][0]["scored_against"] is None


def test_length_matched_examples_against_a_direct_computation(tiny_lm, tiny_transcoder, maxima):
    feature, length = Feature(1, 3), 6
    dataset_max = maxima.dataset_max(feature)
    contexts = maxima.top_contexts(feature)
    ids = contexts[0][0]
    # the examples' own contexts, and cuts of one window ending at chosen positions (shorter than length at 2)
    cases = [(render_examples(tiny_lm, tiny_transcoder, maxima, feature, length=length), contexts),
             ([{"length_matched": m} for m in cut_examples(tiny_lm, tiny_transcoder, feature, [(ids, 2), (ids, 9),
                                                           (ids, 15)], length, dataset_max, with_cross_entropy=True)],
              [(ids, 2), (ids, 9), (ids, 15)])]
    for examples, expected_contexts in cases:
        assert len(examples) == len(expected_contexts)
        for example, (window, position) in zip(examples, expected_contexts):
            cut = window[max(1, position + 1 - length) : position + 1]
            sequence = torch.tensor([[tiny_lm.bos_token_id, *cut]])
            with torch.no_grad():
                x = tiny_lm.capture(sequence, [(HOOK_MLP_IN, 1)])[(HOOK_MLP_IN, 1)][0]
                activation = float(tiny_transcoder.encode(x, 1)[1:, 3].max())
                logprobs = tiny_lm.model(sequence).logits[0, :-1].log_softmax(-1)
            ce = float(-logprobs.gather(-1, sequence[0, 1:, None]).mean())
            matched = example["length_matched"]
            assert matched["tokens"] == len(cut) == min(length, position)
            assert matched["activation"] == pytest.approx(activation, rel=1e-5, abs=1e-6)
            assert matched["fraction_of_max"] == pytest.approx(activation / dataset_max, rel=1e-5, abs=1e-6)
            assert matched["cross_entropy"] == pytest.approx(ce, rel=1e-5)
            assert matched["text"] == tiny_lm.tokenizer.decode(cut)
    page = feature_page(tiny_lm, tiny_transcoder, maxima, feature, [], top=2, length=length)
    assert page["length"] == length and all(e["length_matched"]["tokens"] <= length for e in page["examples"])
    with pytest.raises(ValueError, match="length must be at least 1"):
        cut_examples(tiny_lm, tiny_transcoder, feature, contexts, 0, dataset_max)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, tempfile
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import make_tiny_lm, make_tiny_transcoder, random_windows, WORDS, SPECIALS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from dreaming.maxima import MaximaConfig, build_maxima
    vocab = {{t: i for i, t in enumerate(SPECIALS + WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>")
    lm = make_tiny_lm(tokenizer)
    transcoder = make_tiny_transcoder(lm, features=256)
    peaks = []  # the peak resident size after each build (it only grows): a warm-up, then each size in turn
    for n in [64] + [int(n) for n in sys.argv[1:]]:
        build_maxima(lm, transcoder, random_windows(n, 64, len(tokenizer)), tempfile.mkdtemp() + "/m", "x",
                     MaximaConfig(batch_windows=64), progress=False)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(*peaks[1:])
""")


def test_memory_stays_bounded_as_the_corpus_grows():
    """Peak memory of a build over 2,000 windows after one over 250, in one process: it grows by less than 32 MB.
    Keeping per-token activations would take 2,000 × 63 × 3 × 256 × 4 bytes ≈ 387 MB; the fixed buffers and the
    windows themselves take a few MB."""
    script = MEMORY_SCRIPT.format(tests=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", script, "250", "2000"], capture_output=True, text=True, check=True)
    small_kb, large_kb = map(int, run.stdout.split()[-2:])
    assert large_kb - small_kb < 32 * 1024, (small_kb, large_kb)
