"""Gemma Scope 2's layout on a tiny Gemma-3: per-layer folders (config.json + params.safetensors) of affine
(skip) transcoders and residual-stream SAEs, some layers only, read in place; the activation dreaming measures
through the model equals JumpReLU of the hook point's value (Hugging Face's own modules, hooked by hand); what is not
read is one line naming the file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_lm
from dreaming.activation import feature_activations
from dreaming.encoder import LazyEncoder
from dreaming.features import Feature
from dreaming.formats import open_transcoder
from dreaming.formats.files import check_against_model
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_POST

D, F = 32, 20


@pytest.fixture(scope="module")
def gemma3(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer, "gemma3")


def write_folder(folder, layer, hook_in, hook_out=None, affine=False, seed=0):
    """One Gemma Scope 2 folder: config.json and params.safetensors (w_enc [d_in, F], ...); its tensors."""
    g = torch.Generator().manual_seed(seed)
    params = {"w_enc": torch.randn(D, F, generator=g) / D ** 0.5, "b_enc": 0.1 * torch.randn(F, generator=g),
              "threshold": 0.2 * torch.rand(F, generator=g), "w_dec": torch.randn(F, D, generator=g),
              "b_dec": torch.randn(D, generator=g)}
    if affine:
        params["affine_skip_connection"] = torch.randn(D, D, generator=g)
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-tiny-pt", "affine_connection": affine,
              "hf_hook_point_in": hook_in.format(layer)}
    if hook_out:
        config["hf_hook_point_out"] = hook_out.format(layer)
    (folder / "config.json").write_text(json.dumps(config))
    return params


def module_values(lm, input_ids, module_path, layer, where):
    """The input or output of a module of decoder layer `layer`, hooked by hand."""
    module = lm.layers[layer].get_submodule(module_path) if module_path else lm.layers[layer]
    seen = {}

    def hook(module, args, kwargs, output):
        value = (args[0] if args else kwargs["hidden_states"]) if where == "input" else output
        seen["value"] = value[0] if isinstance(value, tuple) else value

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(input_ids=input_ids)
    finally:
        handle.remove()
    return seen["value"]


@pytest.mark.parametrize("kind", ["transcoder", "resid_post"])
def test_gemma_scope_2_folders_on_a_tiny_gemma_3(tmp_path, gemma3, tiny_tokenizer, kind):
    hooks = {"transcoder": ("model.layers.{}.pre_feedforward_layernorm.output",
                            "model.layers.{}.post_feedforward_layernorm.output"),
             "resid_post": ("model.layers.{}.output", None)}[kind]
    written = {layer: write_folder(tmp_path / kind / f"layer_{layer}_width_16k_l0_small", layer, *hooks,
                                   affine=kind == "transcoder", seed=layer) for layer in (0, 1)}
    files = open_transcoder(tmp_path / kind)
    c = files.config
    assert files.layout == "gemma-scope-2" and c.layer_ids == [0, 1] and c.n_layers == 2
    expected = (HOOK_MLP_IN, HOOK_MLP_OUT) if kind == "transcoder" else (HOOK_RESID_POST, HOOK_RESID_POST)
    assert (c.feature_input_hook, c.feature_output_hook) == expected and c.skip_connection == (kind == "transcoder")
    assert "layers 0..1 only" in " ".join(check_against_model(files, gemma3))  # of the tiny model's three
    input_ids = torch.randint(4, len(tiny_tokenizer), (2, 8), generator=torch.Generator().manual_seed(3))
    input_ids[:, 0] = 1
    for layer, params in written.items():
        path, where = ("pre_feedforward_layernorm", "output") if kind == "transcoder" else ("", "output")
        x = module_values(gemma3, input_ids, path, layer, where)
        pre = x @ params["w_enc"] + params["b_enc"]
        direct = pre * (pre > params["threshold"])
        direct[:, 0] = 0  # BOS is never measured
        features = [Feature(layer, i) for i in range(F)]
        ours = feature_activations(gemma3, LazyEncoder(files), input_ids, features)
        torch.testing.assert_close(ours, direct, rtol=1e-4, atol=1e-5)
    if kind == "transcoder":
        torch.testing.assert_close(files.load().W_skip[1], written[1]["affine_skip_connection"])
    one = open_transcoder(tmp_path / kind / "layer_1_width_16k_l0_small")
    assert one.config.layer_ids == [1]


def test_what_gemma_scope_2_layout_is_not_read(tmp_path):
    write_folder(tmp_path / "attn", 0, "model.layers.{}.self_attn.o_proj.input")
    with pytest.raises(ValueError, match=r"config\.json: hook point 'model\.layers\.0\.self_attn\.o_proj\.input' is "
                                         r"not read") as error:
        open_transcoder(tmp_path / "attn")
    assert "\n" not in str(error.value)
    write_folder(tmp_path / "clt", 0, "model.layers.{}.pre_feedforward_layernorm.output",
                 "model.layers.3.post_feedforward_layernorm.output")
    with pytest.raises(ValueError, match="a cross-layer transcoder, not read"):
        open_transcoder(tmp_path / "clt")
