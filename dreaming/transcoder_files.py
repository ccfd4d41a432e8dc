"""Transcoders where the field publishes them, read in place: a reference resolved to each layer's tensors, read
lazily (a few rows, one layer's encoder, or everything), never converted or copied.

Owns:
  open_transcoder(reference) -> TranscoderFiles   where every layer's tensors are
  TranscoderFiles                 the config; encoder rows, one layer's encoder, decoder rows, everything; identity
  check_against_model             the transcoder fits a model (layers, d_model, hooks), before any long work

References:
  a directory      circuit-tracer's layout: a CLT (W_enc_{l}.safetensors, W_dec_{l}.safetensors) or a per-layer set
                   (layer_{l}.safetensors), config.yaml optional; or EleutherAI sparsify's: one folder per MLP
                   hookpoint (layers.{l}.mlp, model.layers.{l}.mlp, h.{l}.mlp) with cfg.json and sae.safetensors
  a config.yaml    (the file, or in a directory) whose `transcoders:` list names one file per layer, in layer order:
                   paths relative to the yaml, absolute paths, or hf://owner/repo/path[@revision] URIs; safetensors
                   with circuit-tracer's per-layer keys, or Gemma Scope params.npz
  hf://owner/repo[/subfolder][@revision], owner/repo (when no such local path exists), "gemma", "llama": a Hugging
                   Face repo as circuit-tracer 0.5.0 resolves it (its config.yaml), or a sparsify repo; fetched
                   through huggingface_hub (so a local cache with HF_HUB_OFFLINE=1 serves), encoders first, decoders
                   only when asked for

Every layer's tensors, as read whatever the layout stores (F features per layer):
  W_enc [F, d_model], b_enc [F], threshold [F] (jumprelu), b_dec [d_model], W_skip [d_model, d_model] (x @ W_skip.T),
  W_dec [F, d_model], or [F, n_layers - layer, d_model] for a CLT
Gemma Scope stores W_enc as [d_model, F] (read transposed); sparsify calls the encoder encoder.weight / encoder.bias
and its activation is topk. Every problem is one line naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import struct
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import torch
import yaml
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import SafetensorError, safe_open

from dreaming.transcoders import (CLT, SET, Transcoder, TranscoderConfig, _dec_file, _dec_name, _enc_file, _enc_names,
                                  _skip_name, activate)

LAYOUTS = ("circuit-tracer-clt", "circuit-tracer-set", "gemma-scope", "sparsify")
LEGACY = {"gemma": "mwhanna/gemma-scope-transcoders", "llama": "mntss/transcoder-Llama-3.2-1B"}  # circuit-tracer's
SPARSIFY_HOOKPOINT = re.compile(r"(?:.+\.)?(?:layers|h)\.(\d+)\.mlp")  # its transcoders read an MLP's input
HASH_CHUNK_BYTES = 1 << 26  # identity() reads tensors this much at a time
ENCODER_CACHE_BYTES = 4 << 30  # LazyEncoder: whole layers' encoders kept resident up to this many bytes


# ------------------------------------------------------------------------------------------------- files


def _download(repo_id: str, filename: str, revision: str | None) -> str:
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception as e:  # not on the hub nor in the cache, offline, gated, no network: all one answer
        raise FileNotFoundError(f"{_uri(repo_id, filename, revision)}: not found on the Hugging Face hub nor in "
                                f"its local cache ({_first_line(e)})") from None


def _snapshot(repo_id: str, subfolder: str, revision: str | None, patterns: list[str]) -> Path:
    """The local folder of `subfolder` of a hub repo, holding (at least) the files matching `patterns`."""
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + p for p in patterns])
    except Exception as e:
        raise FileNotFoundError(f"{_uri(repo_id, subfolder, revision)}: not found on the Hugging Face hub nor in "
                                f"its local cache ({_first_line(e)})") from None
    return Path(folder) / subfolder


def _uri(repo_id: str, path: str, revision: str | None) -> str:
    return f"hf://{repo_id}" + (f"/{path}" if path else "") + (f"@{revision}" if revision else "")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


class _File:
    """One file of a transcoder, opened on first use: a local path, or a hub file (repo, path, revision) fetched
    then. `name` (the path or the hf:// URI) is what errors call it."""

    def __init__(self, name: str, local: Path | None = None, hub: tuple[str, str, str | None] | None = None):
        self.name, self._local, self._hub = name, local, hub
        self._handle = None  # safetensors: the safe_open handle
        self._members = None  # npz: {key: (shape, dtype, fortran order, data offset or None if compressed)}
        self._arrays = {}  # npz: {key: memory-mapped (or, compressed, loaded) array}

    @classmethod
    def local(cls, path: Path) -> _File:
        return cls(str(path), local=path)

    @classmethod
    def remote(cls, repo_id: str, path: str, revision: str | None) -> _File:
        return cls(_uri(repo_id, path, revision), hub=(repo_id, path, revision))

    @property
    def is_local(self) -> bool:
        return self._local is not None

    @property
    def is_npz(self) -> bool:
        return self.name.endswith(".npz")

    def path(self) -> Path:
        if self._local is None:
            self._local = Path(_download(*self._hub))
        if not self._local.is_file():
            raise FileNotFoundError(f"{self.name}: file not found")
        return self._local

    def keys(self) -> set[str]:
        return set(self._npz_members()) if self.is_npz else set(self._safetensors().keys())

    def shape(self, key: str) -> list[int]:
        return list(self._npz_members()[key][0]) if self.is_npz else self._safetensors().get_slice(key).get_shape()

    def read(self, key: str, rows: slice, transposed: bool = False) -> torch.Tensor:
        """Rows `rows` of tensor `key` (of its transpose: stored [d_model, F], read [F, d_model]), as stored."""
        if not self.is_npz:
            return self._safetensors().get_slice(key)[rows]
        array = self._npz_array(key)
        return torch.from_numpy(np.array(array[:, rows].T if transposed else array[rows]))  # a copy, never the map

    def _safetensors(self):
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path()), framework="pt")
            except SafetensorError as e:
                raise ValueError(f"{self.name}: not a readable safetensors file ({e})") from None
        return self._handle

    def _npz_members(self) -> dict:
        if self._members is None:
            try:
                self._members = _npz_members(self.path())
            except (zipfile.BadZipFile, ValueError, OSError) as e:
                raise ValueError(f"{self.name}: not a readable .npz file ({_first_line(e)})") from None
        return self._members

    def _npz_array(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            shape, dtype, fortran, offset = self._npz_members()[key]
            if offset is None:  # compressed (np.savez_compressed): no way around loading the member
                with np.load(self.path()) as z:
                    self._arrays[key] = z[key]
            else:
                self._arrays[key] = np.memmap(self.path(), dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                                              order="F" if fortran else "C")
        return self._arrays[key]


def _npz_members(path: Path) -> dict:
    """{array name: (shape, dtype, fortran order, offset of its data in the file or None)} of an .npz, from the
    headers only. np.savez stores members uncompressed, so a member's data sits in the file at: its zip local
    header (30 bytes + file name + extra field) + its .npy header."""
    members = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                npy_header = f.tell()
            offset = None
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset + 26)
                name_length, extra_length = struct.unpack("<HH", raw.read(4))
                offset = info.header_offset + 30 + name_length + extra_length + npy_header
            members[info.filename[: -len(".npy")]] = (list(shape), dtype, fortran, offset)
    return members


