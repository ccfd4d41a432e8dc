"""MLP neurons as latents (the EPO paper's own targets): the mlp.hook_post hook equals the MLP's hidden activation
written out from its weights (Llama, Gemma-3, GPT-2); `bundle create --transcoder neurons` makes a bundle whose
latent L/i is neuron i of layer L (relu'd), measured, searched and dreamed like any feature, each dream re-measured
from its text; what needs decoders says it has none."""

import pytest
import torch

from conftest import make_tiny_lm
from test_bundle_create import cli_json, create, model_dir, write_corpus  # noqa: F401 (model_dir: a fixture)
from dreaming.cli import main
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_POST


def hidden_by_hand(lm, mlp_in, layer, family):
    mlp = lm.layers[layer].mlp
    if family == "gpt2":
        return mlp.act(mlp.c_fc(mlp_in))
    return mlp.act_fn(mlp.gate_proj(mlp_in)) * mlp.up_proj(mlp_in)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_the_neurons_hook_is_the_mlp_hidden_activation(tiny_tokenizer, family):
    lm = make_tiny_lm(tiny_tokenizer, family)
    input_ids = torch.randint(4, len(tiny_tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    values = lm.capture(input_ids, [(HOOK_MLP_IN, 1), (HOOK_MLP_POST, 1)], stop_early=False)
    neurons = values[(HOOK_MLP_POST, 1)]
    assert neurons.shape[-1] == lm.hook_width(HOOK_MLP_POST) == (128 if family == "gpt2" else 64)
    with torch.no_grad():
        torch.testing.assert_close(neurons, hidden_by_hand(lm, values[(HOOK_MLP_IN, 1)], 1, family))


def test_a_bundle_of_a_model_s_neurons(tmp_path, tiny_lm, model_dir, capsys):
    out = tmp_path / "bundle"
    create(model_dir, "neurons", write_corpus(tmp_path / "corpus.jsonl", 30), out)
    run = cli_json(capsys, out)
    info = run("info")
    assert info["transcoder"]["layout"] == "mlp-neurons" and info["transcoder"]["features"] == 3 * 64
    assert info["transcoder"]["input_hook"] == HOOK_MLP_POST and (out / "neurons.yaml").exists()
    neuron = max((run("compare", "--feature", f"1/{i}")["dataset_max"] or 0, f"1/{i}") for i in range(8))[1]
    (measured,) = run("activation", "--feature", neuron, "--text", "the cat sat on the mat")
    input_ids = torch.tensor([measured["token_ids"]])
    values = tiny_lm.capture(input_ids, [(HOOK_MLP_POST, 1)])
    by_hand = values[(HOOK_MLP_POST, 1)][0, :, int(neuron.split("/")[1])].relu()
    assert measured["token_activations"][1:] == pytest.approx(by_hand[1:].tolist(), rel=1e-4, abs=1e-5)
    assert run("search", "--text", "the cat sat")
    dreamed = run("dream", "--feature", neuron, "--iterations", "2", "--population", "4", "--children", "2",
                  "--prompt-length", "3", "--device", "cpu")
    best = max(dreamed["frontier"], key=lambda p: p["activation"])
    assert dreamed["template_origin"] == "bare" and best["activation"] > 0
    (again,) = run("activation", "--feature", neuron, "--text", best["text"])
    assert again["activation"] == pytest.approx(best["activation"], rel=1e-4, abs=1e-5)  # re-measured from its text
    assert run("compare", "--feature", neuron)["output_tokens"] is None  # no decoders to read
    with pytest.raises(SystemExit, match="has no decoders"):
        main(["similar", "--bundle", str(out), "--feature", neuron])
