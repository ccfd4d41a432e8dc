"""The prompt-length rule and the length-matched yardstick (dreaming/engine/length.py), on a one-layer llama built
so that one feature needs long context and another fires on one token.

The model: layer 0's queries and keys are zero, so every position attends uniformly to itself and all before it;
one value/output path copies "is this the BOS?" into residual dimension 0, which therefore holds BOS_WEIGHT / (i + 1)
at position i (the BOS's share of the attention). Token embeddings have unit RMS and zero in dimensions 0 and 1.
- LONG reads minus dimension 0: it grows with the position, so a window's max needs most of the window before it.
- CAT reads the embedding of "cat": it fires on that token wherever it sits.
"""

import pytest
import torch
from conftest import make_tiny_lm, make_tiny_transcoder

from dreaming.engine import DreamConfig, dream
from dreaming.engine.length import EXAMPLES, FALLBACK_LENGTH, KEEP, LENGTHS, choose_length, cut, length_matched_max
from dreaming.features import Feature

WINDOW = 64  # tokens of each dataset window after its BOS
BOS_WEIGHT = 8.0
LONG, CAT = Feature(0, 0), Feature(0, 1)


@pytest.fixture(scope="module")
def built(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer, n_layers=1)
    lm.model.double()
    model, bos = lm.model.model, lm.bos_token_id
    attention = model.layers[0].self_attn
    with torch.no_grad():
        embed = model.embed_tokens.weight  # [vocab, d]
        embed[:, :2] = 0
        embed[:, 2:] /= embed[:, 2:].pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS over dims 2..
        embed[bos, 1] = 1.0
        attention.q_proj.weight.zero_()
        attention.k_proj.weight.zero_()
        attention.v_proj.weight.zero_()
        attention.v_proj.weight[0, 1] = 1.0  # kv head 0, value dim 0 <- normalised dim 1 (the BOS flag)
        attention.o_proj.weight.zero_()
        attention.o_proj.weight[0, 0] = BOS_WEIGHT / embed[bos].pow(2).mean().rsqrt().item()  # -> residual dim 0
    transcoder = make_tiny_transcoder(lm, features=2).double()
    cat = tiny_tokenizer.convert_tokens_to_ids("cat")
    with torch.no_grad():
        transcoder.W_enc.zero_()
        transcoder.W_enc[0, 0, 0] = -1.0
        transcoder.b_enc[0, 0] = 1.0
        transcoder.W_enc[0, 1] = embed[cat] / embed[cat].pow(2).sum()
        transcoder.b_enc[0, 1] = -0.5
        transcoder.threshold.zero_()
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(4, len(tiny_tokenizer), (12, WINDOW), generator=generator)
    windows = torch.cat([torch.full((12, 1), bos), windows], 1)
    return lm, transcoder, windows


def direct_activations(lm, transcoder, ids: torch.Tensor, feature: Feature) -> torch.Tensor:
    """The feature at every position of `ids` [batch, pos], from the model's own forward with a hook on the MLP's
    input norm and the encoder's weights read by hand (no engine, no measuring code)."""
    captured = {}
    norm = lm.model.model.layers[feature.layer].post_attention_layernorm
    handle = norm.register_forward_hook(lambda module, args, output: captured.setdefault("x", output))
    try:
        lm.model(input_ids=ids)
    finally:
        handle.remove()
    pre = captured["x"] @ transcoder.W_enc[feature.layer, feature.index] + transcoder.b_enc[feature.layer, feature.index]
    return pre * (pre > transcoder.threshold[feature.layer, feature.index])


def top_contexts(lm, transcoder, windows, feature):
    """Brute-force maxima: every window's max position, the strongest EXAMPLES windows first."""
    acts = direct_activations(lm, transcoder, windows, feature)[:, 1:]  # [windows, WINDOW], BOS left out
    best, position = acts.max(1)
    order = best.argsort(descending=True)[:EXAMPLES]
    return [(windows[w].tolist(), int(position[w]) + 1) for w in order if best[w] > 0]