@dataclass
class _Tensor:
    """One tensor of a file; `transposed`: stored [d_model, F] (Gemma Scope's W_enc), read as [F, d_model]."""

    file: _File
    key: str
    transposed: bool = False

    def exists(self) -> bool:
        return self.key in self.file.keys()

    @property
    def shape(self) -> list[int]:
        shape = self.file.shape(self.key)
        return shape[::-1] if self.transposed else shape

    def read(self, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        return self.file.read(self.key, slice(lo, hi), self.transposed)

    def expect(self, shape: list[int]) -> _Tensor:
        """Self, once it is found with `shape`; else a one-line error naming the file."""
        stored = shape[::-1] if self.transposed else list(shape)
        if not self.exists():
            raise ValueError(f"{self.file.name}: missing tensor {self.key!r} (expected shape {stored})")
        got = self.file.shape(self.key)
        if got != stored:
            raise ValueError(f"{self.file.name}: tensor {self.key!r} has shape {got}, expected {stored}")
        return self

    def hash_into(self, digest) -> None:
        """Its stored bytes (and name, shape, dtype) into `digest`, a chunk of rows at a time."""
        shape = self.file.shape(self.key)
        first = self.file.read(self.key, slice(0, 1))
        digest.update(f"{self.key}:{shape}:{first.dtype}".encode())
        rows = max(1, HASH_CHUNK_BYTES // max(1, first.numel() * first.element_size()))
        for lo in range(0, shape[0] if shape else 1, rows):
            digest.update(self.file.read(self.key, slice(lo, lo + rows)).contiguous().view(torch.uint8).numpy())


@dataclass
class _Layer:
    """Where one layer's tensors are (None: the layout has no such tensor)."""

    W_enc: _Tensor
    b_enc: _Tensor
    threshold: _Tensor | None
    b_dec: _Tensor
    W_dec: _Tensor
    W_skip: _Tensor | None


def _clt_layer(enc: _File, dec: _File, layer: int) -> _Layer:
    W, b, b_dec, threshold = _enc_names(CLT, layer)
    return _Layer(_Tensor(enc, W), _Tensor(enc, b), _Tensor(enc, threshold), _Tensor(enc, b_dec),
                  _Tensor(dec, _dec_name(CLT, layer)), _Tensor(enc, _skip_name(CLT, layer)))


def _set_layer(file: _File) -> _Layer:
    """A per-layer file: circuit-tracer's safetensors keys, or a Gemma Scope params.npz."""
    if file.is_npz:
        return _Layer(_Tensor(file, "W_enc", transposed=True), _Tensor(file, "b_enc"), _Tensor(file, "threshold"),
                      _Tensor(file, "b_dec"), _Tensor(file, "W_dec"), None)
    W, b, b_dec, threshold = _enc_names(SET, 0)
    return _Layer(_Tensor(file, W), _Tensor(file, b), _Tensor(file, threshold), _Tensor(file, b_dec),
                  _Tensor(file, _dec_name(SET, 0)), _Tensor(file, _skip_name(SET, 0)))


def _sparsify_layer(file: _File) -> _Layer:
    return _Layer(_Tensor(file, "encoder.weight"), _Tensor(file, "encoder.bias"), None, _Tensor(file, "b_dec"),
                  _Tensor(file, "W_dec"), _Tensor(file, "W_skip"))


# ------------------------------------------------------------------------------------------ the transcoder


class TranscoderFiles:
    """One transcoder's files: its config, and its tensors read on demand. Encoders are what measuring and
    dreaming read; decoders (and W_skip) only `decoder_rows` and `load`."""

    def __init__(self, reference: str, layout: str, layers: list[_Layer], meta: dict, where: str):
        self.reference, self.layout, self._layers, self._where = reference, layout, layers, where
        self.config = _config(layers, meta, where)
        self._checked = set()  # layers whose encoder tensors were found with the right shapes
        for layer, files in enumerate(layers):
            if files.W_enc.file.is_local:  # reading headers costs nothing here; hub files are checked when fetched
                self._layer(layer)

    def __repr__(self) -> str:
        c = self.config
        return (f"TranscoderFiles({self.reference!r}, {self.layout}, {c.n_layers} layers x {c.d_transcoder} "
                f"features, {c.activation})")

    def _layer(self, layer) -> _Layer:
        """The layer's tensors, its encoder's found with the right shapes (checked once)."""
        c = self.config
        layer = check_layer(layer, c.n_layers)
        files = self._layers[layer]
        if layer not in self._checked:
            files.W_enc.expect([c.d_transcoder, c.d_model])
            files.b_enc.expect([c.d_transcoder])
            if c.activation == "jumprelu":
                files.threshold.expect([c.d_transcoder])
            self._checked.add(layer)
        return files

    def encoder_rows(self, layer, indices, dtype=torch.float32, device="cpu"):
        """(W [n, d_model], b [n], threshold [n] or None) of features `indices` (any order, repeats ok), reading
        only their rows."""
        files = self._layer(layer)
        index = check_indices(indices, self.config.d_transcoder, layer)
        unique = sorted(set(index))
        runs, start = [], unique[0]  # consecutive indices read as one slice
        for a, b in zip(unique, unique[1:] + [None]):
            if b != a + 1:
                runs.append((start, a + 1))
                start = b
        where = {u: i for i, u in enumerate(unique)}
        order = torch.tensor([where[i] for i in index])

        def read(tensor):
            return torch.cat([tensor.read(lo, hi) for lo, hi in runs])[order].to(device=device, dtype=dtype)

        threshold = read(files.threshold) if self.config.activation == "jumprelu" else None
        return read(files.W_enc), read(files.b_enc), threshold

    def encoder(self, layer, dtype=torch.float32, device="cpu"):
        """(W [F, d_model], b [F], threshold [F] or None): every feature of one layer, encoder only."""
        files = self._layer(layer)
        threshold = files.threshold.read() if self.config.activation == "jumprelu" else None
        return tuple(t.to(device=device, dtype=dtype) if t is not None else None
                     for t in (files.W_enc.read(), files.b_enc.read(), threshold))

    def decoder_rows(self, layer, lo: int, hi: int) -> torch.Tensor:
        """The decoders of features lo..hi-1 of `layer` in fp32: [rows, output layers, d_model], output layers
        layer..n_layers - 1 for a CLT, just `layer` for a set."""
        c = self.config
        layer = check_layer(layer, c.n_layers)
        outputs = c.n_layers - layer if c.kind == CLT else 1
        shape = [c.d_transcoder, outputs, c.d_model] if c.kind == CLT else [c.d_transcoder, c.d_model]
        return self._layers[layer].W_dec.expect(shape).read(lo, hi).float().view(-1, outputs, c.d_model)

    def load(self, dtype=torch.float32, device="cpu") -> Transcoder:
        """Everything, decoders and W_skip included, as one module (for training and evaluation)."""
        c = self.config
        F, d = c.d_transcoder, c.d_model
        for files in self._layers:  # every decoder file there (fetched) before any work
            files.W_dec.file.path()
        t = Transcoder(c, dtype=dtype, device=device)
        with torch.no_grad():
            for layer in range(c.n_layers):
                W, b, threshold = self.encoder(layer, dtype, device)
                t.W_enc[layer].copy_(W)
                t.b_enc[layer].copy_(b)
                if threshold is not None:
                    t.threshold[layer].copy_(threshold)
                files = self._layers[layer]
                t.b_dec[layer].copy_(files.b_dec.expect([d]).read())
                decoder = self.decoder_rows(layer, 0, F)  # [F, output layers, d_model]
                t.W_dec[layer].copy_(decoder if c.kind == CLT else decoder[:, 0])
                if c.skip_connection:
                    t.W_skip[layer].copy_(files.W_skip.expect([d, d]).read())
        return t.requires_grad_(False)  # loaded for inference; training builds its own parameters

    def identity(self, model_name: str) -> str:
        """16 hex chars: a hash of the model name, the config and the bytes of every encoder tensor (W_enc, b_enc,
        threshold: all a feature's activation depends on; never the decoders)."""
        digest = hashlib.sha256(json.dumps([model_name, asdict(self.config)], sort_keys=True).encode())
        for layer in range(self.config.n_layers):
            files = self._layer(layer)
            for tensor in (files.W_enc, files.b_enc, files.threshold if self.config.activation == "jumprelu" else None):
                if tensor is not None:
                    tensor.hash_into(digest)
        return digest.hexdigest()[:16]


def check_layer(layer, n_layers: int) -> int:
    try:
        layer = operator.index(layer)
    except TypeError:
        raise ValueError(f"layer must be an integer, got {layer!r}") from None
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: valid layers are 0..{n_layers - 1}")
    return layer


def check_indices(indices, n_features: int, layer: int) -> list[int]:
    index = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
    bad = [i for i in index if not 0 <= i < n_features]
    if bad:
        raise ValueError(f"feature index {bad[0]} out of range for layer {layer}: valid indices are "
                         f"0..{n_features - 1}")
    if not index:
        raise ValueError("needs at least one feature index")
    return index


def _config(layers: list[_Layer], meta: dict, where: str) -> TranscoderConfig:
    """The config: sizes from layer 0's encoder, kind / hooks / activation / k / model name from `meta` (what the
    layout's config file says), the activation otherwise from the tensors (a threshold: jumprelu, else relu)."""
    from dreaming.models import canonical_hook  # (imports transformers) only once a transcoder is opened

    first = layers[0]
    if not first.W_enc.exists():
        raise ValueError(f"{first.W_enc.file.name}: missing tensor {first.W_enc.key!r} (the encoder, "
                         f"[d_transcoder, d_model])")
    shape = first.W_enc.shape
    if len(shape) != 2:
        raise ValueError(f"{first.W_enc.file.name}: {first.W_enc.key} should be [d_transcoder, d_model], got {shape}")
    for name, size in (("d_transcoder", shape[0]), ("d_model", shape[1])):  # sparsify's cfg.json says them too
        if meta.get(name, size) != size:
            raise ValueError(f"{where}: {name} {meta[name]}, but {first.W_enc.file.name} holds {size}")

    def has(tensor):
        return tensor is not None and tensor.exists()

    fields = {
        "kind": meta.get("kind"),
        "activation": meta.get("activation") or ("jumprelu" if has(first.threshold) else "relu"),
        "k": meta.get("k"),
        "feature_input_hook": meta.get("feature_input_hook") or "mlp.hook_in",
        "feature_output_hook": meta.get("feature_output_hook") or "mlp.hook_out",
        "model_name": meta.get("model_name"),
    }
    fields["skip_connection"] = meta.get("skip_connection", has(first.W_skip))
    try:
        for hook in (fields["feature_input_hook"], fields["feature_output_hook"]):
            canonical_hook(hook)
        config = TranscoderConfig(n_layers=len(layers), d_model=shape[1], d_transcoder=shape[0], **fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config


def check_against_model(files: TranscoderFiles, lm) -> list[str]:
    """Raise a one-line ValueError unless `files` fit `lm` (a LanguageModel): one layer per model layer, its
    d_model, hooks the architecture has. Returns warnings: a config made for another model name (base-model
    transcoders on instruct models are common)."""
    c, encoder = files.config, files._layers[0].W_enc.file.name
    if c.d_model != lm.d_model:
        raise ValueError(f"{encoder}: d_model {c.d_model}, expected {lm.d_model} (the hidden size of {lm.name})")
    if c.n_layers != lm.n_layers:
        raise ValueError(f"{files.reference}: {c.n_layers} layers, expected {lm.n_layers} (one per layer of "
                         f"{lm.name})")
    for hook in (c.feature_input_hook, c.feature_output_hook):
        try:
            lm.hook_module(hook, 0)
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{files._where}: hook {hook!r} not found in {lm.name} "
                             f"({lm.model.config.model_type}): {e}") from None
    if c.model_name and c.model_name.split("/")[-1].lower() != lm.name.split("/")[-1].lower():
        return [f"{files._where}: made for {c.model_name!r}, used with {lm.name!r}"]
    return []


# ------------------------------------------------------------------------------------------- resolution


def open_transcoder(reference: str | os.PathLike) -> TranscoderFiles:
    """Resolve a reference (see the module docstring) to its files; reads headers and config files only (a hub
    transcoder: its config and its encoders' files)."""
    text = os.fspath(reference)
    if text.startswith("hf://"):
        return _open_hub(text, *_parse_hub(text))
    path = Path(text).expanduser()
    if path.exists():
        return _open_local(path.resolve())
    if text in LEGACY:
        return _open_hub(text, *_parse_hub(LEGACY[text]))
    if "/" in text and not text.startswith(("/", ".", "~")):
        return _open_hub(text, *_parse_hub(text))
    raise FileNotFoundError(f"transcoder {text} does not exist (neither a local path nor hf://owner/repo)")


def _parse_hub(text: str) -> tuple[str, str, str | None]:
    """(repo id, path in the repo or '', revision) of hf://owner/repo[/path][@revision] (or ?revision=, as
    circuit-tracer writes per-layer URIs), or of owner/repo[/path][@revision]."""
    body, _, query = text.removeprefix("hf://").partition("?")
    revision = parse_qs(query).get("revision", [None])[0]
    if "@" in body:
        body, revision = body.split("@", 1)
    parts = [part for part in body.split("/") if part]
    if len(parts) < 2:
        raise ValueError(f"{text}: expected hf://owner/repo[/path][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def _read_yaml(path: Path, name: str) -> dict:
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{name}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: expected a mapping (model_kind, feature_input_hook, ...), got {type(meta).__name__}")
    return meta


def _yaml_meta(meta: dict) -> dict:
    """The config fields a circuit-tracer config.yaml gives."""
    names = ("activation", "k", "feature_input_hook", "feature_output_hook", "model_name")
    return {"kind": meta.get("model_kind"), **{name: meta.get(name) for name in names}}


def _open_local(path: Path) -> TranscoderFiles:
    if path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"{path}: expected a transcoder directory or a config.yaml")
        return _open_list(str(path), path, _read_yaml(path, str(path)))
    config = path / "config.yaml"
    meta = _read_yaml(config, str(config)) if config.exists() else {}
    if "transcoders" in meta:
        return _open_list(str(path), config, meta)
    kind = meta.get("model_kind")
    if kind is None and (path / _enc_file(CLT, 0)).exists():
        kind = CLT
    elif kind is None and (path / _enc_file(SET, 0)).exists():
        kind = SET
    if kind is not None:
        where = str(config) if config.exists() else str(path)
        layers = _directory_layers(path, kind, lambda name: _File.local(path / name))
        return TranscoderFiles(str(path), _LAYOUT[kind], layers, {**_yaml_meta(meta), "kind": kind}, where)
    if any(path.glob("*/cfg.json")):
        return _open_sparsify(str(path), path, lambda folder: _File.local(path / folder / "sae.safetensors"))
    if (path / "cfg.json").exists():
        raise ValueError(f"{path}: one sparsify hookpoint folder; give the folder that holds every layer's")
    raise FileNotFoundError(f"{path}: no transcoder found; expected W_enc_0.safetensors (cross-layer transcoder), "
                            f"layer_0.safetensors (per-layer transcoder set), a config.yaml with a transcoders: list, "
                            f"or sparsify hookpoint folders (layers.0.mlp/cfg.json)")


_LAYOUT = {CLT: "circuit-tracer-clt", SET: "circuit-tracer-set"}


def _directory_layers(folder: Path, kind: str, file) -> list[_Layer]:
    """The layers of a circuit-tracer directory; `file(name)` makes the _File of a file of it."""
    pattern = re.compile(r"W_enc_(\d+)\.safetensors" if kind == CLT else r"layer_(\d+)\.safetensors")
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    found = {int(m.group(1)) for name in names if (m := pattern.fullmatch(name))}
    n = max(found, default=-1) + 1
    missing = sorted(set(range(n)) - found)
    if n == 0 or missing:
        raise FileNotFoundError(f"{folder}: a {kind} needs {_enc_file(kind, 'L')} for every layer L = 0..n-1; "
                                f"missing layers {missing or [0]}")
    if kind == CLT:
        return [_clt_layer(file(_enc_file(CLT, l)), file(_dec_file(CLT, l)), l) for l in range(n)]
    return [_set_layer(file(_enc_file(SET, l))) for l in range(n)]


def _open_list(reference: str, config: Path, meta: dict, hub: tuple[str, str, str | None] | None = None
               ) -> TranscoderFiles:
    """A config.yaml whose `transcoders:` lists one file per layer; `hub` (repo, folder of the yaml, revision)
    when the yaml came from a hub repo (its relative entries are files of that repo)."""
    where = _uri(hub[0], f"{hub[1]}/config.yaml" if hub[1] else "config.yaml", hub[2]) if hub else str(config)
    entries = meta.get("transcoders")
    if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
        raise ValueError(f"{where}: transcoders: should list one file per layer (paths or hf:// URIs)")
    if meta.get("model_kind", SET) != SET:
        raise ValueError(f"{where}: a {meta['model_kind']} with a transcoders: list (Gemma Scope 2's layout) is not "
                         f"supported; expected model_kind: {SET}")
    files = []
    for layer, entry in enumerate(entries):
        if entry.startswith("hf://"):
            files.append(_File.remote(*_parse_hub(entry)))
        elif hub is not None and not Path(entry).is_absolute():
            repo_id, folder, revision = hub
            files.append(_File.remote(repo_id, f"{folder}/{entry}" if folder else entry, revision))
        else:
            path = config.parent / Path(entry).expanduser()  # an absolute entry stays itself
            if not path.is_file():
                raise FileNotFoundError(f"{where}: layer {layer}'s file {path} does not exist")
            files.append(_File.local(path.resolve()))
    layout = "gemma-scope" if files[0].is_npz else "circuit-tracer-set"
    return TranscoderFiles(reference, layout, [_set_layer(f) for f in files], {**_yaml_meta(meta), "kind": SET}, where)


def open_layer_files(paths: list, meta: dict | None = None) -> TranscoderFiles:
    """Per-layer files in layer order (circuit-tracer safetensors or Gemma Scope params.npz), as a config.yaml's
    `transcoders:` list names them; `meta`: the config.yaml's other fields (model_kind, hooks, ...)."""
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    return _open_list(paths[0] if len(paths) == 1 else f"[{paths[0]}, ...]", Path(paths[0]),
                      {**(meta or {}), "transcoders": paths})


def _open_sparsify(reference: str, root: Path, sae_file, where_root: str | None = None) -> TranscoderFiles:
    """EleutherAI sparsify: one folder per hookpoint under `root`, each with cfg.json (and sae.safetensors, the
    _File `sae_file(folder name)`)."""
    by_layer, first = {}, None
    for cfg_path in sorted(root.glob("*/cfg.json")):
        name, shown = cfg_path.parent.name, f"{where_root}/{cfg_path.parent.name}/cfg.json" if where_root else cfg_path
        try:
            cfg = json.loads(cfg_path.read_text())
            d_in, latents = cfg["d_in"], cfg.get("num_latents") or cfg.get("expansion_factor", 32) * cfg["d_in"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{shown}: expected a sparsify cfg.json with d_in, num_latents or expansion_factor, k "
                             f"({_first_line(e)})") from None
        if not cfg.get("transcode", False):
            raise ValueError(f"{shown}: transcode is false: a sparse autoencoder, not a transcoder")
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{shown}: unknown activation {cfg['activation']!r}; expected 'topk'")
        match = SPARSIFY_HOOKPOINT.fullmatch(name)
        if match is None:
            raise ValueError(f"{shown}: unknown hookpoint {name!r}; expected one MLP hookpoint folder per layer "
                             f"(layers.L.mlp, model.layers.L.mlp or h.L.mlp)")
        sizes = {"d_model": d_in, "d_transcoder": latents, "k": cfg.get("k", 32),
                 "skip_connection": bool(cfg.get("skip_connection", False))}
        if first is not None and sizes != first[1]:
            raise ValueError(f"{shown}: {sizes}, but {first[0]} has {first[1]} (every layer needs the same)")
        first = first or (shown, sizes)
        by_layer[int(match.group(1))] = _sparsify_layer(sae_file(name))
    n = max(by_layer) + 1
    missing = sorted(set(range(n)) - set(by_layer))
    if missing:
        raise FileNotFoundError(f"{where_root or root}: sparsify hookpoint folders for every layer 0..{n - 1} "
                                f"needed; missing layers {missing}")
    run = root / "config.json"  # the training run's config names the model
    model_name = json.loads(run.read_text()).get("model") if run.exists() else None
    meta = {"kind": SET, "activation": "topk", "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out", "model_name": model_name, **first[1]}
    return TranscoderFiles(reference, "sparsify", [by_layer[l] for l in range(n)], meta, str(first[0]))


def _open_hub(reference: str, repo_id: str, folder: str, revision: str | None) -> TranscoderFiles:
    """A hub repo (or a folder of it): circuit-tracer's config.yaml, else sparsify hookpoint folders."""
    prefix = f"{folder}/" if folder else ""
    hub = (repo_id, folder, revision)
    try:
        config = Path(_download(repo_id, prefix + "config.yaml", revision))
    except FileNotFoundError:
        root = _snapshot(repo_id, folder, revision, ["*/cfg.json", "config.json"])
        if not any(root.glob("*/cfg.json")):
            raise FileNotFoundError(f"{_uri(*hub)}: neither a config.yaml (circuit-tracer) nor hookpoint folders "
                                    f"with cfg.json (sparsify) found, on the hub or in its local cache") from None
        return _open_sparsify(reference, root, lambda name: _File.remote(repo_id, f"{prefix}{name}/sae.safetensors",
                                                                       revision), _uri(*hub))
    where = _uri(repo_id, prefix + "config.yaml", revision)
    meta = _read_yaml(config, where)
    if "transcoders" in meta:
        return _open_list(reference, config, meta, hub)
    kind = meta.get("model_kind")
    if kind not in _LAYOUT:
        raise ValueError(f"{where}: unknown model_kind {kind!r}; expected one of {tuple(_LAYOUT)}")
    # a CLT's encoders now (measuring needs them all), its decoders when asked; a set's files hold both
    local = _snapshot(repo_id, folder, revision, ["W_enc_*.safetensors" if kind == CLT else "layer_*.safetensors"])

    def file(name):
        return _File.local(local / name) if (local / name).exists() else _File.remote(repo_id, prefix + name, revision)

    return TranscoderFiles(reference, _LAYOUT[kind], _directory_layers(local, kind, file), _yaml_meta(meta), where)


# ---------------------------------------------------------------------------------- readers of any reference


def load_transcoder(reference, dtype=torch.float32, device="cpu") -> Transcoder:
    """Load a transcoder whole, decoders included (any reference `open_transcoder` takes: a circuit-tracer
    directory, config.yaml, hf:// repo, sparsify folders ...)."""
    return open_transcoder(reference).load(dtype, device)


def read_config(reference) -> TranscoderConfig:
    """The config of a transcoder (any reference `open_transcoder` takes), from its config file and headers."""
    return open_transcoder(reference).config


def load_gemma_scope(
    npz_paths,
    feature_input_hook="mlp.hook_in",
    feature_output_hook="mlp.hook_out",
    model_name=None,
    dtype=torch.float32,
    device="cpu",
) -> Transcoder:
    """A JumpReLU per-layer set from Gemma Scope params.npz files: {layer: path} or a list in layer order."""
    paths = dict(npz_paths) if isinstance(npz_paths, dict) else dict(enumerate(npz_paths))
    n = len(paths)
    if n == 0 or sorted(paths) != list(range(n)):
        raise ValueError(f"Gemma Scope transcoders needed for layers 0..{n - 1}, got layers {sorted(paths)}")
    meta = {"feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook,
            "model_name": model_name}
    return open_layer_files([paths[l] for l in range(n)], meta).load(dtype, device)


class LazyEncoder:
    """A transcoder's encoders read from its files on demand (any reference `open_transcoder` takes, or an open
    TranscoderFiles): the rows of chosen features (one row costs one row), or a whole layer's encoder (a topk
    feature depends on every feature of its layer; `encode` with no indices gives them all). Whole layers stay
    resident while those read so far fit `cache_bytes`; beyond, a layer is read again on each use, so memory stays
    bounded whatever the transcoder's size. Decoders are never read."""

    def __init__(self, transcoder, dtype=torch.float32, device="cpu", cache_bytes: int = ENCODER_CACHE_BYTES):
        self.files = transcoder if isinstance(transcoder, TranscoderFiles) else open_transcoder(transcoder)
        self.config = self.files.config
        self.dtype, self.device, self.cache_bytes = dtype, device, cache_bytes
        self.resident = {}  # layer -> (W [F, d_model], b [F], threshold [F] or None)

    def rows(self, layer, indices):
        """(W [n, d_model], b [n], threshold [n] or None) for features `indices` (any order, repeats ok)."""
        return self.files.encoder_rows(layer, indices, self.dtype, self.device)

    def encoder(self, layer):
        """(W [F, d_model], b [F], threshold [F] or None): every feature of `layer`, kept if it fits the budget."""
        layer = check_layer(layer, self.config.n_layers)
        if layer in self.resident:
            return self.resident[layer]
        weights = self.files.encoder(layer, self.dtype, self.device)
        held = sum(t.numel() * t.element_size() for w in self.resident.values() for t in w if t is not None)
        if held + sum(t.numel() * t.element_size() for t in weights if t is not None) <= self.cache_bytes:
            self.resident[layer] = weights
        return weights

    def encode(self, x, layer, indices=None):
        """x [..., d_model] -> activations [..., F] of every feature of `layer`, or [..., n] of just `indices`
        (their rows only, but for topk: the whole layer, to know the top k)."""
        c = self.config
        x = x.to(device=self.device, dtype=self.dtype)
        if indices is None or c.activation == "topk":
            W, b, threshold = self.encoder(layer)
            acts = activate(x @ W.T + b, c.activation, threshold, c.k)  # [..., F]
            if indices is None:
                return acts
            return acts[..., torch.tensor(check_indices(indices, c.d_transcoder, layer), device=acts.device)]
        W, b, threshold = self.rows(layer, indices)
        return activate(x @ W.T + b, c.activation, threshold)  # [..., n]
