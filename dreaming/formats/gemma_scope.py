"""Gemma Scope's layouts: Gemma Scope (Gemma-2) and Gemma Scope 2 (Gemma-3), per-layer JumpReLU transcoders and SAEs.

Gemma Scope: one params.npz a layer, named by a circuit-tracer config.yaml's `transcoders:` list
  (dreaming/formats/circuit_tracer.py reads the list): W_enc [d_model, F] (stored transposed: read as [F, d_model]),
  b_enc [F], threshold [F], W_dec [F, d_model], b_dec [d_model]. np.savez stores members uncompressed, so they are
  memory-mapped, never loaded whole.
Gemma Scope 2: one folder a layer (e.g. layer_12_width_16k_l0_small/) with params.safetensors and config.json
  (architecture "jump_relu", model_name, hf_hook_point_in, hf_hook_point_out: Hugging Face module paths such as
  model.layers.12.pre_feedforward_layernorm.output); give one folder or a folder of them (some layers, for a set).
  Weights as JAX stores them, x @ W: w_enc [d_in, F] (read transposed), b_enc, threshold, b_dec [d_out], w_dec
  [F, d_out] for a per-layer transcoder or SAE, [F, n_layers, d_out] for a cross-layer transcoder (zero before its
  own layer), and in the affine variants affine_skip_connection [d_in, d_out], added as x @ affine_skip_connection
  as circuit-tracer adds it (dreaming's W_skip is its transpose; SAELens 6.54 adds x @ affine_skip_connection.T).
  `save_gemma_scope_2` writes a dictionary in this layout, which circuit-tracer loads with its skip.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreaming.atomic import atomic_directory
from dreaming.formats.files import File, LayerTensors, StoredTensor, TranscoderFiles, first_line, open_layer_folders
from dreaming.models import (
    HOOK_MLP_IN,
    HOOK_MLP_OUT,
    HOOK_MLP_POST,
    HOOK_RESID_MID,
    HOOK_RESID_POST,
    HOOK_RESID_PRE,
)
from dreaming.transcoders import CLT, SET, Transcoder

CONFIG, WEIGHTS = "config.json", "params.safetensors"
# Hugging Face module paths (model.layers.L.<path>), as Gemma Scope 2 names hook points, to dreaming.models names
HF_HOOKS = {
    "input": HOOK_RESID_PRE, "output": HOOK_RESID_POST,
    "pre_feedforward_layernorm.input": HOOK_RESID_MID, "pre_feedforward_layernorm.output": HOOK_MLP_IN,
    "post_attention_layernorm.input": HOOK_RESID_MID, "post_attention_layernorm.output": HOOK_MLP_IN,  # Llama-like
    "post_feedforward_layernorm.output": HOOK_MLP_OUT, "mlp.output": HOOK_MLP_OUT,
    "mlp.down_proj.input": HOOK_MLP_POST,
}
HF_HOOK = re.compile(r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)")


def npz_layer(file: File) -> LayerTensors:
    return LayerTensors(StoredTensor(file, "W_enc", transposed=True), StoredTensor(file, "b_enc"),
                        StoredTensor(file, "threshold"), StoredTensor(file, "b_dec"), StoredTensor(file, "W_dec"), None)


def load_gemma_scope(npz_paths, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", model_name=None,
                     dtype=torch.float32, device="cpu") -> Transcoder:
    """A JumpReLU per-layer set from Gemma Scope params.npz files: {layer: path} or a list in layer order."""
    from dreaming.formats.circuit_tracer import open_layer_files  # (which reads this layout's files through here)

    paths = dict(npz_paths) if isinstance(npz_paths, dict) else dict(enumerate(npz_paths))
    n = len(paths)
    if n == 0 or sorted(paths) != list(range(n)):
        raise ValueError(f"Gemma Scope transcoders needed for layers 0..{n - 1}, got layers {sorted(paths)}")
    meta = {"feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook,
            "model_name": model_name}
    return open_layer_files([paths[l] for l in range(n)], meta).load(dtype, device)


# --------------------------------------------------------------------------------------------- Gemma Scope 2


def open_directory(path: Path, reference: str | None = None) -> TranscoderFiles | None:
    """One Gemma Scope 2 folder, or a folder of them (one per layer); None when `path` is neither. `reference`: what
    the user gave (default: the path)."""
    return open_layer_folders(path, reference, "gemma-scope-2", CONFIG, WEIGHTS, read_config, folder_tensors)


def folder_tensors(file: File, meta: dict, layer: int) -> LayerTensors:
    clt = meta["kind"] == CLT
    return LayerTensors(StoredTensor(file, "w_enc", transposed=True), StoredTensor(file, "b_enc"),
                        StoredTensor(file, "threshold"), StoredTensor(file, "b_dec"),
                        StoredTensor(file, "w_dec", outputs_from=layer if clt else 0),
                        StoredTensor(file, "affine_skip_connection", transposed=True))


def read_config(path: Path) -> tuple[int, dict]:
    """(layer, the config fields dreaming reads) of one Gemma Scope 2 config.json; a cross-layer transcoder is told
    by its decoder's shape, [F, n_layers, d_out]."""
    try:
        cfg = json.loads(path.read_text())
        hook_in = cfg["hf_hook_point_in"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected a Gemma Scope 2 config.json with hf_hook_point_in "
                         f"({first_line(e)})") from None
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(f"{path}: architecture {cfg['architecture']!r} is not read; expected 'jump_relu'")
    layer, input_hook = hf_hook(hook_in, path)
    output_hook = input_hook
    if cfg.get("hf_hook_point_out"):
        out_layer, output_hook = hf_hook(cfg["hf_hook_point_out"], path)
        if out_layer != layer:
            raise ValueError(f"{path}: reads layer {layer} and names layer {out_layer} as its output; expected its own "
                             "layer (a cross-layer transcoder names its own layer and holds every output layer's "
                             "decoder)")
    weights = File.local(path.parent / WEIGHTS)
    decoder = weights.shape("w_dec") if "w_dec" in weights.keys() else []
    meta = {"kind": CLT if len(decoder) == 3 else SET, "activation": "jumprelu", "feature_input_hook": input_hook,
            "feature_output_hook": output_hook, "model_name": cfg.get("model_name"),
            "skip_connection": bool(cfg.get("affine_connection", False))}
    if meta["kind"] == CLT:
        meta["n_layers"] = decoder[1]
    return layer, meta


