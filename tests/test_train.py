"""CLT training on a tiny model: it learns, it saves what it trained, it resumes, it reports."""

import numpy as np
import pytest
import torch

from conftest import random_windows
from dreaming import train
from dreaming.train import CLTTrainer, TrainConfig, evaluate_clt, train_clt
from dreaming.transcoders import load_transcoder

SMALL = dict(features_per_layer=64, k=4, batch_windows=4, buffer_windows=8, heldout_windows=4, reuse=2, lr=3e-3,
             warmup_steps=2, checkpoint_every=1000)


@pytest.fixture(scope="module")
def windows(tiny_lm):
    return random_windows(60, 24, len(tiny_lm.tokenizer))


def heldout(windows, config):
    return train.split_windows(windows, config)[1]


def test_training_lowers_fvu(tiny_lm, windows, tmp_path):
    # without the final least-squares refit, so only gradient steps differ
    short = TrainConfig(tokens=1, **{**SMALL, "refit_tokens": 0})  # one step: little more than the initialisation
    long = TrainConfig(tokens=2500, **{**SMALL, "refit_tokens": 0})
    fvu_short = evaluate_clt(tiny_lm, train_clt(tiny_lm, windows, short, tmp_path / "a", progress=False),
                             windows, heldout(windows, short), progress=False)["mean_fvu"]
    report = evaluate_clt(tiny_lm, train_clt(tiny_lm, windows, long, tmp_path / "b", progress=False),
                          windows, heldout(windows, long), progress=False)
    assert report["mean_fvu"] < 0.95 * fvu_short
    assert len(report["fvu"]) == len(report["l0"]) == len(report["dead_fraction"]) == 3
    assert 0 < report["mean_l0"] < 64
    assert report["replacement_cross_entropy"] > 0 and report["cross_entropy"] > 0
    # what was saved is what was returned
    saved = load_transcoder(tmp_path / "b" / "clt")
    assert saved.config.n_layers == 3 and saved.config.d_transcoder == 64 and saved.config.activation == "jumprelu"
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


@pytest.mark.parametrize("reach", [None, 1])
def test_saved_layout_computes_what_the_trainer_computes(reach):
    """Folding the normalisation and re-laying the decoders keeps pre-activations and reconstructions."""
    torch.manual_seed(0)
    config = TrainConfig(features_per_layer=16, k=2, reach=reach)
    trainer = CLTTrainer(n_layers=4, d_model=8, config=config)
    with torch.no_grad():
        for parameter in trainer.parameters():
            parameter.normal_()
        trainer.input_scale.uniform_(0.5, 2)
        trainer.output_scale.uniform_(0.5, 2)
    transcoder = trainer.to_transcoder("tiny")
    x = torch.randn(4, 5, 8)  # [layer, token, d_model], raw units
    pre = torch.baddbmm(trainer.b_enc, x * trainer.input_scale, trainer.W_enc)
    for layer in range(4):
        torch.testing.assert_close(transcoder.pre_activations(x[layer], layer), pre[layer])
    acts = torch.randn(4, 5, 16).relu()
    expected = torch.stack([
        acts.transpose(0, 1).reshape(5, -1)[:, trainer.first_source[t] * 16 : (t + 1) * 16] @ trainer.W_dec[t]
        + trainer.b_dec[t] for t in range(4)
    ]) / trainer.output_scale
    torch.testing.assert_close(transcoder.decode(list(acts)), expected)
    if reach is not None:  # a feature writes nothing beyond its reach
        assert transcoder.W_dec[0][:, reach + 1 :].abs().sum() == 0


class Crash(Exception):
    pass


def test_training_resumes_from_a_checkpoint(tiny_lm, windows, tmp_path, monkeypatch):
    config = TrainConfig(tokens=8 * 4 * 23, **{**SMALL, "checkpoint_every": 3})
    real_refresh, steps = train.ActivationBuffer.refresh, []

    def crash_at_step_five(self, n_windows):
        steps.append(1)
        if len(steps) == 5 and not (tmp_path / "crashed").exists():
            (tmp_path / "crashed").touch()
            raise Crash
        real_refresh(self, n_windows)

    monkeypatch.setattr(train.ActivationBuffer, "refresh", crash_at_step_five)
    with pytest.raises(Crash):
        train_clt(tiny_lm, windows, config, tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3
    steps.clear()
    train_clt(tiny_lm, windows, config, tmp_path, progress=False)
    assert len(steps) == 5  # steps 3..7 only (of 0..7)
    assert (tmp_path / "clt" / "config.yaml").exists()
    with pytest.raises(ValueError, match="another configuration"):
        (tmp_path / "clt").rename(tmp_path / "old")
        torch.save({"config": {}, "trainer": {}, "optimizer": {}, "step": 1, "next_window": 0}, tmp_path / "checkpoint.pt")
        train_clt(tiny_lm, windows, config, tmp_path, progress=False)


def test_bad_configurations_are_refused(tiny_lm, windows, tmp_path):
    with pytest.raises(ValueError, match="k .* cannot exceed"):
        TrainConfig(features_per_layer=8, k=16)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        TrainConfig(tokens=0)
    with pytest.raises(ValueError, match="the corpus has 60 windows"):
        train_clt(tiny_lm, windows, TrainConfig(**{**SMALL, "buffer_windows": 100}), tmp_path, progress=False)
    assert not any(tmp_path.glob("*/config.yaml"))


def test_layer_activations_drop_bos_and_padding(tiny_lm, windows):
    tokens = torch.from_numpy(windows.tokens[:5]).long()
    lengths = torch.from_numpy(windows.lengths[:5]).long()
    x, y = train.layer_activations(tiny_lm, tokens, lengths)
    assert x.shape == y.shape == (3, int((lengths - 1).sum()), 32)
    assert np.isfinite(x.numpy()).all()


def test_evaluation_matches_a_direct_computation(tiny_lm, windows, tmp_path):
    config = TrainConfig(tokens=200, **SMALL)
    transcoder = train_clt(tiny_lm, windows, config, tmp_path, progress=False)
    indices = heldout(windows, config)
    report = evaluate_clt(tiny_lm, transcoder, windows, indices, batch_windows=3, progress=False)  # several batches
    tokens = torch.from_numpy(windows.tokens[np.sort(indices)]).long()
    lengths = torch.from_numpy(windows.lengths[np.sort(indices)]).long()
    x, y = train.layer_activations(tiny_lm, tokens, lengths)
    with torch.no_grad():
        acts, reconstruction = transcoder(x.float())
    fvu = (reconstruction - y).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))
    np.testing.assert_allclose(report["fvu"], fvu.numpy(), rtol=1e-4)
    np.testing.assert_allclose(report["l0"], torch.stack([(a > 0).float().sum(-1).mean() for a in acts]).numpy(), rtol=1e-5)
    assert report["tokens"] == int((lengths - 1).sum())
