"""SAELens's layout, with files written by SAELens's own `save_model` (its SAEs and transcoders): read in place, one
folder or a folder of them (some layers only), activations equal to SAELens's own `encode` on the same inputs, the
hook points its TransformerLens names map to equal the model's own hidden states, and what is not read is refused in
one line naming the field."""

import json

import pytest
import torch

from conftest import make_tiny_lm
from test_bundle_create import cli_json, create, model_dir, write_corpus  # noqa: F401 (model_dir: a fixture)
from dreaming.activation import feature_activations
from dreaming.cli import main
from dreaming.encoder import LazyEncoder
from dreaming.features import Feature
from dreaming.formats import open_transcoder
from dreaming.formats.files import check_against_model
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_MID, HOOK_RESID_POST, HOOK_RESID_PRE

sae_lens = pytest.importorskip("sae_lens")  # the test extra installs it (make setup)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

D, F, K = 32, 24, 5  # the tiny models' d_model, latents, topk's k
LAYERS = [0, 2]  # of the tiny models' three: a dictionary for some layers only
# architecture -> (SAELens classes, hook_name, hook_name_out or None, dreaming's input and output hooks)
CASES = {
    "standard": ("StandardSAE", "blocks.{}.hook_resid_post", None, HOOK_RESID_POST, HOOK_RESID_POST),
    "jumprelu": ("JumpReLUSAE", "blocks.{}.hook_resid_pre", None, HOOK_RESID_PRE, HOOK_RESID_PRE),
    "topk": ("TopKSAE", "blocks.{}.hook_mlp_out", None, HOOK_MLP_OUT, HOOK_MLP_OUT),
    "transcoder": ("Transcoder", "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out", HOOK_MLP_IN, HOOK_MLP_OUT),
    "skip_transcoder": ("SkipTranscoder", "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out", HOOK_MLP_IN,
                        HOOK_MLP_OUT),
    "jumprelu_transcoder": ("JumpReLUTranscoder", "blocks.{}.hook_mlp_in", None, HOOK_RESID_MID, HOOK_MLP_OUT),
    "jumprelu_skip_transcoder": ("JumpReLUSkipTranscoder", "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out",
                                 HOOK_MLP_IN, HOOK_MLP_OUT),
}


def saelens_dictionary(architecture: str, layer: int, seed: int, **fields):
    """A SAELens SAE or transcoder of `architecture` with random weights (thresholds positive, biases nonzero)."""
    name, hook, hook_out, _, _ = CASES[architecture]
    metadata = SAEMetadata(hook_name=hook.format(layer), model_name="tiny-llama",
                           **({"hook_name_out": hook_out.format(layer)} if hook_out else {}))
    config_class = getattr(sae_lens, name + "Config")
    extra = {"d_out": D} if "transcoder" in architecture else {}
    extra |= {"k": K} if architecture == "topk" else {}
    extra |= {"apply_b_dec_to_input": False} if "transcoder" in architecture else {}
    sae = getattr(sae_lens, name)(config_class(d_in=D, d_sae=F, metadata=metadata, **extra, **fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in sae.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / D ** 0.5)
            if parameter_name == "threshold":
                parameter.abs_().mul_(0.3)
    return sae.eval()


def saved(tmp_path, architecture, layers=LAYERS, **fields):
    """SAELens folders (save_model), one per layer, under tmp_path/architecture; {layer: the SAELens object}."""
    saes = {}
    for layer in layers:
        saes[layer] = saelens_dictionary(architecture, layer, seed=layer, **fields)
        saes[layer].save_model(tmp_path / architecture / f"layer_{layer}")
    return saes


@pytest.fixture(scope="module")
def tiny_llama(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer, "llama")


@pytest.mark.parametrize("architecture", list(CASES))
def test_files_saelens_wrote_are_read_as_saelens_encodes(tmp_path, tiny_llama, architecture):
    saes = saved(tmp_path, architecture)
    _, _, _, input_hook, output_hook = CASES[architecture]
    files = open_transcoder(tmp_path / architecture)
    c = files.config
    assert files.layout == "saelens" and c.layer_ids == LAYERS and (c.d_model, c.d_transcoder) == (D, F)
    assert (c.feature_input_hook, c.feature_output_hook) == (input_hook, output_hook)
    assert c.skip_connection == ("skip" in architecture) and c.model_name == "tiny-llama"
    assert "layers 0, 2 only" in " ".join(check_against_model(files, tiny_llama))
    encoder = LazyEncoder(files)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1)) * 2
    for layer, sae in saes.items():
        with torch.no_grad():
            theirs = sae.encode(x)
        ours = encoder.encode(x, layer)
        assert (theirs > 0).sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        some = [0, 5, F - 1]  # a few rows, read alone (not for topk, which needs the whole layer)
        torch.testing.assert_close(encoder.encode(x, layer, some), theirs[:, some], rtol=1e-4, atol=1e-5)
    whole = files.load()  # decoders and skips too, as SAELens holds them
    for layer, sae in saes.items():
        torch.testing.assert_close(whole.W_dec[layer], sae.W_dec.detach())
        if c.skip_connection:
            torch.testing.assert_close(whole.W_skip[layer], sae.W_skip.detach())
    one = open_transcoder(tmp_path / architecture / "layer_2")  # one folder: one layer
    assert one.config.layer_ids == [2] and one.config.n_layers == 3


