"""EPO's scorer on a tiny float64 model: scores of prompts of several lengths equal a direct full-text computation,
children scored from their parent's KV cache equal full scoring, token gradients equal finite differences of the
objective, forbidden tokens and the round-trip check."""

import math

import pytest
import torch

import dreaming.objective as objective
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
def gemma3_64(tiny_tokenizer):
    """Gemma-3's embedding module scales its rows by sqrt(d_model), which the scorer's inputs_embeds bypass."""
    lm = make_tiny_lm(tiny_tokenizer, "gemma3")
    lm.model.double()
    return lm


@pytest.fixture(scope="module")
def transcoder():
    return tiny_transcoder()


def scorer(lm, transcoder, position, features=(Feature(0, 1), Feature(2, 5)), scales=(0.5, 2.0), template=TEMPLATE):
    targets = [make_target(transcoder, f, s) for f, s in zip(features, scales)]
    return Scorer(lm, "mlp.hook_in", template, targets, position)


def random_ids(lm, count, seed=0, width=N_PROMPT):
    """[count, width] allowed ids and lengths [count] from 2 to width (the tail past a row's length is padding)."""
    allowed = allowed_tokens(lm).nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (count,), generator=g)
    return allowed[torch.randint(len(allowed), (count, width), generator=g)], lengths


@pytest.mark.parametrize("model, tolerance", [("lm64", 1e-9), ("gemma3_64", 1e-6)])  # Gemma-3 norms in fp32
@pytest.mark.parametrize("position", ["last", "max"])
@pytest.mark.parametrize("template", [TEMPLATE, "the {prompt}"])  # with and without a suffix
def test_score_equals_a_direct_computation_on_the_full_text(model, tolerance, transcoder, position, template, request):
    lm64 = request.getfixturevalue(model)
    s = scorer(lm64, transcoder, position, template=template)
    ids, lengths = random_ids(lm64, 6, width=6)
    rows = torch.tensor([0, 1, 1, 0, 1, 0])
    scores = s.score(ids, lengths, rows)
    start = len(s.prefix_ids)
    for b, row in enumerate(rows.tolist()):
        n = int(lengths[b])
        full = torch.tensor([s.full_ids(ids[b, :n].tolist())])  # [1, T], no KV cache, no padding
        with torch.no_grad():
            logits = lm64.model(input_ids=full).logits[0]
        target = s.targets[row]
        layer, index = target.feature.layer, target.feature.index
        h = lm64.capture(full, [("mlp.hook_in", layer)])[("mlp.hook_in", layer)][0]  # [T, d_model]
        pre = transcoder.pre_activations(h, layer)[:, index] / target.scale  # [T]
        expected_f = pre[start + n - 1] if position == "last" else pre[start:].max()
        logprobs = logits[start - 1 : start + n - 1].log_softmax(-1)  # predicts every prompt token
        expected_ce = -logprobs.gather(-1, full[0, start : start + n, None]).mean()
        assert scores.f[b].item() == pytest.approx(expected_f.item(), abs=tolerance)
        assert scores.ce[b].item() == pytest.approx(expected_ce.item(), abs=tolerance)
        assert cross_entropy(lm64, full.tolist(), start, n) == pytest.approx([expected_ce.item()], abs=tolerance)


