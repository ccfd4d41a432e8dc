"""circuit-tracer's layouts, read and written: a cross-layer transcoder's directory, a per-layer transcoder set's, and a
config.yaml whose `transcoders:` list names one file per layer (circuit-tracer's own hub repos; Gemma Scope's
params.npz files are read by dreaming/formats/gemma_scope.py).

Files (see docs/reference.md, "Transcoders on disk"):
  CLT  W_enc_{l}.safetensors: W_enc_{l} [F, d_model], b_enc_{l} [F], b_dec_{l} [d_model], threshold_{l} [F]?,
                              W_skip_{l} [d_model, d_model]?   (ours: circuit-tracer 0.5.0's load_clt skips it)
       W_dec_{l}.safetensors: W_dec_{l} [F, n_layers - l, d_model]   (slot j writes to layer l + j)
  set  layer_{l}.safetensors: W_enc [F, d_model], W_dec [F, d_model], b_enc [F], b_dec [d_model],
       activation_function.threshold [F]?, W_skip [d_model, d_model]?   (some layers only: an SAE-like set)
  config.yaml: model_kind, feature_input_hook, feature_output_hook, activation, k (topk), model_name; or
       transcoders: [one file per layer, in layer order: relative or absolute paths, or hf:// URIs]

W_skip follows circuit-tracer's transcoder set: skip = x @ W_skip.T (nn.Linear convention, [d_out, d_in]), in a
CLT's files too. circuit-tracer's CrossLayerTranscoder has a W_skip [n_layers, d_in, d_out] (skip = x @ W_skip[l]),
but its file loader reads none, so a CLT loaded there encodes the same and reconstructs without the skip unless it
is set: `clt.W_skip = stack([W_skip_{l}.T])`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from safetensors.torch import save_file

from dreaming.atomic import atomic_directory
from dreaming.formats import gemma_scope
from dreaming.formats.files import (File, LayerTensors, StoredTensor, TranscoderFiles, hub_uri, parse_hub, read_yaml,
                                    snapshot)
from dreaming.transcoders import CLT, SET, Transcoder, TranscoderConfig

LAYOUT = {CLT: "circuit-tracer-clt", SET: "circuit-tracer-set"}
FILE_PATTERN = {CLT: re.compile(r"W_enc_(\d+)\.safetensors"), SET: re.compile(r"layer_(\d+)\.safetensors")}


# ------------------------------------------------------------------------------------------------- names


def enc_file(kind, layer):
    return f"W_enc_{layer}.safetensors" if kind == CLT else f"layer_{layer}.safetensors"


def dec_file(kind, layer):
    return f"W_dec_{layer}.safetensors" if kind == CLT else enc_file(kind, layer)


def dec_name(kind, layer):
    """The decoder's tensor name: W_dec_{l} [F, n_layers - l, d_model] (CLT) or W_dec [F, d_model] (set)."""
    return f"W_dec_{layer}" if kind == CLT else "W_dec"


def skip_name(kind, layer):
    """The skip's tensor name, in the encoder file: W_skip_{l} (CLT) or W_skip (set), [d_model, d_model]."""
    return f"W_skip_{layer}" if kind == CLT else "W_skip"


def enc_names(kind, layer):
    """Tensor names (W_enc, b_enc, b_dec, threshold) inside the encoder file of one layer."""
    if kind == CLT:
        return f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}", f"threshold_{layer}"
    return "W_enc", "b_enc", "b_dec", "activation_function.threshold"


def clt_layer(enc: File, dec: File, layer: int) -> LayerTensors:
    W, b, b_dec, threshold = enc_names(CLT, layer)
    return LayerTensors(StoredTensor(enc, W), StoredTensor(enc, b), StoredTensor(enc, threshold),
                        StoredTensor(enc, b_dec), StoredTensor(dec, dec_name(CLT, layer)),
                        StoredTensor(enc, skip_name(CLT, layer)))


