"""A dream's figures reproduced from its prompt text and template (measure_in_template) against the reference
measurement on token ids, a feature that fires only on the template, and prompts that merge with the template."""

import pytest
import torch
from conftest import make_tiny_transcoder

from dreaming.activation import measure_in_template, measure_texts, measure_token_ids
from dreaming.features import Feature

TEMPLATE = "the cat {prompt} on the mat"  # prefix "the cat " -> [BOS, the, cat]; suffix " on the mat"


@pytest.fixture(scope="module")
def transcoder(tiny_lm):
    return make_tiny_transcoder(tiny_lm)


def ids_of(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_prompt_in_its_template_measures_as_its_token_ids(tiny_lm, transcoder):
    feature, dataset_max = Feature(1, 3), 2.5
    prompts = [["dog", "ran", "fast"], ["red", "house"], ["sun"]]
    prefix_ids = [tiny_lm.bos_token_id, *ids_of(tiny_lm, "the cat")]
    suffix_ids = ids_of(tiny_lm, "on the mat")
    sequences = [[*prefix_ids, *tiny_lm.tokenizer.convert_tokens_to_ids(words), *suffix_ids] for words in prompts]
    reference = measure_token_ids(tiny_lm, transcoder, feature, sequences, dataset_max,
                                  counted_from=[len(prefix_ids)] * len(sequences))
    texts = [tiny_lm.tokenizer.decode(tiny_lm.tokenizer.convert_tokens_to_ids(words)) for words in prompts]
    measured = measure_in_template(tiny_lm, transcoder, feature, texts, TEMPLATE, dataset_max)
    for got, want, prompt in zip(measured, reference, texts):
        assert got.counted_from == 3 and got.text == f"the cat {prompt} on the mat"
        assert (got.token_ids, got.token_activations, got.activation, got.template_activation,
                got.fraction_of_max) == (want.token_ids, want.token_activations, want.activation,
                                         want.template_activation, want.fraction_of_max)
        assert got.activation == max(got.token_activations[3:])
        assert got.template_activation == max(got.token_activations[1:3])
    # a template that starts with the BOS keeps one BOS (the one BOS rule), so the same prompt starts at 3 again
    (with_bos,) = measure_in_template(tiny_lm, transcoder, feature, [texts[0]], "<bos> " + TEMPLATE, dataset_max)
    assert with_bos.token_ids == reference[0].token_ids and with_bos.counted_from == 3
    # an empty prefix: every token but the BOS counts, as for a plain text
    (plain,) = measure_in_template(tiny_lm, transcoder, feature, ["the cat sat"], "{prompt}", dataset_max)
    (text,) = measure_texts(tiny_lm, transcoder, feature, ["the cat sat"], dataset_max)
    assert (plain.counted_from, plain.activation, plain.template_activation) == (1, text.activation, 0.0)


def test_a_feature_firing_only_on_the_template_counts_zero_for_the_prompt(tiny_lm):
    """Feature 1/5's encoder row is set to the MLP input at the prefix token "cat", its threshold between that
    token's pre-activation and the prompt's, so it fires on the template and not on the prompt."""
    transcoder, layer, index = make_tiny_transcoder(tiny_lm), 1, 5
    hook = transcoder.config.feature_input_hook
    text = "the cat dog ran on the mat"
    ids = torch.tensor([[tiny_lm.bos_token_id, *ids_of(tiny_lm, text)]])
    x = tiny_lm.capture(ids, [(hook, layer)])[(hook, layer)][0].float()  # [pos, d_model]
    w = x[2] / x[2].norm()  # "cat", the prefix's last token
    pre = x @ w
    assert pre[2] > pre[3:].max()
    with torch.no_grad():
        transcoder.W_enc[layer, index] = w
        transcoder.b_enc[layer, index] = 0.0
        transcoder.threshold[layer, index] = (pre[2] + pre[3:].max()) / 2
        direct = transcoder.encode(x, layer)[:, index]  # the reference: the encoder on the captured input
    (measured,) = measure_in_template(tiny_lm, transcoder, Feature(layer, index), ["dog ran"], TEMPLATE, 4.0)
    assert measured.activation == 0.0 and measured.fraction_of_max == 0.0
    assert measured.template_activation == pytest.approx(float(direct[1:3].max()), rel=1e-5)
    assert measured.template_activation == pytest.approx(float(pre[2]), rel=1e-5) and measured.template_activation > 0
    # measured as a plain text, the template's activation would be the text's
    (whole,) = measure_texts(tiny_lm, transcoder, Feature(layer, index), [text], 4.0)
    assert whole.activation == pytest.approx(measured.template_activation, rel=1e-6)


def test_a_prompt_that_merges_with_the_template_is_refused(tiny_lm, transcoder):
    with pytest.raises(ValueError, match="merges with the template's text before"):
        measure_in_template(tiny_lm, transcoder, Feature(1, 3), ["t sat"], "the ca{prompt}", None)
    with pytest.raises(ValueError, match="exactly one '\\{prompt\\}'"):
        measure_in_template(tiny_lm, transcoder, Feature(1, 3), ["sat"], "the cat", None)
    with pytest.raises(ValueError, match="empty prompt"):
        measure_in_template(tiny_lm, transcoder, Feature(1, 3), [""], TEMPLATE, None)
    with pytest.raises(ValueError, match="no prompts"):
        measure_in_template(tiny_lm, transcoder, Feature(1, 3), [], TEMPLATE, None)
