"""EleutherAI sparsify's layout, with files written by sparsify's own `SparseCoder.save_to_disk` (eai-sparsify, in the
test extra): transcoders with and without a skip and SAEs on an MLP's output or on the residual stream, some layers
only, read by `open_transcoder`; activations equal to sparsify's own `encode` and reconstructions to its `forward`
on the same inputs."""

import pytest
import torch

from dreaming.encoder import LazyEncoder
from dreaming.formats import open_transcoder
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_POST

sparsify = pytest.importorskip("sparsify")  # the test extra installs it (make setup)

D, F, K = 32, 48, 6
LAYERS = [0, 2]
# case -> (hookpoint folder, transcode, skip, dreaming's input and output hooks)
CASES = {
    "transcoder": ("layers.{}.mlp", True, False, HOOK_MLP_IN, HOOK_MLP_OUT),
    "skip_transcoder": ("layers.{}.mlp", True, True, HOOK_MLP_IN, HOOK_MLP_OUT),
    "mlp_sae": ("layers.{}.mlp", False, False, HOOK_MLP_OUT, HOOK_MLP_OUT),
    "residual_sae": ("layers.{}", False, False, HOOK_RESID_POST, HOOK_RESID_POST),
}


def written(root, case: str) -> dict:
    """sparsify's own sparse coders (random weights, nonzero biases), saved by its save_to_disk; {layer: coder}."""
    hookpoint, transcode, skip, _, _ = CASES[case]
    coders = {}
    for layer in LAYERS:
        config = sparsify.SparseCoderConfig(num_latents=F, k=K, transcode=transcode, skip_connection=skip)
        coder = sparsify.SparseCoder(D, config)
        generator = torch.Generator().manual_seed(layer)
        with torch.no_grad():
            for parameter in coder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / D**0.5)
        coder.save_to_disk(root / hookpoint.format(layer))
        coders[layer] = coder.eval()
    return coders


@pytest.mark.parametrize("case", list(CASES))
def test_files_sparsify_wrote_are_read_as_sparsify_encodes(tmp_path, case):
    coders = written(tmp_path, case)
    _, _, skip, input_hook, output_hook = CASES[case]
    files = open_transcoder(tmp_path)
    c = files.config
    assert files.layout == "sparsify" and c.layer_ids == LAYERS and (c.d_model, c.d_transcoder, c.k) == (D, F, K)
    assert (c.feature_input_hook, c.feature_output_hook, c.skip_connection) == (input_hook, output_hook, skip)
    encoder, loaded = LazyEncoder(files), files.load()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(9))
    for layer, coder in coders.items():
        with torch.no_grad():
            theirs = coder.encode(x)
            dense = torch.zeros(len(x), F).scatter_(1, theirs.top_indices, theirs.top_acts)
            torch.testing.assert_close(encoder.encode(x, layer), dense, rtol=1e-4, atol=1e-5)
            ours = loaded.decode_layer({layer: loaded.encode(x, layer)}, layer, x)
            torch.testing.assert_close(ours, coder(x).sae_out, rtol=1e-4, atol=1e-5)
