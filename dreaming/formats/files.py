"""A dictionary's files, whatever the layout: where each layer's tensors are, read lazily (a few rows, one layer's
encoder, or everything), never converted or copied. The layouts (dreaming/formats/*.py) say where; this reads.

Owns:
  File, StoredTensor    one local or hub file (safetensors or .npz) and one tensor of it, read by rows
  LayerTensors          where one layer's tensors are
  TranscoderFiles       the config; encoder rows, one layer's encoder, decoder rows, everything; identity
  open_layer_folders    a dictionary kept as one folder per layer (SAELens, Gemma Scope 2)
  check_against_model   the dictionary fits a model (layers, d_model, hooks), before any long work

Every layer's tensors, as read whatever the layout stores (F features per layer):
  W_enc [F, d_model], b_enc [F], threshold [F] (jumprelu), b_dec [d_model], W_skip [d_model, d_model] (x @ W_skip.T),
  W_dec [F, d_model], or [F, n_layers - layer, d_model] for a CLT; input_bias [d_model] where the layout subtracts
  one from the input before encoding (SAELens's apply_b_dec_to_input), folded into b_enc when read
A dictionary may hold some layers only (an SAE for one hook point): feature ids name the model's layers, and a
layer it lacks is a one-line error. Every problem is one line naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import operator
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

from dreaming.transcoders import CLT, Transcoder, TranscoderConfig

HASH_CHUNK_BYTES = 1 << 26  # identity() reads tensors this much at a time


# ------------------------------------------------------------------------------------------------- files


def download(repo_id: str, filename: str, revision: str | None) -> str:
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception as e:  # not on the hub nor in the cache, offline, gated, no network: all one answer
        raise FileNotFoundError(f"{hub_uri(repo_id, filename, revision)}: not found on the Hugging Face hub nor in "
                                f"its local cache ({first_line(e)})") from None


def snapshot(repo_id: str, subfolder: str, revision: str | None, patterns: list[str]) -> Path:
    """The local folder of `subfolder` of a hub repo, holding (at least) the files matching `patterns`."""
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + p for p in patterns])
    except Exception as e:
        raise FileNotFoundError(f"{hub_uri(repo_id, subfolder, revision)}: not found on the Hugging Face hub nor in "
                                f"its local cache ({first_line(e)})") from None
    return Path(folder) / subfolder


def hub_uri(repo_id: str, path: str, revision: str | None) -> str:
    return f"hf://{repo_id}" + (f"/{path}" if path else "") + (f"@{revision}" if revision else "")


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def parse_hub(text: str) -> tuple[str, str, str | None]:
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


def read_yaml(path: Path, name: str) -> dict:
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{name}: not valid YAML ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: expected a mapping (model_kind, feature_input_hook, ...), got {type(meta).__name__}")
    return meta


class File:
    """One file of a transcoder, opened on first use: a local path, or a hub file (repo, path, revision) fetched
    then. `name` (the path or the hf:// URI) is what errors call it."""

    def __init__(self, name: str, local: Path | None = None, hub: tuple[str, str, str | None] | None = None):
        self.name, self._local, self._hub = name, local, hub
        self._handle = None  # safetensors: the safe_open handle
        self._members = None  # npz: {key: (shape, dtype, fortran order, data offset or None if compressed)}
        self._arrays = {}  # npz: {key: memory-mapped (or, compressed, loaded) array}

    @classmethod
    def local(cls, path: Path) -> File:
        return cls(str(path), local=path)

    @classmethod
    def remote(cls, repo_id: str, path: str, revision: str | None) -> File:
        return cls(hub_uri(repo_id, path, revision), hub=(repo_id, path, revision))

    @property
    def is_local(self) -> bool:
        return self._local is not None

    @property
    def is_npz(self) -> bool:
        return self.name.endswith(".npz")

    def path(self) -> Path:
        if self._local is None:
            self._local = Path(download(*self._hub))
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
            stored = self._safetensors().get_slice(key)
            return stored[:, rows].T.contiguous() if transposed else stored[rows]
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
                self._members = npz_members(self.path())
            except (zipfile.BadZipFile, ValueError, OSError) as e:
                raise ValueError(f"{self.name}: not a readable .npz file ({first_line(e)})") from None
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


def npz_members(path: Path) -> dict:
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
class StoredTensor:
    """One tensor of a file; `transposed`: stored [d_model, F] (Gemma Scope's W_enc), read as [F, d_model];
    `outputs_from`: a CLT decoder stored [F, n_layers, d_model] with every output layer (Gemma Scope 2's, zero before
    its own), read from output layer `outputs_from` on: [F, n_layers - outputs_from, d_model], as the circuit-tracer
    layout keeps it."""

    file: File
    key: str
    transposed: bool = False
    outputs_from: int = 0

    def exists(self) -> bool:
        return self.key in self.file.keys()

    @property
    def shape(self) -> list[int]:
        shape = self.file.shape(self.key)
        if self.outputs_from:
            shape = [shape[0], shape[1] - self.outputs_from, *shape[2:]]
        return shape[::-1] if self.transposed else shape

    def read(self, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        rows = self.file.read(self.key, slice(lo, hi), self.transposed)
        return rows[:, self.outputs_from :] if self.outputs_from else rows

    def expect(self, shape: list[int]) -> StoredTensor:
        """Self, once it is found with `shape`; else a one-line error naming the file."""
        stored = shape[::-1] if self.transposed else list(shape)
        if self.outputs_from:
            stored = [stored[0], stored[1] + self.outputs_from, *stored[2:]]
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
class LayerTensors:
    """Where one layer's tensors are (None: the layout has no such tensor)."""

    W_enc: StoredTensor
    b_enc: StoredTensor
    threshold: StoredTensor | None
    b_dec: StoredTensor
    W_dec: StoredTensor
    W_skip: StoredTensor | None
    input_bias: StoredTensor | None = None  # subtracted from the input before encoding (folded into b_enc)


# ------------------------------------------------------------------------------------------ the transcoder


class TranscoderFiles:
    """One dictionary's files: its config, and its tensors read on demand. Encoders are what measuring and
    dreaming read; decoders (and W_skip) only `decoder_rows` and `load`. `layers`: {model layer: its tensors}, every
    layer 0..n-1 or some of them (a per-layer set)."""

    def __init__(self, reference: str, layout: str, layers: dict[int, LayerTensors], meta: dict, where: str):
        self.reference, self.layout, self._layers, self._where = reference, layout, dict(sorted(layers.items())), where
        self.config = _config(self._layers, meta, where)
        self._checked = set()  # layers whose encoder tensors were found with the right shapes
        for layer, files in self._layers.items():
            if files.W_enc.file.is_local:  # reading headers costs nothing here; hub files are checked when fetched
                self._layer(layer)

    def __repr__(self) -> str:
        c = self.config
        return (f"TranscoderFiles({self.reference!r}, {self.layout}, layers {layer_span(c.layer_ids)} x "
                f"{c.d_transcoder} features, {c.activation})")

    @property
    def where(self) -> str:
        """The file that configures it (what errors about its config name)."""
        return self._where

    def _layer(self, layer) -> LayerTensors:
        """The layer's tensors, its encoder's found with the right shapes (checked once)."""
        c = self.config
        layer = check_layer(layer, c.layer_ids)
        files = self._layers[layer]
        if layer not in self._checked:
            files.W_enc.expect([c.d_transcoder, c.d_model])
            files.b_enc.expect([c.d_transcoder])
            if c.activation == "jumprelu":
                files.threshold.expect([c.d_transcoder])
            if files.input_bias is not None:
                files.input_bias.expect([c.d_model])
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
            return torch.cat([tensor.read(lo, hi) for lo, hi in runs])[order]

        W = read(files.W_enc)
        b = _folded(read(files.b_enc), W, files.input_bias)
        threshold = read(files.threshold) if self.config.activation == "jumprelu" else None
        return tuple(t.to(device=device, dtype=dtype) if t is not None else None for t in (W, b, threshold))

    def encoder(self, layer, dtype=torch.float32, device="cpu"):
        """(W [F, d_model], b [F], threshold [F] or None): every feature of one layer, encoder only."""
        files = self._layer(layer)
        W = files.W_enc.read()
        b = _folded(files.b_enc.read(), W, files.input_bias)
        threshold = files.threshold.read() if self.config.activation == "jumprelu" else None
        return tuple(t.to(device=device, dtype=dtype) if t is not None else None for t in (W, b, threshold))

    @property
    def has_decoders(self) -> bool:
        """Whether its files hold decoders (a model's neurons have none: `similar` and output tokens need them)."""
        return next(iter(self._layers.values())).W_dec.exists()

    def decoder_rows(self, layer, lo: int, hi: int) -> torch.Tensor:
        """The decoders of features lo..hi-1 of `layer` in fp32: [rows, output layers, d_model], output layers
        layer..n_layers - 1 for a CLT, just `layer` for a set."""
        c = self.config
        layer = check_layer(layer, c.layer_ids)
        outputs = c.n_layers - layer if c.kind == CLT else 1
        shape = [c.d_transcoder, outputs, c.d_model] if c.kind == CLT else [c.d_transcoder, c.d_model]
        return self._layers[layer].W_dec.expect(shape).read(lo, hi).float().view(-1, outputs, c.d_model)

    def load(self, dtype=torch.float32, device="cpu") -> Transcoder:
        """Everything, decoders and W_skip included, as one module (for training and evaluation); a layer the
        dictionary lacks stays zero."""
        c = self.config
        F, d = c.d_transcoder, c.d_model
        for files in self._layers.values():  # every decoder file there (fetched) before any work
            files.W_dec.file.path()
        t = Transcoder(c, dtype=dtype, device=device)
        with torch.no_grad():
            for layer, files in self._layers.items():
                W, b, threshold = self.encoder(layer, dtype, device)
                t.W_enc[layer].copy_(W)
                t.b_enc[layer].copy_(b)
                if threshold is not None:
                    t.threshold[layer].copy_(threshold)
                t.b_dec[layer].copy_(files.b_dec.expect([d]).read())
                decoder = self.decoder_rows(layer, 0, F)  # [F, output layers, d_model]
                t.W_dec[layer].copy_(decoder if c.kind == CLT else decoder[:, 0])
                if c.skip_connection:
                    t.W_skip[layer].copy_(files.W_skip.expect([d, d]).read())
        return t.requires_grad_(False)  # loaded for inference; training builds its own parameters

    def identity(self, model_name: str) -> str:
        """16 hex chars: a hash of the model name, the config and the bytes of every encoder tensor (W_enc, b_enc,
        threshold, input_bias: all a feature's activation depends on; never the decoders)."""
        digest = hashlib.sha256(json.dumps([model_name, asdict(self.config)], sort_keys=True).encode())
        for layer in self.config.layer_ids:
            files = self._layer(layer)
            jumprelu = self.config.activation == "jumprelu"
            for tensor in (files.W_enc, files.b_enc, files.threshold if jumprelu else None, files.input_bias):
                if tensor is not None:
                    tensor.hash_into(digest)
        return digest.hexdigest()[:16]


def open_layer_folders(path: Path, reference: str | None, layout: str, config_name: str, weights_name: str,
                       read_config, layer_tensors) -> TranscoderFiles | None:
    """A dictionary kept as one folder per layer (config_name + weights_name in each: SAELens, Gemma Scope 2): the
    folder `path` itself, or the folders in it; None when there are none. `read_config(path) -> (layer, meta)`,
    `layer_tensors(File, meta, layer) -> LayerTensors`; every folder must give the same meta (one kind, size and
    hook)."""
    def is_folder(folder: Path) -> bool:
        return (folder / config_name).is_file() and (folder / weights_name).is_file()

    folders = [path] if is_folder(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_folder(p))
    if not folders:
        return None
    by_layer, first = {}, None
    for folder in folders:
        layer, meta = read_config(folder / config_name)
        if first is not None and meta != first[1]:
            differ = {k: (v, first[1].get(k)) for k, v in meta.items() if first[1].get(k) != v}
            raise ValueError(f"{folder / config_name}: differs from {first[0]} in {differ} (one dictionary: the "
                             f"same kind, size and hook point on every layer)")
        if layer in by_layer:
            raise ValueError(f"{folder / config_name}: a second dictionary for layer {layer}")
        first = first or (folder / config_name, meta)
        by_layer[layer] = layer_tensors(File.local(folder / weights_name), meta, layer)
    return TranscoderFiles(reference or str(path), layout, by_layer, first[1], str(first[0]))


def _folded(b_enc: torch.Tensor, W_enc: torch.Tensor, input_bias: StoredTensor | None) -> torch.Tensor:
    """b_enc [n] with the input bias folded in: (x - input_bias) @ W.T + b = x @ W.T + (b - W @ input_bias), in
    fp64 (then as b_enc was stored, at least fp32)."""
    if input_bias is None:
        return b_enc
    folded = b_enc.double() - W_enc.double() @ input_bias.read().double()
    return folded.to(torch.promote_types(b_enc.dtype, torch.float32))


def layer_span(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0..2, 5": a dictionary's layers, as errors and listings show them."""
    runs, start = [], None
    for a, b in zip(layers, layers[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            runs.append(f"{start}..{a}" if a > start else f"{a}")
            start = None
    return ", ".join(runs)


def check_layer(layer, layers: list[int]) -> int:
    """`layer` itself if the dictionary has it (`layers`: the ones it has), else a one-line ValueError."""
    try:
        layer = operator.index(layer)
    except TypeError:
        raise ValueError(f"layer must be an integer, got {layer!r}") from None
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in this dictionary: its layers are {layer_span(layers)}")
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


def _config(layers: dict[int, LayerTensors], meta: dict, where: str) -> TranscoderConfig:
    """The config: sizes from the first layer's encoder, kind / hooks / activation / k / model name from `meta`
    (what the layout's config file says), the activation otherwise from the tensors (a threshold: jumprelu, else
    relu); `meta["n_layers"]` (the model's layers, when the layout says) else the last layer + 1."""
    from dreaming.models import canonical_hook  # (imports transformers) only once a transcoder is opened

    first = next(iter(layers.values()))
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

    present = list(layers)
    n_layers = meta.get("n_layers") or present[-1] + 1
    fields = {
        "kind": meta.get("kind"),
        "activation": meta.get("activation") or ("jumprelu" if has(first.threshold) else "relu"),
        "k": meta.get("k"),
        "feature_input_hook": meta.get("feature_input_hook") or "mlp.hook_in",
        "feature_output_hook": meta.get("feature_output_hook") or "mlp.hook_out",
        "model_name": meta.get("model_name"),
        "layers": None if present == list(range(n_layers)) else present,
    }
    fields["skip_connection"] = meta.get("skip_connection", has(first.W_skip))
    try:
        for hook in (fields["feature_input_hook"], fields["feature_output_hook"]):
            canonical_hook(hook)
        config = TranscoderConfig(n_layers=n_layers, d_model=shape[1], d_transcoder=shape[0], **fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config


def check_against_model(files: TranscoderFiles, lm) -> list[str]:
    """Raise a one-line ValueError unless `files` fit `lm` (a LanguageModel): a CLT has one layer per model layer, a
    per-layer set layers the model has; its d_model; hooks the architecture has. Returns warnings: a config made for
    another model name (base-model transcoders on instruct models are common), a set that covers some layers only."""
    c = files.config
    encoder = files._layers[c.layer_ids[0]].W_enc.file.name
    width = lm.hook_width(c.feature_input_hook)
    if c.d_model != width:
        raise ValueError(f"{encoder}: d_model {c.d_model}, expected {width} (the width of {lm.name}'s "
                         f"{c.feature_input_hook})")
    if c.kind == CLT and c.n_layers != lm.n_layers:
        raise ValueError(f"{files.reference}: {c.n_layers} layers, expected {lm.n_layers} (one per layer of "
                         f"{lm.name})")
    if c.n_layers > lm.n_layers:
        raise ValueError(f"{files.reference}: layers {layer_span(c.layer_ids)}, but {lm.name} has layers "
                         f"0..{lm.n_layers - 1}")
    for hook in (c.feature_input_hook, c.feature_output_hook):
        try:
            lm.hook_module(hook, c.layer_ids[0])
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{files.where}: hook {hook!r} not found in {lm.name} "
                             f"({lm.model.config.model_type}): {e}") from None
    warnings = []
    if c.model_name and c.model_name.split("/")[-1].lower() != lm.name.split("/")[-1].lower():
        warnings.append(f"{files.where}: made for {c.model_name!r}, used with {lm.name!r}")
    if len(c.layer_ids) < lm.n_layers:
        warnings.append(f"{files.reference}: layers {layer_span(c.layer_ids)} only, of {lm.name}'s "
                        f"0..{lm.n_layers - 1}: features of the others do not exist")
    return warnings
