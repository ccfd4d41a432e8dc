"""Training a cross-layer transcoder by gradient on a tiny model: the loss, its gradient step, the sparse decoder
against the dense one, the saved file against circuit-tracer's own loader, and reproducibility."""

import numpy as np
import pytest
import torch

from conftest import random_windows
from dreaming.build.train_clt import CLTConfig, TrainingCLT, Units, activation_batches, batch_topk, train_clt
from dreaming.formats import load_transcoder
from dreaming.transcoders import CLT

SMALL = dict(features_per_layer=16, k=3, tokens=6 * 128, batch_tokens=128, buffer_tokens=256, init_tokens=64,
             init_k=3, batch_windows=8, heldout_windows=6, lr=3e-3)


@pytest.fixture(scope="module")
def windows(tiny_lm):
    return random_windows(80, 24, len(tiny_lm.tokenizer))


def random_clt(n_layers=3, d_model=32, features=16, seed=0, skip=True) -> TrainingCLT:
    generator = torch.Generator().manual_seed(seed)
    clt = TrainingCLT(n_layers, d_model, features, skip)
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return clt


ONES = Units(torch.ones(3), torch.ones(3))


def test_batch_topk_keeps_the_k_times_batch_largest_per_layer():
    pre = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    acts, smallest = batch_topk(pre, 2)
    for layer in range(3):
        kept = pre[layer].flatten().sort(descending=True).values[:20]  # brute force: the 2·10 largest
        assert (acts[layer] > 0).sum() == 20
        torch.testing.assert_close(acts[layer].flatten().sort(descending=True).values[:20], kept)
        assert smallest[layer] == kept[-1]


@pytest.mark.parametrize("skip", [True, False])
def test_sparse_decode_equals_the_dense_decoder(skip):
    clt = random_clt(skip=skip)
    generator = torch.Generator().manual_seed(1)
    acts, _ = batch_topk(torch.randn(3, 7, 16, generator=generator), 4)
    x = torch.randn(3, 7, 32, generator=generator)
    transcoder = clt.to_transcoder(ONES, torch.zeros(3), None)  # circuit-tracer's layout, per source layer
    dense = transcoder.decode(list(acts), x)  # [n_layers, B, d]: every slot, dense matmuls
    torch.testing.assert_close(clt.decode(acts, x), dense, rtol=1e-5, atol=1e-5)


