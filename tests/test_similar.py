"""Similar features (dreaming/similar.py): read in chunks from disk, equal to the cosine of the whole concatenated
decoder matrix, highest or lowest; zero decoders never listed; clear errors; the `dreaming similar` command."""

import json

import pytest
import torch

from dreaming.cli import main
from dreaming.features import parse_feature
from dreaming.formats import load_transcoder, read_config
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.similar import similar_features
from dreaming.transcoders import CLT, SET, Transcoder, TranscoderConfig

N_LAYERS, D_MODEL, FEATURES = 3, 8, 24
ZERO = ["0/5", "2/0", "2/23"]  # features whose decoders are all zeros


@pytest.fixture(scope="module", params=[CLT, SET])
def transcoder_dir(request, tmp_path_factory):
    """A random transcoder of each kind, saved to disk, with the decoders of ZERO set to zero."""
    generator = torch.Generator().manual_seed(0)
    transcoder = Transcoder(TranscoderConfig(request.param, N_LAYERS, D_MODEL, FEATURES, activation="relu"))
    with torch.no_grad():
        for parameter in transcoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for feature in map(parse_feature, ZERO):
            transcoder.W_dec[feature.layer][feature.index] = 0
    directory = tmp_path_factory.mktemp(request.param) / "transcoder"
    save_transcoder(transcoder, directory)
    return directory


def brute_force(transcoder: Transcoder, feature: str, top: int, lowest: bool = False) -> list[tuple[str, float]]:
    """Cosines of the whole [n_layers * F, n_layers * d_model] matrix of concatenated normalised decoders; listed
    are the features with a nonzero decoder that write to a layer the feature writes to, itself excluded: the
    `top` highest, or with `lowest` the `top` lowest."""
    c = transcoder.config
    n, F, d = c.n_layers, c.d_transcoder, c.d_model
    full = torch.zeros(n, F, n, d)  # [layer, index, output layer, d_model]
    writes = torch.zeros(n, F, n, dtype=torch.bool)  # [layer, index, output layer]
    for layer in range(n):
        if c.kind == CLT:
            full[layer, :, layer:] = transcoder.W_dec[layer]
            writes[layer, :, layer:] = True
        else:
            full[layer, :, layer] = transcoder.W_dec[layer]
            writes[layer, :, layer] = True
    full, writes = full.reshape(n * F, n * d), writes.reshape(n * F, n)
    norms = full.norm(dim=1)
    unit = full / norms.clamp_min(1e-30)[:, None]
    f = parse_feature(feature)
    target = f.layer * F + f.index
    cosine = unit @ unit[target]
    listed = (norms > 0) & (writes.float() @ writes[target].float() > 0)
    listed[target] = False
    cosine[~listed] = float("inf") if lowest else -float("inf")
    values, keys = cosine.topk(min(top, int(listed.sum())), largest=not lowest)
    return [(f"{key // F}/{key % F}", value) for value, key in zip(values.tolist(), keys.tolist())]


@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
@pytest.mark.parametrize("feature", ["0/0", "1/7", "2/12"])
@pytest.mark.parametrize("top", [1, 10, N_LAYERS * FEATURES])
@pytest.mark.parametrize("lowest", [False, True])
def test_equal_to_the_whole_matrix(transcoder_dir, feature, top, chunk_rows, lowest):
    found = similar_features(transcoder_dir, feature, top=top, chunk_rows=chunk_rows, lowest=lowest)
    expected = brute_force(load_transcoder(transcoder_dir), feature, top, lowest)
    assert [hit["feature"] for hit in found] == [key for key, _ in expected]
    assert [hit["cosine"] for hit in found] == pytest.approx([value for _, value in expected], abs=1e-5)
    assert all(-1 - 1e-5 <= hit["cosine"] <= 1 + 1e-5 for hit in found)


def test_zero_decoders_are_never_listed(transcoder_dir):
    everything = similar_features(transcoder_dir, "2/5", top=N_LAYERS * FEATURES, chunk_rows=7)
    listed = [hit["feature"] for hit in everything]
    assert not set(ZERO) & set(listed) and "2/5" not in listed
    # every other nonzero feature of a CLT; of a set, those of layer 2 only (less 2/0 and 2/23)
    assert len(listed) == (N_LAYERS * FEATURES - 4 if read_config(transcoder_dir).kind == CLT else FEATURES - 3)
    cosines = [hit["cosine"] for hit in everything]
    assert cosines == sorted(cosines, reverse=True)
    lowest = similar_features(transcoder_dir, "2/5", top=N_LAYERS * FEATURES, chunk_rows=7, lowest=True)
    assert [hit["feature"] for hit in lowest] == listed[::-1]
    assert similar_features(transcoder_dir, "0/5") == []  # a zero decoder is similar to nothing


def test_errors(transcoder_dir):
    with pytest.raises(ValueError, match="unknown feature 3/0: layer must be in 0..2"):
        similar_features(transcoder_dir, "3/0")
    with pytest.raises(ValueError, match="index must be in 0..23"):
        similar_features(transcoder_dir, "1/24")
    with pytest.raises(ValueError, match="malformed feature id"):
        similar_features(transcoder_dir, "1-2")
    with pytest.raises(ValueError, match="top must be at least 1"):
        similar_features(transcoder_dir, "1/2", top=0)


def test_the_command(tiny_bundle, capsys):
    bundle = ["--bundle", str(tiny_bundle.directory)]
    capsys.readouterr()
    main(["similar", *bundle, "--feature", "1/3", "--top", "5", "--json"])
    found = json.loads(capsys.readouterr().out)
    expected = similar_features(tiny_bundle.directory / "transcoder", "1/3", top=5)
    assert [(hit["feature"], hit["cosine"]) for hit in found] == [(e["feature"], e["cosine"]) for e in expected]
    maxima = tiny_bundle.maxima()
    for hit in found:
        summary = maxima.summary(parse_feature(hit["feature"]))
        assert (hit["density"], hit["dataset_max"]) == (summary["density"], summary["dataset_max"])
    main(["similar", *bundle, "--feature", "1/3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["feature", "cosine", "density", "dataset", "max"] and len(lines) == 11
    assert lines[1].split()[0] == found[0]["feature"]
    with pytest.raises(SystemExit, match="error: unknown feature 9/0"):
        main(["similar", *bundle, "--feature", "9/0"])
    with pytest.raises(SystemExit, match="top must be at least 1"):
        main(["similar", *bundle, "--feature", "1/3", "--top", "0"])
