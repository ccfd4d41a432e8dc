"""Output tokens against a direct computation: the decoder (summed over its output layers) through the unembedding."""

import pytest
import torch

from conftest import make_tiny_transcoder
from dreaming.activation import token_pieces
from dreaming.features import Feature
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.output_tokens import output_tokens
from dreaming.transcoders import SET, Transcoder, TranscoderConfig


def direct(lm, transcoder: Transcoder, feature: Feature, k: int):
    if transcoder.config.kind == SET:
        direction = transcoder.W_dec[feature.layer, feature.index]
    else:
        direction = transcoder.W_dec[feature.layer][feature.index].sum(0)  # [n_layers - layer, d] -> [d]
    logits = lm.model.get_output_embeddings().weight @ direction  # [vocab]
    pieces = lambda ids: token_pieces(lm, lm.tokenizer.convert_ids_to_tokens(ids.tolist()))  # noqa: E731
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    return {"top": list(zip(pieces(top.indices), top.values.tolist())),
            "bottom": list(zip(pieces(bottom.indices), bottom.values.tolist()))}


@pytest.fixture(scope="module")
def transcoders(tiny_lm, tmp_path_factory):
    clt = make_tiny_transcoder(tiny_lm)
    config = TranscoderConfig(SET, tiny_lm.n_layers, tiny_lm.d_model, 16, activation="relu")
    per_layer = Transcoder(config)
    with torch.no_grad():
        for parameter in per_layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    saved = []
    for name, transcoder in (("clt", clt), ("set", per_layer)):
        directory = tmp_path_factory.mktemp(name)
        save_transcoder(transcoder, directory)
        saved.append((transcoder, directory))
    return saved


@pytest.mark.parametrize("which", [0, 1], ids=["clt", "set"])
def test_output_tokens_equal_the_decoder_through_the_unembedding(tiny_lm, transcoders, which):
    transcoder, directory = transcoders[which]
    features = [Feature(0, 3), Feature(2, 5), Feature(1, 0)]
    found = output_tokens(tiny_lm, directory, features, k=4)
    for feature, tokens in zip(features, found):
        expected = direct(tiny_lm, transcoder, feature, 4)
        for side in ("top", "bottom"):
            assert [token for token, _ in tokens[side]] == [token for token, _ in expected[side]]
            assert [value for _, value in tokens[side]] == pytest.approx([v for _, v in expected[side]], rel=1e-5)
        assert tokens["top"][0][1] >= tokens["top"][-1][1] and tokens["bottom"][0][1] <= tokens["bottom"][-1][1]


def test_output_tokens_bad_input(tiny_lm, transcoders):
    _, directory = transcoders[0]
    with pytest.raises(ValueError, match="k must be at least 1"):
        output_tokens(tiny_lm, directory, [Feature(0, 1)], k=0)
    with pytest.raises(ValueError, match="0..2"):
        output_tokens(tiny_lm, directory, [Feature(3, 1)])
