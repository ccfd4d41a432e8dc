"""Gemma Scope 2's layout on a tiny Gemma-3: per-layer folders (config.json + params.safetensors) of affine
(skip) transcoders and residual-stream SAEs, some layers only, read in place; the activation dreaming measures
through the model equals JumpReLU of the hook point's value (Hugging Face's own modules, hooked by hand); the skip
as circuit-tracer's own loader adds it; what is not read is one line naming the file. Written back
(`save_gemma_scope_2`, `dreaming export --format gemma-scope-2`): a CLT with its skip that circuit-tracer's
`load_gemma_scope_2_clt` reconstructs with exactly as dreaming does, and that dreaming reads back."""

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
    if kind == "transcoder":  # the skip adds x @ affine_skip_connection, as circuit-tracer's loader has it
        from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_2_transcoder

        x = torch.randn(5, D, generator=torch.Generator().manual_seed(4))
        params = tmp_path / kind / "layer_1_width_16k_l0_small" / "params.safetensors"
        theirs = load_gemma_scope_2_transcoder(str(params), layer=1, device=torch.device("cpu"), dtype=torch.float32)
        ours = x @ files.load().W_skip[1].T  # how dreaming's Transcoder adds its skip
        torch.testing.assert_close(ours, theirs.compute_skip(x))
        torch.testing.assert_close(ours, x @ written[1]["affine_skip_connection"])
    one = open_transcoder(tmp_path / kind / "layer_1_width_16k_l0_small")
    assert one.config.layer_ids == [1]


def test_what_gemma_scope_2_layout_is_not_read(tmp_path):
    write_folder(tmp_path / "attn", 0, "model.layers.{}.self_attn.o_proj.input")
    with pytest.raises(ValueError, match=r"config\.json: hook point 'model\.layers\.0\.self_attn\.o_proj\.input' is "
                                         r"not read") as error:
        open_transcoder(tmp_path / "attn")
    assert "\n" not in str(error.value)
    write_folder(tmp_path / "elsewhere", 0, "model.layers.{}.pre_feedforward_layernorm.output",
                 "model.layers.3.post_feedforward_layernorm.output")
    with pytest.raises(ValueError, match="reads layer 0 and names layer 3 as its output; expected its own layer"):
        open_transcoder(tmp_path / "elsewhere")


def a_clt_with_a_skip(lm, seed=0):
    from dreaming.transcoders import CLT, Transcoder, TranscoderConfig

    g = torch.Generator().manual_seed(seed)
    config = TranscoderConfig(CLT, lm.n_layers, lm.d_model, F, activation="jumprelu", skip_connection=True,
                              model_name=lm.name)
    transcoder = Transcoder(config)
    with torch.no_grad():
        for parameter in transcoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) / D**0.5)
        transcoder.threshold.copy_(0.1 * torch.rand(transcoder.threshold.shape, generator=g))
    return transcoder


def test_a_clt_written_as_gemma_scope_2_is_circuit_tracers_and_ours_again(tmp_path, gemma3):
    """A JumpReLU CLT with a skip, written by save_gemma_scope_2: dreaming reads back every tensor; circuit-tracer's
    load_gemma_scope_2_clt holds the same CLT, skip included, and reconstructs every layer's output as dreaming does.
    (circuit-tracer 0.5.0's loader reads layers range(max(paths)): it drops the last layer unless the dict has one key
    more, which it never reads.)"""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt

    from dreaming.formats.gemma_scope import save_gemma_scope_2

    ours = a_clt_with_a_skip(gemma3)
    save_gemma_scope_2(ours, tmp_path / "gs2", gemma3.module_path)
    config = json.loads((tmp_path / "gs2" / "layer_1" / "config.json").read_text())
    assert config["hf_hook_point_in"] == "model.layers.1.pre_feedforward_layernorm.output"
    assert config["hf_hook_point_out"] == "model.layers.1.post_feedforward_layernorm.output"
    back = open_transcoder(tmp_path / "gs2")
    assert back.layout == "gemma-scope-2" and back.config.kind == "cross_layer_transcoder"
    assert (back.config.feature_input_hook, back.config.feature_output_hook) == (HOOK_MLP_IN, HOOK_MLP_OUT)
    loaded = back.load()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    n = gemma3.n_layers
    paths = {l: str(tmp_path / "gs2" / f"layer_{l}" / "params.safetensors") for l in range(n)}
    theirs = load_gemma_scope_2_clt({**paths, n: None}, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.randn(n, 6, D, generator=torch.Generator().manual_seed(5))  # every layer's input, 6 positions
    with torch.no_grad():
        expected = ours(x)[1]  # [layers, positions, d_model]
        reconstruction = theirs.decode(theirs.encode(x).to_sparse(), x)  # as its attribution reconstructs, skip in
        torch.testing.assert_close(reconstruction, expected, rtol=1e-4, atol=1e-5)
        for layer in range(n):
            torch.testing.assert_close(theirs.compute_skip(layer, x[layer]), x[layer] @ ours.W_skip[layer].T)


def test_dreaming_export_writes_the_bundles_dictionary_as_gemma_scope_2(tiny_bundle, tmp_path, capsys):
    """`dreaming export --format gemma-scope-2` writes the bundle's CLT, which reads back equal; a dictionary without
    decoders is refused in one line."""
    from dreaming.bundle import Bundle
    from dreaming.cli import main

    main(["export", "--format", "gemma-scope-2", "--bundle", str(tiny_bundle.directory), "--out", str(tmp_path / "x"),
          "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "gemma-scope-2" and report["files"] == 2 * len(report["layers"])
    original = Bundle.open(tiny_bundle.directory).load_transcoder()
    back = open_transcoder(tmp_path / "x").load()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, msg=name)
    with pytest.raises(SystemExit, match="whole dictionary"):
        main(["export", "--format", "gemma-scope-2", "--bundle", str(tiny_bundle.directory), "--out",
              str(tmp_path / "y"), "--features", "0/1"])