@pytest.mark.parametrize("position, few_passes", [("last", False), ("max", False), ("max", True)])
def test_children_scored_from_the_parents_kv_cache_equal_full_scoring(lm64, transcoder, position, few_passes,
                                                                       monkeypatch):
    """Swaps, insertions and deletions at every position, scored after the parent's cached keys and values (in
    chunks of 4, so that most chunks start past the prompt's first token); and as a GPU chunks them (few_passes:
    chunks of batch_size, each from its smallest start)."""
    monkeypatch.setattr(objective, "MIN_CHUNK", 1)
    s = scorer(lm64, transcoder, position)
    s.batch_size, s.few_passes = (16, True) if few_passes else (4, False)
    width = 7
    parents_ids, parents_lengths = random_ids(lm64, 3, seed=4, width=width - 1)
    parents_ids = torch.cat([parents_ids, torch.zeros(3, 1, dtype=torch.long)], dim=1)  # room for an insertion
    rows = torch.tensor([0, 1, 0])
    allowed = allowed_tokens(lm64)
    expansion = s.expand(parents_ids, parents_lengths, rows, torch.tensor([0.1, 0.5, 2.0]), allowed, 3, 3)
    children, lengths, parent, changed = [], [], [], []
    for b in range(3):
        row = parents_ids[b, : parents_lengths[b]].tolist()
        for p in range(len(row) + 1):
            moves = [row[:p] + [7] + row[p:]]  # insert
            if p < len(row):
                moves += [row[:p] + [(row[p] + 1) % 20 + 4] + row[p + 1 :], row[:p] + row[p + 1 :]]  # swap, delete
            for child in moves:
                if child:
                    children.append(child + [0] * (width - len(child)))
                    lengths.append(len(child))
                    parent.append(b)
                    changed.append(p)
    children, lengths, parent, changed = map(torch.tensor, (children, lengths, parent, changed))
    reused = s.score_children(children, lengths, rows[parent], parent, changed, expansion.parents)
    full = s.score(children, lengths, rows[parent])
    assert torch.allclose(reused.f, full.f, atol=1e-10) and torch.allclose(reused.ce, full.ce, atol=1e-10)
    assert torch.allclose(reused.smooth, full.smooth, atol=1e-10)


def one_hot_objective(s: Scorer, one_hot: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor,
                      lambdas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: L_λ [B] (and exact f, CE) of one-hot rows [B, T, vocab] laid out as `_layout(ids, lengths, 0)`
    (prompt, suffix, padding), a differentiable function of every one-hot entry, the CE's labels included."""
    T, n = one_hot.shape[1], int(lengths.max())
    position = torch.arange(T)
    valid = position[None] < (lengths + len(s.suffix_ids))[:, None]  # [B, T]
    is_prompt = position[None] < lengths[:, None]
    vocab = torch.arange(one_hot.shape[-1])
    embeds = one_hot @ s.lm.model.get_input_embeddings()(vocab)  # [B, T, d_model]: the module's rows, scaled or not
    pre, logits, _ = s._forward(embeds, rows, s._prefix(len(one_hot)), n)
    logprobs = logits.log_softmax(-1)  # [B, n, vocab]
    token_logprobs = torch.cat([(one_hot[:, :1] * s.first_logprobs).sum(-1),
                                (one_hot[:, 1:n] * logprobs[:, : n - 1]).sum(-1)], dim=1) * is_prompt[:, :n]
    ce = -token_logprobs.sum(1) / lengths
    pre = pre.masked_fill(~valid, -torch.inf)
    exact = pre.max(1).values if s.position == "max" else pre.gather(1, (lengths - 1)[:, None])[:, 0]
    smooth = (SMOOTH_MAX * torch.logsumexp(pre / SMOOTH_MAX, 1) if s.position == "max" else exact)
    return smooth - lambdas * ce, exact, ce


@pytest.mark.parametrize("position", ["last", "max"])
def test_token_gradient_equals_finite_differences(gpt2_64, transcoder, position):
    lm64 = gpt2_64
    s = scorer(lm64, transcoder, position)
    ids, lengths = random_ids(lm64, 3, seed=1)
    rows = torch.tensor([0, 1, 0])
    lambdas = torch.tensor([0.0, 0.7, 3.0], dtype=torch.float64)  # each row its own λ
    scores, grad = s.gradient(ids, lengths, rows, lambdas)  # [3, n, vocab]
    tokens = s._layout(ids, lengths, 0)[0]
    one_hot = torch.nn.functional.one_hot(tokens, s.embedding.shape[0]).double()
    with torch.no_grad():
        objective, f, ce = one_hot_objective(s, one_hot, lengths, rows, lambdas)
    assert torch.allclose(objective, scores.smooth - lambdas * scores.ce)
    assert torch.allclose(f, scores.f) and torch.allclose(ce, scores.ce)
    exact = s.score(ids, lengths, rows)
    assert torch.allclose(exact.smooth, scores.smooth) and torch.allclose(exact.ce, scores.ce)
    assert torch.allclose(exact.f, scores.f)
    if position == "max":  # the gradient is of the smooth max: max <= smooth max <= max + τ log(positions)
        bound = SMOOTH_MAX * math.log(N_PROMPT + 2) + 1e-12
        assert (exact.f <= scores.smooth + 1e-12).all() and (scores.smooth <= exact.f + bound).all()
    g = torch.Generator().manual_seed(2)
    eps = 1e-6
    for b in range(3):
        for _ in range(6):
            pos = torch.randint(int(lengths[b]), (), generator=g)
            token = torch.randint(one_hot.shape[-1], (), generator=g)
            bump = torch.zeros_like(one_hot)
            bump[b, pos, token] = eps
            with torch.no_grad():
                up = one_hot_objective(s, one_hot + bump, lengths, rows, lambdas)[0][b]
                down = one_hot_objective(s, one_hot - bump, lengths, rows, lambdas)[0][b]
            assert grad[b, pos, token].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-6, abs=1e-8)
    # and the whole gradient equals autograd's of the one-hot objective, at every prompt position
    one_hot.requires_grad_(True)
    full = torch.autograd.grad(one_hot_objective(s, one_hot, lengths, rows, lambdas)[0].sum(), one_hot)[0]
    for b in range(3):
        n = int(lengths[b])
        assert torch.allclose(grad[b, :n], full[b, :n], atol=1e-10)