def test_the_built_features_behave_as_described(built):
    lm, transcoder, windows = built
    long = direct_activations(lm, transcoder, windows, LONG)[:, 1:]
    assert (long.diff(dim=1) >= 0).all() and (long[:, -1] > 0.8).all()  # LONG grows along every window
    assert (long[:, :8] < 0.2).all()  # and is near zero in its first 8 tokens
    cat = lm.tokenizer.convert_tokens_to_ids("cat")
    fired = direct_activations(lm, transcoder, windows, CAT)[:, 1:] > 0
    assert fired.any() and torch.equal(fired, windows[:, 1:] == cat)


def test_the_rule_picks_a_longer_prompt_for_a_feature_that_needs_context(built):
    lm, transcoder, windows = built
    long = choose_length(lm, transcoder, LONG, top_contexts(lm, transcoder, windows, LONG), cap=64)
    cat = choose_length(lm, transcoder, CAT, top_contexts(lm, transcoder, windows, CAT), cap=64)
    assert cat.chosen == LENGTHS[0] == 12
    assert long.chosen > 24 and long.chosen > cat.chosen
    # the rule as documented: the shortest length keeping KEEP of the best, and nothing shorter does
    assert long.kept[long.lengths.index(long.chosen)] >= KEEP
    assert all(k < KEEP for n, k in zip(long.lengths, long.kept) if n < long.chosen)
    capped = choose_length(lm, transcoder, LONG, top_contexts(lm, transcoder, windows, LONG), cap=20)
    assert capped.lengths == [12, 16] and capped.chosen <= 16
    fallback = choose_length(lm, transcoder, LONG, None, cap=64)
    assert fallback.chosen == FALLBACK_LENGTH and fallback.lengths == [] and "no dataset maxima" in fallback.rule


@pytest.mark.parametrize("feature", [LONG, CAT])
@pytest.mark.parametrize("length", [1, 5, 8, 30, 64])
def test_the_length_matched_max_equals_a_direct_computation(built, feature, length):
    lm, transcoder, windows = built
    contexts = top_contexts(lm, transcoder, windows, feature)
    expected = max(direct_activations(lm, transcoder, torch.tensor([[lm.bos_token_id, *cut(ids, p, length)]]),
                                      feature)[0, 1:].max().item() for ids, p in contexts[:EXAMPLES])
    found = length_matched_max(lm, transcoder, feature, contexts, length)
    assert found == pytest.approx(expected, rel=1e-6)  # measured activations are kept in fp32
    assert all(len(cut(ids, p, length)) == min(length, p) for ids, p in contexts)


def test_a_dream_uses_the_rule_unless_given_a_length(built):
    lm, transcoder, windows = built
    contexts = top_contexts(lm, transcoder, windows, LONG)
    config = DreamConfig(template="{prompt}", iterations=2, population=2, children=4, topk=4, length_slack=0,
                         model_proposals=0.0)
    dataset_max = contexts and direct_activations(lm, transcoder, windows, LONG).max().item()
    chosen = dream(lm, transcoder, LONG, config, dataset_max, contexts=contexts)
    rule = choose_length(lm, transcoder, LONG, contexts, config.max_prompt_length)
    assert chosen.prompt_length == chosen.length_choice.chosen == rule.chosen
    assert {p.prompt_tokens for p in chosen.frontier} <= {rule.chosen}
    for prompt in chosen.frontier:  # both yardsticks on every prompt, the second at the prompt's own length
        matched = length_matched_max(lm, transcoder, LONG, contexts, prompt.prompt_tokens)
        assert prompt.length_matched_max == pytest.approx(matched, rel=1e-6)  # measured activations are kept in fp32
        assert prompt.fraction_of_length_matched == pytest.approx(prompt.activation / matched, rel=1e-6)  # measured activations are kept in fp32
    given = dream(lm, transcoder, LONG, config.model_copy(update={"prompt_length": 5}), dataset_max, contexts=contexts)
    assert given.prompt_length == 5 and given.length_choice is None
    assert {p.prompt_tokens for p in given.frontier} == {5}
    fresh = dream(lm, transcoder, LONG, config, None)  # a fresh bundle: no maxima, no contexts
    assert fresh.prompt_length == FALLBACK_LENGTH and fresh.frontier[0].length_matched_max is None