def test_loss_gradient_matches_finite_differences_and_a_step_lowers_it():
    clt = random_clt().double()
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 12, 32, generator=generator, dtype=torch.float64), torch.randn(3, 12, 32, generator=generator,
                                                                                          dtype=torch.float64)
    loss, _, _ = clt.loss(x, y, k=3)
    loss.backward()
    parameter = clt.decoders[2]  # what layers 0-2 write to layer 2: an entry of a feature that fired
    index = tuple(int(i) for i in parameter.grad.nonzero()[len(parameter.grad.nonzero()) // 2])
    with torch.no_grad():
        eps = 1e-6
        parameter[index] += eps
        plus = clt.loss(x, y, k=3)[0].item()
        parameter[index] -= 2 * eps
        minus = clt.loss(x, y, k=3)[0].item()
        parameter[index] += eps
    assert parameter.grad[index].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)
    optimizer = torch.optim.SGD(clt.parameters(), lr=0.05)
    optimizer.step()
    assert clt.loss(x, y, k=3)[0].item() < loss.item()


def test_training_lowers_the_loss_and_saves_a_clt_circuit_tracer_encodes_the_same(tiny_lm, windows, tmp_path):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    log = []
    trained = train_clt(tiny_lm, windows, CLTConfig(**SMALL), tmp_path / "clt", progress=False, log=log)
    assert log[-1]["fvu"] < log[0]["fvu"]
    assert trained.config.kind == CLT and trained.config.activation == "jumprelu"
    ours = load_transcoder(tmp_path / "clt")
    assert ours.config.skip_connection
    for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip"):
        torch.testing.assert_close(getattr(ours, name), getattr(trained, name))
    theirs = load_clt(str(tmp_path / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(3))
    for layer in range(3):
        torch.testing.assert_close(theirs.encode_layer(x[layer], layer), ours.encode(x[layer], layer))
        torch.testing.assert_close(theirs.W_dec[layer], ours.W_dec[layer])


def test_the_saved_clt_in_model_units_computes_what_was_trained(tiny_lm, windows, tmp_path):
    """Folding the scales into the weights and BatchTopK into one threshold per layer keeps the reconstruction:
    on a batch, the saved CLT's JumpReLU reconstruction (model units) equals the trained units' reconstruction
    with the same features active, rescaled."""
    config = CLTConfig(**{**SMALL, "tokens": 128})
    trained = train_clt(tiny_lm, windows, config, tmp_path / "clt", progress=False)
    from dreaming.build.train import split_windows

    fit, _ = split_windows(windows, config.heldout_windows, config.seed)
    x, y = next(activation_batches(tiny_lm, windows, fit, config, Units(torch.ones(3), torch.ones(3)),
                                   torch.Generator().manual_seed(0)))
    acts, reconstruction = trained(x)  # model units
    assert torch.isfinite(reconstruction).all()
    mean_l0 = np.mean([(a > 0).float().sum(-1).mean().item() for a in acts])
    assert 0.25 * config.k < mean_l0 < 4 * config.k  # the per-layer threshold keeps L0 near k


def test_training_is_reproducible_under_a_seed(tiny_lm, windows, tmp_path):
    config = CLTConfig(**{**SMALL, "tokens": 3 * 128})
    first = train_clt(tiny_lm, windows, config, tmp_path / "a", progress=False)
    second = train_clt(tiny_lm, windows, config, tmp_path / "b", progress=False)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    other = train_clt(tiny_lm, windows, CLTConfig(**{**SMALL, "tokens": 3 * 128, "seed": 1}), tmp_path / "c",
                      progress=False)
    assert not torch.equal(first.W_enc, other.W_enc)


def test_a_random_start_also_trains(tiny_lm, windows, tmp_path):
    log = []
    train_clt(tiny_lm, windows, CLTConfig(**{**SMALL, "init_tokens": 0}), tmp_path / "clt", progress=False, log=log)
    assert log[-1]["fvu"] < log[0]["fvu"]


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="k"):
        CLTConfig(features_per_layer=8, k=16)
    with pytest.raises(ValueError, match="init_tokens"):
        CLTConfig(features_per_layer=512, init_tokens=1000)
    with pytest.raises(ValueError, match="batch_tokens"):
        CLTConfig(batch_tokens=4096, buffer_tokens=1024)


def test_no_gradient_step_saves_the_closed_form_start(tiny_lm, windows, tmp_path):
    """tokens=0: the per-layer closed-form fit as a CLT: no later-layer writes, JumpReLU at 0 (its ReLU), and each
    layer equal to `fit_layer` on the same activations."""
    from dreaming.build.train import TrainConfig, collect_activations, fit_layer, split_windows

    config = CLTConfig(**{**SMALL, "tokens": 0})
    start = train_clt(tiny_lm, windows, config, tmp_path / "clt", progress=False)
    assert torch.equal(start.threshold, torch.zeros_like(start.threshold))
    assert all(not start.W_dec[layer][:, 1:].any() for layer in range(3))
    fit_windows, _ = split_windows(windows, config.heldout_windows, config.seed)
    x, y = collect_activations(tiny_lm, windows, fit_windows, config.init_tokens, config.batch_windows, False)
    units = Units.measure(x, y)
    x_units, y_units = units.apply(x, y)
    fit = fit_layer(x_units[0], y_units[0], TrainConfig(features_per_layer=16, k=3, fit_tokens=64),
                    torch.Generator().manual_seed(config.seed))
    acts = (x_units[0] @ fit.W_enc.T + fit.b_enc).relu()
    expected = (acts @ fit.W_dec + x_units[0] @ fit.W_skip.T + fit.b_dec) / units.y_scale[0]  # model units
    _, reconstruction = start(x.float())
    torch.testing.assert_close(reconstruction[0], expected, rtol=1e-4, atol=1e-4)


TOLERANCE = 0.02


def test_batches_stream_training_tokens_once_each_and_never_held_out_ones(tiny_lm, windows):
    """Within one pass over the training windows every yielded token is a training window's token, none more often
    than it occurs there (rows are compared within TOLERANCE: a window's activations depend a little on its batch
    and its padding)."""
    from dreaming.build.train import layer_activations, split_windows

    config = CLTConfig(**SMALL)
    fit, heldout = split_windows(windows, config.heldout_windows, config.seed)

    def rows(indices):  # each token's MLP inputs across layers [tokens, n_layers · d_model]
        x, _ = layer_activations(tiny_lm, torch.from_numpy(windows.tokens[indices]).long(),
                                 torch.from_numpy(windows.lengths[indices]).long())
        return x.float().transpose(0, 1).flatten(1)

    training, held = rows(fit), rows(heldout)
    batches = activation_batches(tiny_lm, windows, fit, config, ONES, torch.Generator().manual_seed(0))
    seen = []
    while sum(len(x) for x in seen) + config.batch_tokens <= len(training) - config.buffer_tokens:  # (the buffer
        # mixes the next pass's first tokens with this one's last ones)
        seen.append(next(batches)[0].transpose(0, 1).flatten(1))
    seen = torch.cat(seen)
    between = torch.cdist(training, training)
    assert between[between > TOLERANCE].min() > 5 * TOLERANCE  # distinct contexts are far apart: the test can tell
    same = between < TOLERANCE  # equal contexts (e.g. one token after BOS) give equal rows
    group = same.float().argmax(1)  # each training row's first equal row
    distance, nearest = torch.cdist(seen, training).min(1)
    assert (distance < TOLERANCE).all()  # every yielded token is a training token
    yielded, occurs = torch.bincount(group[nearest], minlength=len(training)), torch.bincount(group, minlength=len(training))
    assert (yielded <= occurs).all() and yielded.sum() == len(seen)
    only_held = torch.cdist(held, training).min(1).values > TOLERANCE  # held-out tokens whose context no training token has
    assert (torch.cdist(seen, held[only_held]).min(1).values > TOLERANCE).all()