def test_token_gradient_of_a_scaled_embedding_equals_autograd_of_the_one_hot_objective(gemma3_64, transcoder):
    """On Gemma-3 (rows scaled by sqrt(d_model) in the embedding module) the scores and the one-hot gradient are
    those of the one-hot objective through the model's own embedding module."""
    s = scorer(gemma3_64, transcoder, "max")
    ids, lengths = random_ids(gemma3_64, 3, seed=1)
    rows, lambdas = torch.tensor([0, 1, 0]), torch.tensor([0.0, 0.7, 3.0], dtype=torch.float64)
    scores, grad = s.gradient(ids, lengths, rows, lambdas)
    one_hot = torch.nn.functional.one_hot(s._layout(ids, lengths, 0)[0], s.embedding.shape[0]).double()
    one_hot.requires_grad_(True)
    objective, f, ce = one_hot_objective(s, one_hot, lengths, rows, lambdas)
    assert torch.allclose(f, scores.f) and torch.allclose(ce, scores.ce)
    full = torch.autograd.grad(objective.sum(), one_hot)[0]
    for b in range(3):
        n = int(lengths[b])
        assert torch.allclose(grad[b, :n], full[b, :n], atol=1e-8)


def test_gradient_of_one_row_does_not_depend_on_the_others(lm64, transcoder):
    s = scorer(lm64, transcoder, "max")
    ids, lengths = random_ids(lm64, 3, seed=3)
    rows, lambdas = torch.tensor([0, 1, 0]), torch.tensor([0.1, 1.0, 5.0])
    together = s.gradient(ids, lengths, rows, lambdas)[1]
    alone = s.gradient(ids[1:2], lengths[1:2], rows[1:2], lambdas[1:2])[1]
    n = int(lengths[1])
    assert torch.allclose(together[1, :n], alone[0, :n], atol=1e-10)


def test_special_tokens_are_never_allowed(lm64):
    allowed = allowed_tokens(lm64)
    assert not allowed[lm64.tokenizer.all_special_ids].any()
    assert allowed.sum() == len(lm64.tokenizer) - len(lm64.tokenizer.all_special_ids)


def test_round_trip_check(lm64, transcoder):
    targets = [make_target(transcoder, Feature(0, 1), 1.0)]
    good = Scorer(lm64, "mlp.hook_in", TEMPLATE, targets)
    glued = Scorer(lm64, "mlp.hook_in", "the{prompt} sat", targets)  # "thecat ..." is one unknown word
    ids, lengths = random_ids(lm64, 4)
    assert good.round_trips(ids, lengths).all()
    assert not glued.round_trips(ids, lengths).any()


def test_cross_entropy_of_prompts_of_several_lengths_equals_one_at_a_time(lm64, transcoder):
    s = scorer(lm64, transcoder, "max")
    ids, lengths = random_ids(lm64, 7, seed=5, width=6)
    sequences = [s.full_ids(row[:n]) for row, n in zip(ids.tolist(), lengths.tolist())]
    start = len(s.prefix_ids)
    together = cross_entropy(lm64, sequences, start, lengths.tolist(), batch_size=2)
    alone = [cross_entropy(lm64, [seq], start, n)[0] for seq, n in zip(sequences, lengths.tolist())]
    assert together == pytest.approx(alone, abs=1e-12)
