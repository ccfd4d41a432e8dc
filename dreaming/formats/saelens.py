"""SAELens's layout: a folder with cfg.json and sae_weights.safetensors per dictionary (what `SAE.save_model`
writes), one layer each; give one such folder, or a folder of them (any subset of layers).

cfg.json: d_in, d_sae, architecture, apply_b_dec_to_input, normalize_activations, reshape_activations, (topk) k,
rescale_acts_by_decoder_norm, (transcoders) d_out, and metadata: hook_name (and hook_name_out for a transcoder) as
TransformerLens names hook points ("blocks.8.hook_resid_post"), model_name. Older files keep hook_name at the top.
sae_weights.safetensors: W_enc [d_in, d_sae] (read transposed), b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
threshold [d_sae] (jumprelu), W_skip [d_out, d_in] (skip transcoders: x @ W_skip.T).

Read as SAELens encodes: (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc, then relu / jumprelu / topk. An SAE reads
and rebuilds one hook point (input hook = output hook); a transcoder reads hook_name and writes hook_name_out.
What would change the activations and is not read (activation normalisation, hook_z reshaping, decoder-norm
rescaling, gated and other architectures) is refused, naming the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dreaming.formats.files import File, LayerTensors, StoredTensor, TranscoderFiles, first_line, open_layer_folders
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_MLP_POST, HOOK_RESID_MID, HOOK_RESID_POST, HOOK_RESID_PRE
from dreaming.transcoders import SET

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# architecture -> (activation, a transcoder, with a skip connection)
ARCHITECTURES = {
    "standard": ("relu", False, False), "jumprelu": ("jumprelu", False, False), "topk": ("topk", False, False),
    "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
# TransformerLens's hook points (blocks.L.<point>), as dreaming.models names them
TRANSFORMER_LENS_HOOKS = {
    "hook_resid_pre": HOOK_RESID_PRE, "hook_resid_mid": HOOK_RESID_MID, "hook_mlp_in": HOOK_RESID_MID,
    "ln2.hook_normalized": HOOK_MLP_IN, "hook_mlp_out": HOOK_MLP_OUT, "hook_resid_post": HOOK_RESID_POST,
    "mlp.hook_post": HOOK_MLP_POST,
}
HOOK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def open_directory(path: Path, reference: str | None = None) -> TranscoderFiles | None:
    """One SAELens folder, or a folder of them (one per layer); None when `path` is neither. `reference`: what the
    user gave (default: the path)."""
    return open_layer_folders(path, reference, "saelens", CONFIG, WEIGHTS, read_config, layer_tensors)


def layer_tensors(file: File, meta: dict, layer: int) -> LayerTensors:
    return LayerTensors(StoredTensor(file, "W_enc", transposed=True), StoredTensor(file, "b_enc"),
                        StoredTensor(file, "threshold"), StoredTensor(file, "b_dec"), StoredTensor(file, "W_dec"),
                        StoredTensor(file, "W_skip"), StoredTensor(file, "b_dec") if meta["apply_b_dec"] else None)


def read_config(path: Path) -> tuple[int, dict]:
    """(layer, the config fields dreaming reads) of one SAELens cfg.json; a one-line ValueError naming the field
    for what is not read."""
    try:
        cfg = json.loads(path.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected a SAELens cfg.json with d_in, d_sae, architecture "
                         f"({first_line(e)})") from None
    metadata = cfg.get("metadata") or {}
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {architecture!r} is not read; expected one of "
                         f"{', '.join(ARCHITECTURES)}")
    activation, transcoder, skip = ARCHITECTURES[architecture]
    for field, fine in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(field, fine) not in (fine, None):
            raise ValueError(f"{path}: {field} {cfg[field]!r} is not supported (activations are read as the model "
                             f"gives them); expected {fine!r}")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{path}: rescale_acts_by_decoder_norm true is not supported; expected false")
    if transcoder and cfg.get("d_out", d_in) != d_in:
        raise ValueError(f"{path}: d_out {cfg['d_out']} differs from d_in {d_in}: a transcoder here maps the "
                         f"residual width to itself")
    hook_in = metadata.get("hook_name") or cfg.get("hook_name")
    layer, input_hook = tl_hook(hook_in, path)
    output_hook = input_hook
    if transcoder:
        hook_out = metadata.get("hook_name_out") or cfg.get("hook_name_out")
        out_layer, output_hook = tl_hook(hook_out, path) if hook_out else (layer, HOOK_MLP_OUT)
        if out_layer != layer:
            raise ValueError(f"{path}: reads layer {layer} ({hook_in}) and writes layer {out_layer} ({hook_out}); "
                             f"expected one layer")
    meta = {"kind": SET, "activation": activation, "k": cfg.get("k") if activation == "topk" else None,
            "d_model": d_in, "d_transcoder": d_sae, "skip_connection": skip, "feature_input_hook": input_hook,
            "feature_output_hook": output_hook,
            "model_name": metadata.get("model_name") or cfg.get("model_name"),
            "apply_b_dec": bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder}
    return layer, meta


def tl_hook(name, path: Path) -> tuple[int, str]:
    """(layer, dreaming's hook) of a TransformerLens hook name such as blocks.8.hook_resid_post."""
    match = HOOK_NAME.fullmatch(name or "")
    if match is None or match.group(2) not in TRANSFORMER_LENS_HOOKS:
        raise ValueError(f"{path}: hook {name!r} is not read; expected blocks.L.<point>, <point> one of "
                         f"{', '.join(TRANSFORMER_LENS_HOOKS)}")
    return int(match.group(1)), TRANSFORMER_LENS_HOOKS[match.group(2)]
