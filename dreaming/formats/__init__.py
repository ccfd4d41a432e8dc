"""The layouts dictionaries are published in, one module each, read in place (never converted or copied):

  circuit_tracer  a CLT's or a per-layer set's directory (W_enc_{l}.safetensors / layer_{l}.safetensors), a
                  config.yaml listing one file per layer; also written (save_transcoder)
  gemma_scope     Gemma Scope's params.npz per layer (named by a circuit-tracer config.yaml); Gemma Scope 2's folders
                  (config.json + params.safetensors): Gemma-3's transcoders (affine skip included) and SAEs
  saelens         SAELens folders (cfg.json + sae_weights.safetensors): its SAEs and transcoders
  sparsify        EleutherAI sparsify hookpoint folders (cfg.json + sae.safetensors): transcoders and SAEs
  neurons         a model's MLP neurons (a neurons.yaml naming its shape; the identity encoder, generated)
  files           what every layout reads through: files, tensors, TranscoderFiles

`open_transcoder(reference)` resolves a reference to its TranscoderFiles:
  a directory or a config.yaml   whichever layout's files it holds
  hf://owner/repo[/subfolder][@revision], owner/repo (when no such local path exists), "gemma", "llama": a Hugging
                                 Face repo as circuit-tracer 0.5.0 resolves it (its config.yaml), or sparsify or
                                 SAELens folders; fetched through huggingface_hub (so a local cache with
                                 HF_HUB_OFFLINE=1 serves), encoders first, decoders only when asked for
Adding a layout is adding a module with an `open_directory(path) -> TranscoderFiles | None` and a line below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dreaming.formats import circuit_tracer, gemma_scope, neurons, saelens, sparsify
from dreaming.formats.files import File, TranscoderFiles, download, hub_uri, parse_hub, read_yaml, snapshot
from dreaming.transcoders import Transcoder, TranscoderConfig

LEGACY = {"gemma": "mwhanna/gemma-scope-transcoders", "llama": "mntss/transcoder-Llama-3.2-1B"}  # circuit-tracer's


def open_transcoder(reference: str | os.PathLike) -> TranscoderFiles:
    """Resolve a reference (see the module docstring) to its files; reads headers and config files only (a hub
    dictionary: its config and its encoders' files)."""
    text = os.fspath(reference)
    if text.startswith("hf://"):
        return _open_hub(text, *parse_hub(text))
    path = Path(text).expanduser()
    if path.exists():
        return _open_local(path.resolve())
    if text in LEGACY:
        return _open_hub(text, *parse_hub(LEGACY[text]))
    if "/" in text and not text.startswith(("/", ".", "~")):
        return _open_hub(text, *parse_hub(text))
    raise FileNotFoundError(f"transcoder {text} does not exist (neither a local path nor hf://owner/repo)")


def load_transcoder(reference, dtype=torch.float32, device="cpu") -> Transcoder:
    """Load a dictionary whole, decoders included (any reference `open_transcoder` takes)."""
    return open_transcoder(reference).load(dtype, device)


def read_config(reference) -> TranscoderConfig:
    """The config of a dictionary (any reference `open_transcoder` takes), from its config file and headers."""
    return open_transcoder(reference).config


def _open_local(path: Path) -> TranscoderFiles:
    if path.is_dir() and (path / neurons.FILE).is_file():
        path = path / neurons.FILE
    if path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"{path}: expected a dictionary's directory, a config.yaml or a neurons.yaml")
        meta = read_yaml(path, str(path))
        return neurons.open_neurons(str(path), path, meta) if neurons.is_neurons(meta) else \
            circuit_tracer.open_directory(path)
    for layout in (circuit_tracer, gemma_scope, saelens, sparsify):
        files = layout.open_directory(path)
        if files is not None:
            return files
    raise FileNotFoundError(f"{path}: no dictionary found; expected W_enc_0.safetensors (circuit-tracer cross-layer "
                            f"transcoder), layer_0.safetensors (circuit-tracer per-layer set, or any layer_L of it), "
                            f"a config.yaml with a transcoders: list, Gemma Scope 2 folders (config.json + "
                            f"{gemma_scope.WEIGHTS}), SAELens folders (cfg.json + {saelens.WEIGHTS}), or sparsify "
                            f"hookpoint folders (layers.L.mlp/cfg.json + {sparsify.WEIGHTS})")


def _open_hub(reference: str, repo_id: str, folder: str, revision: str | None) -> TranscoderFiles:
    """A hub repo (or a folder of it): circuit-tracer's config.yaml, else Gemma Scope 2, SAELens or sparsify
    folders."""
    prefix = f"{folder}/" if folder else ""
    try:
        config = Path(download(repo_id, prefix + "config.yaml", revision))
    except FileNotFoundError:
        pass
    else:
        return circuit_tracer.open_hub(reference, repo_id, folder, revision, config)
    root = snapshot(repo_id, folder, revision, ["cfg.json", "*/cfg.json", "config.json", "*/config.json"])
    configs = sorted(root.glob("*/cfg.json")) or sorted(root.glob("cfg.json"))
    folders = sorted(root.glob("*/config.json")) or sorted(root.glob("config.json"))
    if not configs and folders and "hf_hook_point_in" in json.loads(folders[0].read_text()):
        local = snapshot(repo_id, folder, revision, ["config.json", "*/config.json", gemma_scope.WEIGHTS,
                                                     f"*/{gemma_scope.WEIGHTS}"])
        return gemma_scope.open_directory(local, reference)
    if not configs:
        raise FileNotFoundError(f"{hub_uri(repo_id, folder, revision)}: neither a config.yaml (circuit-tracer) nor "
                                f"folders with cfg.json (SAELens, sparsify) or config.json (Gemma Scope 2) found, on "
                                f"the hub or in its local cache")
    if "d_sae" in json.loads(configs[0].read_text()):  # SAELens names the width d_sae; sparsify num_latents
        local = snapshot(repo_id, folder, revision, ["cfg.json", "*/cfg.json", saelens.WEIGHTS,
                                                     f"*/{saelens.WEIGHTS}"])
        return saelens.open_directory(local, reference)

    def sae_file(name):
        return File.remote(repo_id, f"{prefix}{name}/{sparsify.WEIGHTS}", revision)

    return sparsify.open_folders(reference, root, sae_file, hub_uri(repo_id, folder, revision))
