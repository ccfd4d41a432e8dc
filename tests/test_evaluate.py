"""Evaluating a transcoder (a fitted skip set, a random CLT with cross-layer writes) on a tiny model, against direct
computations one sequence at a time."""

import copy
from functools import partial

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm, make_tiny_transcoder, random_windows
from dreaming.build.evaluate import LOG10_DENSITY_EDGES, evaluate_transcoder, window_sequences
from dreaming.build.train import TrainConfig, layer_activations, split_windows, train_transcoder
from dreaming.maxima import DENSE_ABOVE
from dreaming.models import HOOK_MLP_OUT

CONFIG = TrainConfig(features_per_layer=16, k=3, fit_tokens=64 * 12, kmeans_iterations=4, batch_windows=8,
                     heldout_windows=6)


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    """The tiny llama with sharp next-token distributions (its random unembedding × 10: logits of std ~1, as a
    trained model's), so that a replacement's KL stands well above rounding."""
    lm = make_tiny_lm(tiny_tokenizer)
    lm.model.lm_head.weight.data.mul_(10)
    return lm


@pytest.fixture(scope="module")
def windows(lm):
    return random_windows(80, 24, len(lm.tokenizer))


@pytest.fixture(scope="module")
def fitted(lm, windows, tmp_path_factory):
    """The closed-form skip transcoder set (each feature fires on 3/16 of the fit tokens: many are dense)."""
    return train_transcoder(lm, windows, CONFIG, tmp_path_factory.mktemp("t") / "transcoder", False)


def direct_logits(lm, transcoder, ids: list[int], replaced: list[int]) -> torch.Tensor:
    """The model's next-token logits [pos - 1, vocab] on one sequence with the MLP outputs of the `replaced` layers written by
    `transcoder.decode` from the features of every layer so far, each read from its MLP's own input in this pass
    (the BOS position keeps the model's output)."""
    L, F = transcoder.config.n_layers, transcoder.config.d_transcoder
    acts = [torch.zeros(len(ids), F) for _ in range(L)]  # layers not yet run write nothing
    inputs = torch.zeros(L, len(ids), transcoder.config.d_model)

    def read_and_write(module, args, output, layer):
        inputs[layer] = args[0][0].float()
        acts[layer] = transcoder.encode(inputs[layer], layer)
        if layer in replaced:
            written = transcoder.decode(acts, inputs)[layer]  # [pos, d_model]
            written[0] = output[0, 0]
            return written[None]

    handles = [lm.hook_module(HOOK_MLP_OUT, layer)[0].register_forward_hook(partial(read_and_write, layer=layer))
               for layer in range(L)]
    try:
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    finally:
        for handle in handles:
            handle.remove()


