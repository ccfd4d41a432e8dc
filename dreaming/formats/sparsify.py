"""EleutherAI sparsify's layout: one folder per hookpoint, each with cfg.json and sae.safetensors (encoder.weight
[F, d_in], encoder.bias [F], W_dec [F, d_in], b_dec [d_in], W_skip [d_in, d_in] with skip_connection), optionally a
run's config.json naming the model. TopK of relu'd pre-activations.

A hookpoint names a module: `layers.L.mlp` (also `model.layers.L.mlp`, `h.L.mlp`) or `layers.L` (a decoder layer).
A transcoder (cfg.json `transcode: true`) reads its MLP's input and writes its output; an SAE (`transcode: false`)
reads and rebuilds the module's output (the MLP's, or the residual stream leaving the layer) and subtracts b_dec
from its input before encoding, as sparsify does. Any subset of layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dreaming.formats.files import File, LayerTensors, StoredTensor, TranscoderFiles, first_line
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_POST
from dreaming.transcoders import SET

HOOKPOINT = re.compile(r"(?:.+\.)?(?:layers|h)\.(\d+)(\.mlp)?")
WEIGHTS = "sae.safetensors"


def layer_tensors(file: File, transcode: bool) -> LayerTensors:
    return LayerTensors(StoredTensor(file, "encoder.weight"), StoredTensor(file, "encoder.bias"), None,
                        StoredTensor(file, "b_dec"), StoredTensor(file, "W_dec"), StoredTensor(file, "W_skip"),
                        None if transcode else StoredTensor(file, "b_dec"))


def hooks(hookpoint: str, transcode: bool, shown) -> tuple[int, str, str]:
    """(layer, input hook, output hook) of a hookpoint folder's name."""
    match = HOOKPOINT.fullmatch(hookpoint)
    if match is None or (transcode and not match.group(2)):
        expected = "an MLP (layers.L.mlp, model.layers.L.mlp, h.L.mlp)" if transcode else \
            "an MLP or a decoder layer (layers.L.mlp, layers.L, model.layers.L, h.L)"
        raise ValueError(f"{shown}: unknown hookpoint {hookpoint!r}; expected one folder per layer named after "
                         f"{expected}")
    if transcode:
        return int(match.group(1)), HOOK_MLP_IN, HOOK_MLP_OUT
    hook = HOOK_MLP_OUT if match.group(2) else HOOK_RESID_POST
    return int(match.group(1)), hook, hook


def open_folders(reference: str, root: Path, sae_file, where_root: str | None = None, only: str = "*"
                 ) -> TranscoderFiles:
    """One folder per hookpoint under `root` (or the one named `only`), each with cfg.json (and sae.safetensors, the
    File `sae_file(folder name)`); the same kind of dictionary, at the same hook, in every folder."""
    by_layer, first = {}, None
    for cfg_path in sorted(root.glob(f"{only}/cfg.json")):
        name, shown = cfg_path.parent.name, f"{where_root}/{cfg_path.parent.name}/cfg.json" if where_root else cfg_path
        try:
            cfg = json.loads(cfg_path.read_text())
            d_in, latents = cfg["d_in"], cfg.get("num_latents") or cfg.get("expansion_factor", 32) * cfg["d_in"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{shown}: expected a sparsify cfg.json with d_in, num_latents or expansion_factor, k "
                             f"({first_line(e)})") from None
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{shown}: unknown activation {cfg['activation']!r}; expected 'topk'")
        transcode = bool(cfg.get("transcode", False))
        layer, input_hook, output_hook = hooks(name, transcode, shown)
        sizes = {"d_model": d_in, "d_transcoder": latents, "k": cfg.get("k", 32),
                 "skip_connection": bool(cfg.get("skip_connection", False)), "feature_input_hook": input_hook,
                 "feature_output_hook": output_hook}
        if first is not None and sizes != first[1]:
            raise ValueError(f"{shown}: {sizes}, but {first[0]} has {first[1]} (every layer needs the same)")
        first = first or (shown, sizes)
        by_layer[layer] = layer_tensors(sae_file(name), transcode)
    run = root / "config.json"  # the training run's config names the model
    model_name = json.loads(run.read_text()).get("model") if run.exists() else None
    meta = {"kind": SET, "activation": "topk", "model_name": model_name, **first[1]}
    return TranscoderFiles(reference, "sparsify", by_layer, meta, str(first[0]))


def open_directory(path: Path) -> TranscoderFiles | None:
    """Hookpoint folders under `path`, or one hookpoint folder itself (one layer); None when `path` is neither."""
    if any(path.glob(f"*/{WEIGHTS}")):
        return open_folders(str(path), path, lambda folder: File.local(path / folder / WEIGHTS))
    if (path / "cfg.json").exists() and (path / WEIGHTS).exists():
        return open_folders(str(path), path.parent, lambda folder: File.local(path / WEIGHTS), only=path.name)
    return None
