"""EPO's scorer on a tiny float64 model: scores equal a direct full-text computation, token gradients equal finite
differences of the objective, forbidden tokens and the round-trip check."""

import math

import pytest
import torch

from conftest import make_tiny_lm
from dreaming.features import Feature
from dreaming.objective import SMOOTH_MAX, Scorer, allowed_tokens, cross_entropy, make_target
from dreaming.transcoders import CLT, Transcoder, TranscoderConfig

TEMPLATE = "the {prompt} sat on"
N_PROMPT = 4


def tiny_transcoder(n_layers=3, d_model=32, features=8, seed=0):
    torch.manual_seed(seed)
    t = Transcoder(TranscoderConfig(CLT, n_layers, d_model, features, model_name="tiny"), dtype=torch.float64)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn_like(p) / d_model**0.5)
        t.threshold.copy_(torch.rand(n_layers, features) * 0.1)
    return t


@pytest.fixture(scope="module")
def gpt2_64(tiny_tokenizer):
    """GPT-2 computes its norms in the model's dtype (Llama's RMSNorm casts to fp32), so float64 is float64."""
    lm = make_tiny_lm(tiny_tokenizer, "gpt2")
    lm.model.double()
    return lm


@pytest.fixture(scope="module")
def transcoder():
    return tiny_transcoder()


def scorer(lm, transcoder, position, features=(Feature(0, 1), Feature(2, 5)), scales=(0.5, 2.0)):
    targets = [make_target(transcoder, f, s) for f, s in zip(features, scales)]
    return Scorer(lm, "mlp.hook_in", TEMPLATE, N_PROMPT, targets, position)


def random_ids(lm, count, seed=0):
    allowed = allowed_tokens(lm).nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (count, N_PROMPT), generator=g)]


@pytest.mark.parametrize("position", ["last", "max"])
def test_score_equals_a_direct_computation_on_the_full_text(lm64, transcoder, position):
    s = scorer(lm64, transcoder, position)
    ids, rows = random_ids(lm64, 5), torch.tensor([0, 1, 1, 0, 1])
    f, ce, _ = s.score(ids, rows)
    full = torch.tensor([s.full_ids(row) for row in ids.tolist()])  # [B, T], no KV cache
    start = len(s.prefix_ids)
    with torch.no_grad():
        logits = lm64.model(input_ids=full).logits
        for b, row in enumerate(rows.tolist()):
            target = s.targets[row]
            layer, index = target.feature.layer, target.feature.index
            h = lm64.capture(full[b : b + 1], [("mlp.hook_in", layer)])[("mlp.hook_in", layer)][0]  # [T, d_model]
            pre = transcoder.pre_activations(h, layer)[:, index] / target.scale  # [T]
            expected_f = pre[start + N_PROMPT - 1] if position == "last" else pre[start:].max()
            logprobs = logits[b, start - 1 : start + N_PROMPT - 1].log_softmax(-1)  # predicts every prompt token
            expected_ce = -logprobs.gather(-1, full[b, start : start + N_PROMPT, None]).mean()
            assert f[b].item() == pytest.approx(expected_f.item(), abs=1e-9)
            assert ce[b].item() == pytest.approx(expected_ce.item(), abs=1e-9)
    assert cross_entropy(lm64, full.tolist(), start, N_PROMPT) == pytest.approx(ce.tolist(), abs=1e-9)


@pytest.mark.parametrize("position", ["last", "max"])
def test_token_gradient_equals_finite_differences(gpt2_64, transcoder, position):
    lm64 = gpt2_64
    s = scorer(lm64, transcoder, position)
    ids, rows = random_ids(lm64, 3, seed=1), torch.tensor([0, 1, 0])
    lambdas = torch.tensor([0.0, 0.7, 3.0], dtype=torch.float64)  # each row its own λ
    f, ce, grad = s.gradient(ids, rows, lambdas)  # [3, n, vocab]
    one_hot = torch.nn.functional.one_hot(ids, s.embedding.shape[0]).double()
    _, _, objective = s.objective(one_hot, rows, lambdas)
    assert torch.allclose(objective, f - lambdas * ce)
    exact_f, exact_ce, smooth_f = s.score(ids, rows)
    assert torch.allclose(smooth_f, f)
    assert torch.allclose(ce, exact_ce)
    if position == "last":
        assert torch.allclose(f, exact_f)
    else:  # the gradient is of the smooth max: max <= smooth max <= max + τ log(positions)
        assert (exact_f <= f + 1e-12).all() and (f <= exact_f + SMOOTH_MAX * math.log(N_PROMPT + 2) + 1e-12).all()
    g = torch.Generator().manual_seed(2)
    eps = 1e-6
    for b in range(3):
        for _ in range(6):
            pos, token = torch.randint(N_PROMPT, (), generator=g), torch.randint(one_hot.shape[-1], (), generator=g)
            bump = torch.zeros_like(one_hot)
            bump[b, pos, token] = eps
            with torch.no_grad():
                up = s.objective(one_hot + bump, rows, lambdas)[2][b]
                down = s.objective(one_hot - bump, rows, lambdas)[2][b]
            assert grad[b, pos, token].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-6, abs=1e-8)


def test_gradient_of_one_row_does_not_depend_on_the_others(lm64, transcoder):
    s = scorer(lm64, transcoder, "max")
    ids, rows, lambdas = random_ids(lm64, 3, seed=3), torch.tensor([0, 1, 0]), torch.tensor([0.1, 1.0, 5.0])
    together = s.gradient(ids, rows, lambdas)[2]
    alone = s.gradient(ids[1:2], rows[1:2], lambdas[1:2])[2]
    assert torch.allclose(together[1], alone[0], atol=1e-10)


def test_special_tokens_are_never_allowed(lm64):
    allowed = allowed_tokens(lm64)
    assert not allowed[lm64.tokenizer.all_special_ids].any()
    assert allowed.sum() == len(lm64.tokenizer) - len(lm64.tokenizer.all_special_ids)


def test_round_trip_check(lm64, transcoder):
    targets = [make_target(transcoder, Feature(0, 1), 1.0)]
    good = Scorer(lm64, "mlp.hook_in", TEMPLATE, N_PROMPT, targets)
    glued = Scorer(lm64, "mlp.hook_in", "the{prompt} sat", N_PROMPT, targets)  # "thecat ..." is one unknown word
    ids = random_ids(lm64, 4)
    assert good.round_trips(ids).all()
    assert not glued.round_trips(ids).any()
