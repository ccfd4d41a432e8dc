"""Hook points against manual computations; loading from a local directory; the real default model."""

import pytest
import torch

from conftest import make_tiny_lm
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_MID, HOOK_RESID_POST, HOOK_RESID_PRE, load_model

HOOKS = (HOOK_RESID_PRE, HOOK_RESID_MID, HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_POST)  # mlp.hook_post: test_neurons


def hidden_states(lm, input_ids):
    with torch.no_grad():
        return lm.model(input_ids=input_ids, output_hidden_states=True).hidden_states  # embeddings, then each layer


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "gpt2"])
def test_hook_points_fit_the_residual_stream(tiny_tokenizer, family):
    lm = make_tiny_lm(tiny_tokenizer, family)
    input_ids = torch.randint(4, len(tiny_tokenizer), (2, 10))
    layer = 1
    values = lm.capture(input_ids, [(hook, layer) for hook in HOOKS], stop_early=False)
    resid_pre, resid_mid, mlp_in, mlp_out, resid_post = (values[(hook, layer)] for hook in HOOKS)
    block = lm.layers[layer]
    norm = block.ln_2 if family == "gpt2" else (
        block.pre_feedforward_layernorm if family.startswith("gemma") else block.post_attention_layernorm)
    torch.testing.assert_close(mlp_in, norm(resid_mid))
    torch.testing.assert_close(mlp_out, block.post_feedforward_layernorm(block.mlp(mlp_in))
                               if family.startswith("gemma") else block.mlp(mlp_in))
    # the block's input and output are the model's hidden states; its output is the residual mid-point plus the MLP's
    states = hidden_states(lm, input_ids)
    torch.testing.assert_close(resid_pre, states[layer])
    torch.testing.assert_close(resid_post, states[layer + 1])
    torch.testing.assert_close(resid_mid + mlp_out, resid_post)


def test_capture_stops_early(tiny_lm):
    input_ids = torch.randint(4, len(tiny_lm.tokenizer), (1, 8))
    calls = []
    handle = tiny_lm.layers[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        early = tiny_lm.capture(input_ids, [(HOOK_MLP_OUT, 1)])
        full = tiny_lm.capture(input_ids, [(HOOK_MLP_OUT, 1)], stop_early=False)
    finally:
        handle.remove()
    assert len(calls) == 1  # only the full run reached layer 2
    torch.testing.assert_close(early[(HOOK_MLP_OUT, 1)], full[(HOOK_MLP_OUT, 1)])


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "gpt2"])
def test_replaying_recorded_layers_gives_the_same_pass_without_computing_them(tiny_tokenizer, family):
    lm = make_tiny_lm(tiny_tokenizer, family)
    input_ids = torch.randint(4, len(tiny_tokenizer), (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0  # padding, as batches of texts have
    with torch.no_grad(), lm.layer_outputs() as recorded:
        clean = lm.model(input_ids=input_ids, attention_mask=mask).logits
    assert sorted(recorded) == list(range(lm.n_layers))
    calls = []
    handles = [lm.hook_module(HOOK_MLP_OUT, layer)[0].register_forward_hook(
        lambda module, args, output, layer=layer: calls.append(layer)) for layer in range(lm.n_layers)]
    try:
        with torch.no_grad(), lm.replaying({0: recorded[0], 1: recorded[1]}):
            replayed = lm.model(input_ids=input_ids, attention_mask=mask).logits
        assert calls == [2]  # layers 0 and 1 did not run
        torch.testing.assert_close(replayed, clean, rtol=0, atol=0)
        calls.clear()
        with torch.no_grad():
            lm.model(input_ids=input_ids, attention_mask=mask)
        assert calls == [0, 1, 2]  # restored after the block
    finally:
        for handle in handles:
            handle.remove()


def test_hook_aliases_and_unknown_names(tiny_lm):
    input_ids = torch.randint(4, len(tiny_lm.tokenizer), (1, 5))
    values = tiny_lm.capture(input_ids, [("hook_mlp_out", 0), ("ln2.hook_normalized", 0), ("hook_mlp_in", 0)])
    assert set(values) == {(HOOK_MLP_OUT, 0), (HOOK_MLP_IN, 0), (HOOK_RESID_MID, 0)}  # TransformerLens's names
    assert tiny_lm.hook_module(HOOK_RESID_PRE, 1)[0] is tiny_lm.layers[1]
    with pytest.raises(ValueError, match="unknown hook point 'resid_post'"):
        tiny_lm.capture(input_ids, [("resid_post", 0)])


def test_load_model_from_a_local_directory(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    input_ids = torch.randint(4, len(tiny_lm.tokenizer), (1, 6))
    torch.testing.assert_close(loaded.model(input_ids).logits, tiny_lm.model(input_ids).logits)
    assert loaded.n_layers == 3 and loaded.d_model == 32


def test_default_model_hook_points_match_a_manual_computation():
    lm = load_model("default")
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (30, 576, 49152)
    input_ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    layer = 7
    values = lm.capture(input_ids, [(hook, layer) for hook in HOOKS])
    resid_pre, resid_mid, mlp_in, mlp_out, resid_post = (values[(hook, layer)] for hook in HOOKS)
    block = lm.layers[layer]
    # RMSNorm and the SwiGLU MLP written out by hand from the weights
    eps = lm.model.config.rms_norm_eps
    manual_in = resid_mid * torch.rsqrt(resid_mid.pow(2).mean(-1, keepdim=True) + eps) * block.post_attention_layernorm.weight
    mlp = block.mlp
    manual_out = (torch.nn.functional.silu(manual_in @ mlp.gate_proj.weight.T) * (manual_in @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp_in, manual_in, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mlp_out, manual_out, rtol=1e-4, atol=1e-4)
    states = hidden_states(lm, input_ids)
    torch.testing.assert_close(resid_pre, states[layer], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(resid_post, states[layer + 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(resid_mid + mlp_out, resid_post, rtol=1e-4, atol=1e-4)
