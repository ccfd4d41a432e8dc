"""MLP neurons as a dictionary, the EPO paper's own targets: latent i of layer L is neuron i of layer L's MLP, its
hidden activation where the down projection reads it (TransformerLens's blocks.L.mlp.hook_post), relu'd: a dream
raises it above zero as a feature's. No file holds weights: a neurons.yaml names the model's shape, and the encoder
is the identity, generated on read. No decoders are read (`similar` and the output tokens refuse it).

neurons.yaml: {dictionary: mlp-neurons, n_layers, d_mlp, model_name, layers (optional: some only)};
`neurons_yaml(lm, path)` writes what a model has (`dreaming bundle create --transcoder neurons` does).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dreaming.formats.files import LayerTensors, StoredTensor, TranscoderFiles
from dreaming.models import HOOK_MLP_POST
from dreaming.transcoders import SET

KIND = "mlp-neurons"
FILE = "neurons.yaml"


class Identity:
    """The tensors of an identity encoder of width `width`, generated on read (the interface of formats.files.File):
    W_enc [width, width] = I, b_enc [width] = 0."""

    is_local, is_npz = True, False

    def __init__(self, name: str, width: int):
        self.name, self.width = name, width

    def keys(self) -> set[str]:
        return {"W_enc", "b_enc"}

    def shape(self, key: str) -> list[int]:
        return [self.width, self.width] if key == "W_enc" else [self.width]

    def read(self, key: str, rows: slice, transposed: bool = False) -> torch.Tensor:
        index = torch.arange(self.width)[rows]
        if key == "b_enc":
            return torch.zeros(len(index))
        return torch.nn.functional.one_hot(index, self.width).float()

    def path(self) -> Path:
        return Path(self.name)


def neurons_meta(lm) -> dict:
    """What the neurons.yaml of `lm` says: every layer's neurons."""
    return {"dictionary": KIND, "n_layers": lm.n_layers, "d_mlp": lm.hook_width(HOOK_MLP_POST), "model_name": lm.name}


def neurons_yaml(lm, path: Path) -> Path:
    """Write the neurons.yaml of `lm` at `path`."""
    path.write_text(yaml.safe_dump(neurons_meta(lm), sort_keys=False))
    return path


def is_neurons(meta: dict) -> bool:
    return meta.get("dictionary") == KIND


def open_neurons(reference: str, path: Path, meta: dict) -> TranscoderFiles:
    """The neurons a neurons.yaml at `path` (what errors name) says, `meta` its content."""
    try:
        n_layers, width = int(meta["n_layers"]), int(meta["d_mlp"])
        layers = [int(l) for l in meta.get("layers") or range(n_layers)]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected dictionary: {KIND}, n_layers, d_mlp (and optionally layers), "
                         f"got {e!r}") from None
    if width < 1 or n_layers < 1 or not all(0 <= l < n_layers for l in layers):
        raise ValueError(f"{path}: n_layers {n_layers}, d_mlp {width}, layers {layers}: expected positive sizes and "
                         f"layers in 0..{n_layers - 1}")
    source = Identity(str(path), width)
    tensors = {layer: LayerTensors(StoredTensor(source, "W_enc"), StoredTensor(source, "b_enc"), None,
                                   StoredTensor(source, "b_dec"), StoredTensor(source, "W_dec"), None)
               for layer in layers}
    meta = {"kind": SET, "activation": "relu", "feature_input_hook": HOOK_MLP_POST,
            "feature_output_hook": HOOK_MLP_POST, "model_name": meta.get("model_name"), "n_layers": n_layers,
            "skip_connection": False}
    return TranscoderFiles(reference, KIND, tensors, meta, str(path))