def direct_ce_and_kl(lm, transcoder, sequences, replaced) -> tuple[float, float]:
    """Cross-entropy and KL(model ‖ replacement), each averaged over every position that predicts a next token."""
    ce, kl, n = 0.0, 0.0, 0
    for ids in sequences:
        model = direct_logits(lm, transcoder, ids, []).log_softmax(-1)  # [pos - 1, vocab]
        replacement = direct_logits(lm, transcoder, ids, replaced).log_softmax(-1)
        ce -= replacement[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        kl += (model.exp() * (model - replacement)).sum().item()
        n += len(ids) - 1
    return ce / n, kl / n


@pytest.mark.parametrize("kind", ["fitted set", "random CLT"])
def test_evaluation_matches_a_direct_computation(lm, windows, fitted, kind):
    transcoder = fitted if kind == "fitted set" else make_tiny_transcoder(lm, features=24)
    sequences = window_sequences(windows, split_windows(windows, CONFIG.heldout_windows, CONFIG.seed)[1])
    sequences += [[1, 5, 6, 7], [1, 9]]  # short texts, as the varied texts are, padded in their batch
    report = evaluate_transcoder(lm, transcoder, sequences, batch_size=3, splice_each_layer=True,
                                 progress=False)  # several batches
    xs, ys = zip(*(layer_activations(lm, torch.tensor([ids]), torch.tensor([len(ids)])) for ids in sequences))
    x, y = torch.cat(xs, 1).float(), torch.cat(ys, 1).float()
    with torch.no_grad():
        acts, reconstruction = transcoder(x)
    fvu = (reconstruction - y).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))
    np.testing.assert_allclose(report["fvu"], fvu.numpy(), rtol=1e-4)
    np.testing.assert_allclose(report["l0"], torch.stack([(a > 0).float().sum(-1).mean() for a in acts]).numpy(),
                               rtol=1e-5)
    assert report["tokens"] == sum(len(ids) - 1 for ids in sequences) and report["sequences"] == len(sequences)

    # densities: the share of these tokens each feature is active on
    density = torch.stack([(a > 0).double().mean(0) for a in acts]).numpy()  # [L, F]
    np.testing.assert_allclose(report["dead_fraction"], (density == 0).mean(1))
    np.testing.assert_allclose(report["dense_fraction"], (density > DENSE_ABOVE).mean(1))
    assert report["mean_dead_fraction"] == pytest.approx((density == 0).mean())
    assert report["mean_dense_fraction"] == pytest.approx((density > DENSE_ABOVE).mean())
    live = density[density > 0]
    counts = [int(((np.log10(live) >= low) & (np.log10(live) < high)).sum())
              for low, high in zip(LOG10_DENSITY_EDGES[:-1], LOG10_DENSITY_EDGES[1:])]
    counts[-1] += int((live == 1).sum())  # the last bin holds its right edge, density 1
    assert report["log10_density_counts"] == counts and sum(counts) == len(live)
    p1, p50, p99 = np.percentile(live, [1, 50, 99])
    assert (report["density_p1"], report["density_p50"], report["density_p99"]) == pytest.approx((p1, p50, p99))
    assert report["density_decades"] == pytest.approx(np.log10(p99 / p1))
    assert report["mean_dense_fraction" if kind == "fitted set" else "mean_dead_fraction"] > 0  # both kinds occur

    # the model's own cross-entropy, from Hugging Face's loss one sequence at a time
    losses = [lm.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1)
              for ids in sequences]
    assert report["cross_entropy"] == pytest.approx(sum(losses) / sum(len(ids) - 1 for ids in sequences), rel=1e-5)
    # every MLP replaced, and each layer spliced alone (a CLT's layer 2 reads the features of layers 0 and 1)
    ce, kl = direct_ce_and_kl(lm, transcoder, sequences, replaced=[0, 1, 2])
    assert (report["replacement_cross_entropy"], report["replacement_kl"]) == pytest.approx((ce, kl), rel=1e-4)
    assert kl > 1e-4  # far above rounding
    for layer in range(3):
        ce, kl = direct_ce_and_kl(lm, transcoder, sequences, replaced=[layer])
        assert (report["spliced_cross_entropy"][layer], report["spliced_kl"][layer]) == pytest.approx((ce, kl),
                                                                                                     rel=1e-4)


def test_splicing_an_exact_reconstruction_changes_nothing(lm, fitted, monkeypatch):
    """Make layer 1's MLP a linear map and the transcoder's skip that same map (no features): splicing layer 1 must
    leave the cross-entropy as it is (KL 0), while splicing the other layers (real fits) changes it."""
    transcoder = copy.deepcopy(fitted)
    generator = torch.Generator().manual_seed(0)
    linear = torch.randn(32, 32, generator=generator) / 32**0.5  # [d_out, d_in]
    mlp = lm.layers[1].mlp
    monkeypatch.setattr(mlp, "forward", lambda x: x @ linear.T)
    with torch.no_grad():
        transcoder.W_skip[1].copy_(linear)
        transcoder.W_dec[1].zero_()
        transcoder.b_dec[1].zero_()
    sequences = [[1, 5, 6, 7, 8, 9], [1, 9, 10]]
    report = evaluate_transcoder(lm, transcoder, sequences, splice_each_layer=True, progress=False)
    spliced = report["spliced_cross_entropy"]
    assert spliced[1] == pytest.approx(report["cross_entropy"], rel=1e-5)
    assert report["spliced_kl"][1] == pytest.approx(0, abs=1e-6)
    assert spliced[0] != pytest.approx(report["cross_entropy"], rel=1e-4) and report["spliced_kl"][0] > 1e-4
    assert report["replacement_cross_entropy"] != pytest.approx(report["cross_entropy"], rel=1e-4)