def set_layer(file: File) -> LayerTensors:
    """A per-layer file: circuit-tracer's safetensors keys, or a Gemma Scope params.npz."""
    if file.is_npz:
        return gemma_scope.npz_layer(file)
    W, b, b_dec, threshold = enc_names(SET, 0)
    return LayerTensors(StoredTensor(file, W), StoredTensor(file, b), StoredTensor(file, threshold),
                        StoredTensor(file, b_dec), StoredTensor(file, dec_name(SET, 0)),
                        StoredTensor(file, skip_name(SET, 0)))


# ------------------------------------------------------------------------------------------------ reading


def yaml_meta(meta: dict) -> dict:
    """The config fields a circuit-tracer config.yaml gives."""
    names = ("activation", "k", "feature_input_hook", "feature_output_hook", "model_name")
    return {"kind": meta.get("model_kind"), **{name: meta.get(name) for name in names}}


def directory_kind(path: Path, meta: dict) -> str | None:
    """CLT or SET when `path` holds circuit-tracer's files (or its config.yaml says), else None."""
    kind = meta.get("model_kind")
    if kind is None and path.is_dir():
        names = [p.name for p in path.iterdir()]
        kind = next((k for k in (CLT, SET) if any(FILE_PATTERN[k].fullmatch(n) for n in names)), None)
    return kind


def open_directory(path: Path) -> TranscoderFiles | None:
    """A circuit-tracer directory (or its config.yaml); None when `path` holds none of its files."""
    config = path if path.is_file() else path / "config.yaml"
    meta = read_yaml(config, str(config)) if config.exists() else {}
    if "transcoders" in meta or path.is_file():
        return open_list(str(path), config, meta)
    kind = directory_kind(path, meta)
    if kind is None:
        return None
    where = str(config) if config.exists() else str(path)
    layers = directory_layers(path, kind, lambda name: File.local(path / name))
    return TranscoderFiles(str(path), LAYOUT[kind], layers, {**yaml_meta(meta), "kind": kind}, where)


def directory_layers(folder: Path, kind: str, file) -> dict[int, LayerTensors]:
    """The layers of a circuit-tracer directory; `file(name)` makes the File of a file of it. A CLT needs every
    layer 0..n-1; a set may hold some layers only."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    found = sorted(int(m.group(1)) for name in names if (m := FILE_PATTERN[kind].fullmatch(name)))
    missing = sorted(set(range(max(found, default=0) + 1)) - set(found))
    if not found or (kind == CLT and missing):
        raise FileNotFoundError(f"{folder}: a {kind} needs {enc_file(kind, 'L')} for every layer L = 0..n-1; "
                                f"missing layers {missing or [0]}")
    if kind == CLT:
        return {l: clt_layer(file(enc_file(CLT, l)), file(dec_file(CLT, l)), l) for l in found}
    return {l: set_layer(file(enc_file(SET, l))) for l in found}


def open_list(reference: str, config: Path, meta: dict, hub: tuple[str, str, str | None] | None = None
              ) -> TranscoderFiles:
    """A config.yaml whose `transcoders:` lists one file per layer; `hub` (repo, folder of the yaml, revision)
    when the yaml came from a hub repo (its relative entries are files of that repo)."""
    where = hub_uri(hub[0], f"{hub[1]}/config.yaml" if hub[1] else "config.yaml", hub[2]) if hub else str(config)
    entries = meta.get("transcoders")
    if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
        raise ValueError(f"{where}: transcoders: should list one file per layer (paths or hf:// URIs)")
    if meta.get("model_kind", SET) != SET:
        raise ValueError(f"{where}: a {meta['model_kind']} with a transcoders: list (Gemma Scope 2's layout) is not "
                         f"supported; expected model_kind: {SET}")
    files = []
    for layer, entry in enumerate(entries):
        if entry.startswith("hf://"):
            files.append(File.remote(*parse_hub(entry)))
        elif hub is not None and not Path(entry).is_absolute():
            repo_id, folder, revision = hub
            files.append(File.remote(repo_id, f"{folder}/{entry}" if folder else entry, revision))
        else:
            path = config.parent / Path(entry).expanduser()  # an absolute entry stays itself
            if not path.is_file():
                raise FileNotFoundError(f"{where}: layer {layer}'s file {path} does not exist")
            files.append(File.local(path.resolve()))
    layout = "gemma-scope" if files[0].is_npz else "circuit-tracer-set"
    layers = {layer: set_layer(file) for layer, file in enumerate(files)}
    return TranscoderFiles(reference, layout, layers, {**yaml_meta(meta), "kind": SET}, where)


def open_layer_files(paths: list, meta: dict | None = None) -> TranscoderFiles:
    """Per-layer files in layer order (circuit-tracer safetensors or Gemma Scope params.npz), as a config.yaml's
    `transcoders:` list names them; `meta`: the config.yaml's other fields (model_kind, hooks, ...)."""
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    return open_list(paths[0] if len(paths) == 1 else f"[{paths[0]}, ...]", Path(paths[0]),
                     {**(meta or {}), "transcoders": paths})