def test_the_hook_points_saelens_names_are_the_model_s(tmp_path, tiny_llama, tiny_tokenizer):
    """A residual-stream SAE measured through the model: the activation dreaming reports equals SAELens's encode of
    the model's own hidden state after the layer (TransformerLens's blocks.L.hook_resid_post)."""
    saes = saved(tmp_path, "standard")
    files = open_transcoder(tmp_path / "standard")
    input_ids = torch.randint(4, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    input_ids[:, 0] = tiny_llama.bos_token_id
    features = [Feature(0, i) for i in range(F)]
    ours = feature_activations(tiny_llama, LazyEncoder(files), input_ids, features)  # [batch, pos, F]
    with torch.no_grad():
        states = tiny_llama.model(input_ids=input_ids, output_hidden_states=True).hidden_states
        theirs = saes[0].encode(states[1])  # the hidden state after layer 0
    theirs[:, 0] = 0  # dreaming never measures BOS
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="this dictionary has layers 0, 2 only"):
        feature_activations(tiny_llama, LazyEncoder(files), input_ids, [Feature(1, 0)])


def test_what_is_not_read_is_refused_naming_the_field(tmp_path):
    saved(tmp_path, "standard", layers=[0])
    cfg_path = tmp_path / "standard" / "layer_0" / "cfg.json"
    original = json.loads(cfg_path.read_text())
    for change, message in [({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm' is not "
                                                                       "supported"),
                            ({"architecture": "gated"}, "architecture 'gated' is not read"),
                            ({"reshape_activations": "hook_z"}, "reshape_activations 'hook_z' is not supported"),
                            ({"metadata": {"hook_name": "blocks.0.attn.hook_z"}}, "hook 'blocks.0.attn.hook_z' is not "
                                                                                  "read")]:
        cfg_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError, match=f"cfg.json: {message}") as error:
            open_transcoder(tmp_path / "standard")
        assert "\n" not in str(error.value)
    # two layers that disagree (one dictionary has one kind, size and hook point)
    cfg_path.write_text(json.dumps(original))
    saved(tmp_path / "mixed", "standard", layers=[0])
    saved(tmp_path / "mixed", "jumprelu", layers=[1])
    (tmp_path / "mixed" / "jumprelu" / "layer_1").rename(tmp_path / "mixed" / "standard" / "layer_1")
    with pytest.raises(ValueError, match="differs from"):
        open_transcoder(tmp_path / "mixed" / "standard")


def test_a_bundle_of_an_saelens_sae_on_some_layers(tmp_path, tiny_lm, model_dir, capsys):
    """`bundle create` with a residual-stream SAE that SAELens saved for layers 0 and 2: info names the layers, the
    maxima cover those only, activation equals SAELens's encode of the model's hidden state, search, compare and a
    dream (bare template: the tiny model has no chat template) work, and a layer it lacks is a one-line error."""
    saes = saved(tmp_path, "standard")
    out = tmp_path / "bundle"
    create(model_dir, tmp_path / "standard", write_corpus(tmp_path / "corpus.jsonl", 30), out)
    run = cli_json(capsys, out)
    info = run("info")
    assert info["transcoder"]["layer_ids"] == LAYERS and info["transcoder"]["layout"] == "saelens"
    assert info["maxima"]["features"] == len(LAYERS) * F and info["transcoder"]["input_hook"] == HOOK_RESID_POST
    live = [f"0/{i}" for i in range(F) if run("compare", "--feature", f"0/{i}")["dataset_max"]]
    assert live, "no latent of layer 0 fired on the corpus"
    (measured,) = run("activation", "--feature", live[0], "--text", "the cat sat on the mat")
    input_ids = torch.tensor([measured["token_ids"]])
    with torch.no_grad():
        state = tiny_lm.model(input_ids=input_ids, output_hidden_states=True).hidden_states[1]
        theirs = saes[0].encode(state)[0, :, int(live[0].split("/")[1])]
    assert measured["token_activations"][1:] == pytest.approx(theirs[1:].tolist(), rel=1e-4, abs=1e-5)
    assert run("search", "--text", "the cat sat")
    dreamed = run("dream", "--feature", live[0], "--iterations", "1", "--population", "4", "--children", "2",
                  "--prompt-length", "2", "--device", "cpu")
    assert dreamed["template"] == "{prompt}" and dreamed["template_origin"] == "bare"
    best = max(dreamed["frontier"], key=lambda p: p["activation"])
    (again,) = run("activation", "--feature", live[0], "--text", best["text"])
    assert again["activation"] == pytest.approx(best["activation"], rel=1e-4, abs=1e-5)  # re-measured from its text
    with pytest.raises(SystemExit, match="this dictionary has layers 0, 2 only"):
        main(["activation", "--bundle", str(out), "--feature", "1/0", "--text", "the cat"])