def hf_hook(name: str, path: Path) -> tuple[int, str]:
    """(layer, dreaming's hook) of a Hugging Face module path such as model.layers.12.output."""
    match = HF_HOOK.fullmatch(name or "")
    if match is None or match.group(2) not in HF_HOOKS:
        raise ValueError(f"{path}: hook point {name!r} is not read; expected model.layers.L.<point>, <point> one of "
                         f"{', '.join(HF_HOOKS)}")
    return int(match.group(1)), HF_HOOKS[match.group(2)]


def save_gemma_scope_2(transcoder: Transcoder, directory, hf_hook_point) -> None:
    """Write `transcoder` (a JumpReLU or ReLU CLT or per-layer set) in Gemma Scope 2's layout, one folder a layer
    (`layer_{l}/` with params.safetensors and config.json), replacing `directory` atomically. `hf_hook_point(hook,
    layer)` names a hook point as a Hugging Face module path (`LanguageModel.module_path`). A ReLU dictionary is
    written with zero thresholds (JumpReLU at 0 is ReLU); a TopK one has no JumpReLU form and is refused."""
    c, t = transcoder.config, transcoder
    if c.activation not in ("jumprelu", "relu"):
        raise ValueError(f"a {c.activation} dictionary has no JumpReLU form: Gemma Scope 2 holds JumpReLU ones")

    def cpu(x):
        return x.detach().float().cpu().contiguous()

    with atomic_directory(directory) as tmp:
        for l in c.layer_ids:
            threshold = t.threshold[l] if t.threshold is not None else torch.zeros(c.d_transcoder)
            w_dec = cpu(t.W_dec[l])
            if c.kind == CLT:  # every output layer, zero before its own (what circuit-tracer's loader slices)
                w_dec = torch.cat([w_dec.new_zeros(c.d_transcoder, l, c.d_model), w_dec], dim=1)
            params = {"w_enc": cpu(t.W_enc[l].T), "b_enc": cpu(t.b_enc[l]), "threshold": cpu(threshold),
                      "b_dec": cpu(t.b_dec[l]), "w_dec": w_dec}
            if t.W_skip is not None:
                params["affine_skip_connection"] = cpu(t.W_skip[l].T)  # x @ A = x @ W_skip.T
            (tmp / f"layer_{l}").mkdir()
            save_file(params, str(tmp / f"layer_{l}" / WEIGHTS))
            (tmp / f"layer_{l}" / CONFIG).write_text(json.dumps({
                "architecture": "jump_relu", "model_name": c.model_name, "width": c.d_transcoder,
                "hf_hook_point_in": hf_hook_point(c.feature_input_hook, l),
                "hf_hook_point_out": hf_hook_point(c.feature_output_hook, l),
                "affine_connection": t.W_skip is not None, "written_by": "dreaming"}, indent=2))