def open_hub(reference: str, repo_id: str, folder: str, revision: str | None, config: Path) -> TranscoderFiles:
    """A hub repo (or a folder of it) with circuit-tracer's config.yaml, fetched to `config`."""
    prefix = f"{folder}/" if folder else ""
    where = hub_uri(repo_id, prefix + "config.yaml", revision)
    meta = read_yaml(config, where)
    if "transcoders" in meta:
        return open_list(reference, config, meta, (repo_id, folder, revision))
    kind = meta.get("model_kind")
    if kind not in LAYOUT:
        raise ValueError(f"{where}: unknown model_kind {kind!r}; expected one of {tuple(LAYOUT)}")
    # a CLT's encoders now (measuring needs them all), its decoders when asked; a set's files hold both
    local = snapshot(repo_id, folder, revision, ["W_enc_*.safetensors" if kind == CLT else "layer_*.safetensors"])

    def file(name):
        return File.local(local / name) if (local / name).exists() else File.remote(repo_id, prefix + name, revision)

    return TranscoderFiles(reference, LAYOUT[kind], directory_layers(local, kind, file), yaml_meta(meta), where)


# ------------------------------------------------------------------------------------------------ writing


def config_yaml(c: TranscoderConfig) -> dict:
    meta = {
        "model_kind": c.kind,
        "feature_input_hook": c.feature_input_hook,
        "feature_output_hook": c.feature_output_hook,
        "activation": c.activation,
        "model_name": c.model_name,
    }
    if c.k is not None:
        meta["k"] = c.k
    return meta


def _cpu(t):
    return t.detach().to("cpu").contiguous().clone()


def save_transcoder(transcoder: Transcoder, directory) -> None:
    """Write `transcoder` to `directory` in the circuit-tracer layout; replaces an existing one atomically."""
    c, t = transcoder.config, transcoder
    with atomic_directory(directory) as tmp:
        for l in c.layer_ids:
            W, b, bd, thr = enc_names(c.kind, l)
            enc = {W: _cpu(t.W_enc[l]), b: _cpu(t.b_enc[l]), bd: _cpu(t.b_dec[l])}
            if t.threshold is not None:
                enc[thr] = _cpu(t.threshold[l])
            if t.W_skip is not None:
                enc[skip_name(c.kind, l)] = _cpu(t.W_skip[l])
            if c.kind == CLT:
                save_file(enc, str(tmp / enc_file(c.kind, l)))
                save_file({dec_name(c.kind, l): _cpu(t.W_dec[l])}, str(tmp / dec_file(c.kind, l)))
            else:
                enc["W_dec"] = _cpu(t.W_dec[l])
                save_file(enc, str(tmp / enc_file(c.kind, l)))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config_yaml(c), sort_keys=False))
