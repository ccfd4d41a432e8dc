"""Fitting a skip transcoder set on a tiny model, against direct computations."""

import numpy as np
import pytest
import torch

from conftest import random_windows
from dreaming.build import train
from dreaming.build.train import (
    TrainConfig,
    fit_layer,
    least_squares,
    spherical_kmeans,
    train_transcoder,
)
from dreaming.formats import load_transcoder
from dreaming.transcoders import SET

SMALL = dict(features_per_layer=16, k=3, fit_tokens=64 * 12, kmeans_iterations=4, batch_windows=8, heldout_windows=6)


@pytest.fixture(scope="module")
def windows(tiny_lm):
    return random_windows(80, 24, len(tiny_lm.tokenizer))


def test_least_squares_equals_a_direct_solve():
    generator = torch.Generator().manual_seed(0)
    a, y = torch.randn(200, 7, generator=generator, dtype=torch.float64), torch.randn(200, 3, generator=generator,
                                                                                       dtype=torch.float64)
    weights, bias = least_squares(a, y, ridge=0.0)
    design = torch.cat([a, torch.ones(200, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(weights, expected[:7], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bias, expected[7], atol=1e-6, rtol=1e-6)


def test_spherical_kmeans_finds_separated_directions():
    generator = torch.Generator().manual_seed(0)
    centres = torch.linalg.qr(torch.randn(8, 4, generator=generator)).Q.T  # 4 orthogonal unit directions in 8-d
    truth = torch.arange(400) % 4
    points = centres[truth] * (1 + torch.rand(400, 1, generator=generator)) + 0.05 * torch.randn(400, 8, generator=generator)
    found = spherical_kmeans(points, 4, 10, torch.Generator().manual_seed(1))
    pairs = {(int(t), int(f)) for t, f in zip(truth, found)}
    assert len(pairs) == 4 and len({f for _, f in pairs}) == 4  # the clusters are the true groups, relabelled


def test_fit_layer_density_and_fit():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 12, generator=generator)
    y = (x @ torch.randn(12, 12, generator=generator)).relu() ** 2 + 0.5 * x  # a non-linear "MLP" with a linear part
    config = TrainConfig(features_per_layer=40, k=4, fit_tokens=3000, kmeans_iterations=5)
    fit = fit_layer(x, y, config, torch.Generator().manual_seed(0))
    acts = (x @ fit.W_enc.T + fit.b_enc).relu()  # [N, F]
    density = (acts > 0).float().mean(0)
    assert torch.allclose(density, torch.full_like(density, 4 / 40), atol=2 / 3000)  # each fires on its share k/F
    assert abs((acts > 0).float().sum(-1).mean().item() - 4) < 0.05  # so the mean L0 is k
    reconstruction = acts @ fit.W_dec + x @ fit.W_skip.T + fit.b_dec
    fvu = ((reconstruction - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    skip_only, skip_bias = least_squares(x, y, 0.0)
    fvu_linear = ((x @ skip_only + skip_bias - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    assert fvu < 0.8 * fvu_linear  # the features explain part of what a linear map cannot
    # the decoders are the least-squares fit on [acts, x] (the folding into model units changed nothing)
    weights, bias = least_squares(torch.cat([acts, x], 1), y, config.ridge)
    direct = torch.cat([acts, x], 1) @ weights + bias
    assert ((direct - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item() == pytest.approx(fvu, rel=2e-2)


def test_train_transcoder_saves_what_it_fitted(tiny_lm, windows, tmp_path):
    config = TrainConfig(**SMALL)
    transcoder = train_transcoder(tiny_lm, windows, config, tmp_path / "transcoder", progress=False)
    saved = load_transcoder(tmp_path / "transcoder")
    assert saved.config.kind == SET and saved.config.activation == "relu" and saved.W_skip is not None
    assert saved.config.d_transcoder == 16 and saved.config.n_layers == tiny_lm.n_layers
    for name in ("W_enc", "b_enc", "W_dec", "W_skip", "b_dec"):
        torch.testing.assert_close(getattr(saved, name), getattr(transcoder, name))
    # on the fit tokens every feature fires, and the mean L0 is k
    fit_windows, _ = train.split_windows(windows, config.heldout_windows, config.seed)
    x, _ = train.collect_activations(tiny_lm, windows, fit_windows, config.fit_tokens, config.batch_windows, False)
    for layer in range(tiny_lm.n_layers):
        acts = saved.encode(x[layer].float(), layer)
        assert (acts > 0).any(0).all()
        assert (acts > 0).float().sum(-1).mean().item() == pytest.approx(3, abs=0.1)


def test_bad_configurations_are_refused(tiny_lm, windows, tmp_path):
    with pytest.raises(ValueError, match="k .* cannot exceed"):
        TrainConfig(features_per_layer=8, k=16)
    with pytest.raises(ValueError, match="fit_tokens .* at least 4"):
        TrainConfig(features_per_layer=512, fit_tokens=1000)
    with pytest.raises(ValueError, match="only .* tokens to fit on"):
        train_transcoder(tiny_lm, windows, TrainConfig(**{**SMALL, "fit_tokens": 100_000}), tmp_path / "t",
                         progress=False)
    assert not (tmp_path / "t").exists()


def test_layer_activations_drop_bos_and_padding(tiny_lm, windows):
    tokens = torch.from_numpy(windows.tokens[:5]).long()
    lengths = torch.from_numpy(windows.lengths[:5]).long()
    x, y = train.layer_activations(tiny_lm, tokens, lengths)
    assert x.shape == y.shape == (3, int((lengths - 1).sum()), 32)
    assert np.isfinite(x.numpy()).all()
    # with the logits: the same activations, and the logits of the same pass
    x_again, y_again, logits = train.layer_activations(tiny_lm, tokens, lengths, return_logits=True)
    assert torch.equal(x_again, x) and torch.equal(y_again, y)
    attention_mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        torch.testing.assert_close(logits, tiny_lm.model(input_ids=tokens, attention_mask=attention_mask).logits)
