"""Transcoders in the field's file formats, independent of any model.

Owns:
  TranscoderConfig / Transcoder  a cross-layer transcoder (CLT) or a per-layer transcoder set, one module
                                 for both: encode one layer, decode every layer's output
  save_transcoder / load_transcoder  the circuit-tracer directory layout (+ config.yaml), written atomically
  read_config                    a transcoder directory's config without loading its weights
  load_gemma_scope               a per-layer set from Gemma Scope params.npz files
  LazyEncoder                    the encoder rows of a few features, read from disk without loading the file
  decoder_rows                   the decoders of a range of features, read from disk without loading the file

On disk (see docs/reference.md, "Transcoders on disk"):
  CLT  W_enc_{l}.safetensors: W_enc_{l} [F, d_model], b_enc_{l} [F], b_dec_{l} [d_model], threshold_{l} [F]?
       W_dec_{l}.safetensors: W_dec_{l} [F, n_layers - l, d_model]   (slot j writes to layer l + j)
  set  layer_{l}.safetensors: W_enc [F, d_model], W_dec [F, d_model], b_enc [F], b_dec [d_model],
       activation_function.threshold [F]?, W_skip [d_model, d_model]?
  config.yaml: model_kind, feature_input_hook, feature_output_hook, activation, k (topk), model_name

W_skip follows circuit-tracer: skip = x @ W_skip.T (nn.Linear convention, [d_out, d_in]).
JumpReLU is x * (x > threshold); TopK keeps the k largest pre-activations per position, relu'd.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from dreaming.atomic import atomic_directory

CLT = "cross_layer_transcoder"
SET = "transcoder_set"
KINDS = (CLT, SET)
ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass
class TranscoderConfig:
    kind: str  # "cross_layer_transcoder" | "transcoder_set"
    n_layers: int
    d_model: int
    d_transcoder: int  # features per layer
    activation: str = "jumprelu"  # "relu" | "jumprelu" | "topk"
    k: int | None = None  # for topk
    feature_input_hook: str = "mlp.hook_in"
    feature_output_hook: str = "mlp.hook_out"
    model_name: str | None = None
    skip_connection: bool = False  # transcoder_set only: a W_skip per layer

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown transcoder kind {self.kind!r}; expected one of {KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_transcoder):
            raise ValueError(f"topk needs an integer k in [1, {self.d_transcoder}], got k={self.k!r}")
        if min(self.n_layers, self.d_model, self.d_transcoder) < 1:
            raise ValueError(f"n_layers, d_model, d_transcoder must be >= 1, got {self}")
        if self.skip_connection and self.kind != SET:
            raise ValueError("skip_connection (W_skip) exists only for a transcoder_set")


class Transcoder(torch.nn.Module):
    def __init__(self, config: TranscoderConfig, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.config = c = config
        n, F, d = c.n_layers, c.d_transcoder, c.d_model

        def zeros(*shape):
            return torch.nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

        self.W_enc = zeros(n, F, d)  # [n_layers, F, d_model]
        self.b_enc = zeros(n, F)  # [n_layers, F]
        self.b_dec = zeros(n, d)  # [n_layers, d_model]
        # a buffer, not a parameter: optimizers (weight decay) must not touch it
        threshold = torch.zeros(n, F, dtype=dtype, device=device) if c.activation == "jumprelu" else None
        self.register_buffer("threshold", threshold)  # [n_layers, F] or None
        if c.kind == CLT:
            # W_dec[l] [F, n_layers - l, d_model]: slot j writes to layer l + j
            self.W_dec = torch.nn.ParameterList([zeros(F, n - l, d) for l in range(n)])
            self.register_parameter("W_skip", None)
        else:
            self.W_dec = zeros(n, F, d)  # [n_layers, F, d_model]
            self.register_parameter("W_skip", zeros(n, d, d) if c.skip_connection else None)  # [n_layers, d_out, d_in]

    def pre_activations(self, x, layer):
        # x [..., d_model] -> [..., F]
        return x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]

    def activate(self, pre, layer):
        c = self.config
        if c.activation == "relu":
            return pre.relu()
        if c.activation == "jumprelu":
            return pre * (pre > self.threshold[layer])
        vals, idx = pre.topk(c.k, dim=-1)  # [..., k]
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def encode(self, x, layer, indices=None):
        """x [..., d_model] -> activations [..., F], or [..., n] of just the features `indices` (the same interface
        as LazyEncoder.encode; a topk transcoder encodes every feature to know the top k)."""
        if indices is None or self.config.activation == "topk":
            acts = self.activate(self.pre_activations(x, layer), layer)
            return acts if indices is None else acts[..., torch.as_tensor(indices, device=acts.device)]
        W, b, threshold = self.rows(layer, indices)
        pre = x.to(W.dtype) @ W.T + b  # [..., n]
        return pre * (pre > threshold) if threshold is not None else pre.relu()

    def rows(self, layer, indices):
        """(W [n, d_model], b [n], threshold [n] or None) of features `indices` (as LazyEncoder.rows)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.W_enc.device).reshape(-1)
        threshold = self.threshold[layer, index] if self.threshold is not None else None
        return self.W_enc[layer, index], self.b_enc[layer, index], threshold

    def decode(self, acts, inputs=None):
        # acts[l] [..., F] -> reconstruction of every layer's output [n_layers, ..., d_model]
        c = self.config
        n, d = c.n_layers, c.d_model
        if len(acts) != n:
            raise ValueError(f"decode needs activations for all {n} layers, got {len(acts)}")
        if self.W_skip is not None and inputs is None:
            raise ValueError("this transcoder has a skip connection (W_skip): decode needs the inputs")
        batch = acts[0].shape[:-1]
        if c.kind == CLT:
            out = torch.zeros(n, *batch, d, dtype=self.b_dec.dtype, device=self.b_dec.device)
            for l, a in enumerate(acts):
                y = (a @ self.W_dec[l].flatten(1)).unflatten(-1, (n - l, d))  # [..., n_layers - l, d_model]
                out[l:] += y.movedim(-2, 0)
        else:
            out = torch.stack([a @ self.W_dec[l] for l, a in enumerate(acts)])  # [n_layers, ..., d_model]
            if self.W_skip is not None:
                out = out + torch.stack([inputs[l].to(self.W_skip.dtype) @ self.W_skip[l].T for l in range(n)])
        return out + self.b_dec.view(n, *[1] * len(batch), d)

    def decode_layer(self, acts: dict, layer: int, inputs=None):
        """Reconstruction of one layer's output [..., d_model] from the activations of the layers that write to it
        (acts[l] [..., F] for every l <= layer for a CLT, acts[layer] for a set) and, with W_skip, its input."""
        if self.config.kind == CLT:
            out = self.b_dec[layer] + sum(acts[l] @ self.W_dec[l][:, layer - l] for l in range(layer + 1))
        else:
            out = acts[layer] @ self.W_dec[layer] + self.b_dec[layer]
        if self.W_skip is not None:
            if inputs is None:
                raise ValueError("this transcoder has a skip connection (W_skip): decode needs the inputs")
            out = out + inputs.to(self.W_skip.dtype) @ self.W_skip[layer].T
        return out

    def forward(self, inputs):
        # inputs [n_layers, ..., d_model] -> (acts per layer [..., F], reconstruction [n_layers, ..., d_model])
        acts = [self.encode(inputs[l], l) for l in range(self.config.n_layers)]
        return acts, self.decode(acts, inputs)


# ---------------------------------------------------------------------------------------------- layout


def _enc_file(kind, layer):
    return f"W_enc_{layer}.safetensors" if kind == CLT else f"layer_{layer}.safetensors"


def _dec_file(kind, layer):
    return f"W_dec_{layer}.safetensors" if kind == CLT else _enc_file(kind, layer)


def _dec_name(kind, layer):
    """The decoder's tensor name: W_dec_{l} [F, n_layers - l, d_model] (CLT) or W_dec [F, d_model] (set)."""
    return f"W_dec_{layer}" if kind == CLT else "W_dec"


def _enc_names(kind, layer):
    """Tensor names (W_enc, b_enc, b_dec, threshold) inside the encoder file of one layer."""
    if kind == CLT:
        return f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}", f"threshold_{layer}"
    return "W_enc", "b_enc", "b_dec", "activation_function.threshold"


def _layers_on_disk(directory: Path, kind) -> int:
    pattern = re.compile(r"W_enc_(\d+)\.safetensors" if kind == CLT else r"layer_(\d+)\.safetensors")
    found = {int(m.group(1)) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))}
    n = max(found, default=-1) + 1
    missing = sorted(set(range(n)) - found)
    if n == 0 or missing:
        raise FileNotFoundError(
            f"{directory}: a {kind} needs {_enc_file(kind, 'L')} for every layer L = 0..n-1; "
            f"missing layers {missing or [0]}"
        )
    return n


def read_config(directory) -> TranscoderConfig:
    """The config of a transcoder directory: config.yaml where present, the rest inferred from the files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"transcoder directory {directory} does not exist (or is not a directory)")
    meta = {}
    if (directory / "config.yaml").exists():
        meta = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    kind = meta.get("model_kind")
    if kind is None:
        if (directory / "W_enc_0.safetensors").exists():
            kind = CLT
        elif (directory / "layer_0.safetensors").exists():
            kind = SET
        else:
            raise FileNotFoundError(
                f"{directory}: no transcoder found; expected W_enc_0.safetensors (cross-layer transcoder) "
                f"or layer_0.safetensors (per-layer transcoder set)"
            )
    if kind not in KINDS:
        raise ValueError(f"{directory / 'config.yaml'}: unknown model_kind {kind!r}; expected one of {KINDS}")
    n = _layers_on_disk(directory, kind)
    W, _, _, thr = _enc_names(kind, 0)
    with safe_open(str(directory / _enc_file(kind, 0)), framework="pt") as f:
        if W not in f.keys():
            raise ValueError(f"{directory / _enc_file(kind, 0)}: missing tensor {W!r}")
        shape = f.get_slice(W).get_shape()
        if len(shape) != 2:
            raise ValueError(f"{directory / _enc_file(kind, 0)}: {W} should be [d_transcoder, d_model], got {shape}")
        has_threshold = thr in f.keys()
        has_skip = "W_skip" in f.keys()
    activation = meta.get("activation") or ("jumprelu" if has_threshold else "relu")
    try:
        return TranscoderConfig(
            kind=kind,
            n_layers=n,
            d_model=shape[1],
            d_transcoder=shape[0],
            activation=activation,
            k=meta.get("k"),
            feature_input_hook=meta.get("feature_input_hook") or "mlp.hook_in",
            feature_output_hook=meta.get("feature_output_hook") or "mlp.hook_out",
            model_name=meta.get("model_name"),
            skip_connection=kind == SET and has_skip,
        )
    except ValueError as e:
        raise ValueError(f"{directory / 'config.yaml'}: {e}") from None


def _config_yaml(c: TranscoderConfig) -> dict:
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


def _tensor(f, path, name, shape):
    """Read tensor `name` from an open safetensors file and check its shape."""
    if name not in f.keys():
        raise ValueError(f"{path}: missing tensor {name!r} (expected shape {list(shape)})")
    t = f.get_tensor(name)
    if list(t.shape) != list(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t


# ------------------------------------------------------------------------------------------ save / load


def _cpu(t):
    return t.detach().to("cpu").contiguous().clone()


def save_transcoder(transcoder: Transcoder, directory) -> None:
    """Write `transcoder` to `directory` in the circuit-tracer layout; replaces an existing one atomically."""
    c, t = transcoder.config, transcoder
    with atomic_directory(directory) as tmp:
        for l in range(c.n_layers):
            W, b, bd, thr = _enc_names(c.kind, l)
            enc = {W: _cpu(t.W_enc[l]), b: _cpu(t.b_enc[l]), bd: _cpu(t.b_dec[l])}
            if t.threshold is not None:
                enc[thr] = _cpu(t.threshold[l])
            if c.kind == CLT:
                save_file(enc, str(tmp / _enc_file(c.kind, l)))
                save_file({_dec_name(c.kind, l): _cpu(t.W_dec[l])}, str(tmp / _dec_file(c.kind, l)))
            else:
                enc["W_dec"] = _cpu(t.W_dec[l])
                if t.W_skip is not None:
                    enc["W_skip"] = _cpu(t.W_skip[l])
                save_file(enc, str(tmp / _enc_file(c.kind, l)))
        (tmp / "config.yaml").write_text(yaml.safe_dump(_config_yaml(c), sort_keys=False))


def load_transcoder(directory, dtype=torch.float32, device="cpu") -> Transcoder:
    """Load a CLT or per-layer set saved in the circuit-tracer layout (config.yaml optional)."""
    directory = Path(directory)
    c = read_config(directory)
    n, F, d = c.n_layers, c.d_transcoder, c.d_model
    if c.kind == CLT:
        missing = [l for l in range(n) if not (directory / f"W_dec_{l}.safetensors").exists()]
        if missing:
            raise FileNotFoundError(
                f"{directory}: a cross-layer transcoder needs W_dec_{{l}}.safetensors for every layer l = "
                f"0..{n - 1}; missing " + ", ".join(f"W_dec_{l}.safetensors" for l in missing)
            )
    t = Transcoder(c, dtype=dtype, device=device)
    with torch.no_grad():
        for l in range(n):
            path = directory / _enc_file(c.kind, l)
            W, b, bd, thr = _enc_names(c.kind, l)
            with safe_open(str(path), framework="pt") as f:
                t.W_enc[l].copy_(_tensor(f, path, W, (F, d)))
                t.b_enc[l].copy_(_tensor(f, path, b, (F,)))
                t.b_dec[l].copy_(_tensor(f, path, bd, (d,)))
                if t.threshold is not None:
                    t.threshold[l].copy_(_tensor(f, path, thr, (F,)))
                if c.kind == SET:
                    t.W_dec[l].copy_(_tensor(f, path, "W_dec", (F, d)))
                    if t.W_skip is not None:
                        t.W_skip[l].copy_(_tensor(f, path, "W_skip", (d, d)))
            if c.kind == CLT:
                path = directory / _dec_file(c.kind, l)
                with safe_open(str(path), framework="pt") as f:
                    t.W_dec[l].copy_(_tensor(f, path, _dec_name(c.kind, l), (F, n - l, d)))
    return t.requires_grad_(False)  # loaded for inference; training builds its own parameters


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
    params = []
    for l in range(n):
        path = Path(paths[l])
        if not path.exists():
            raise FileNotFoundError(f"Gemma Scope params file for layer {l} not found: {path}")
        with np.load(path) as z:
            missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)} (a Gemma Scope params.npz has "
                                 f"W_enc [d_model, F], W_dec [F, d_model], b_enc, b_dec, threshold)")
            params.append({k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files})
    d, F = params[0]["W_enc"].shape  # stored [d_model, F]
    c = TranscoderConfig(
        kind=SET,
        n_layers=n,
        d_model=d,
        d_transcoder=F,
        activation="jumprelu",
        feature_input_hook=feature_input_hook,
        feature_output_hook=feature_output_hook,
        model_name=model_name,
    )
    t = Transcoder(c, dtype=dtype, device=device)
    expected = {"W_enc": (d, F), "W_dec": (F, d), "b_enc": (F,), "b_dec": (d,), "threshold": (F,)}
    with torch.no_grad():
        for l, p in enumerate(params):
            for k, shape in expected.items():
                if tuple(p[k].shape) != shape:
                    raise ValueError(f"{paths[l]}: {k} has shape {list(p[k].shape)}, expected {list(shape)}")
            t.W_enc[l].copy_(p["W_enc"].T)  # [d_model, F] -> [F, d_model]
            t.W_dec[l].copy_(p["W_dec"])
            t.b_enc[l].copy_(p["b_enc"])
            t.b_dec[l].copy_(p["b_dec"])
            t.threshold[l].copy_(p["threshold"])
    return t


# --------------------------------------------------------------------------------------------- lazy rows


def decoder_rows(directory: Path, config: TranscoderConfig, layer: int, lo: int, hi: int) -> torch.Tensor:
    """The decoders of features lo..hi-1 of `layer` in fp32: [rows, output layers, d_model], output layers
    layer..n_layers - 1 for a CLT, just `layer` for a set."""
    path = directory / _dec_file(config.kind, layer)
    F, d = config.d_transcoder, config.d_model
    outputs = config.n_layers - layer if config.kind == CLT else 1
    expected = [F, outputs, d] if config.kind == CLT else [F, d]
    name = _dec_name(config.kind, layer)
    with safe_open(str(path), framework="pt") as f:
        decoder = f.get_slice(name)
        if decoder.get_shape() != expected:
            raise ValueError(f"{path}: {name} has shape {decoder.get_shape()}, expected {expected}")
        return decoder[lo:hi].float().view(-1, outputs, d)


class LazyEncoder:
    """Encoder rows of chosen features, read straight from the safetensors files (one row costs one row)."""

    def __init__(self, directory, dtype=torch.float32, device="cpu"):
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        self.dtype, self.device = dtype, device
        self._handles = {}  # layer -> open safe_open handle

    def _handle(self, layer):
        if layer not in self._handles:
            self._handles[layer] = safe_open(str(self.directory / _enc_file(self.config.kind, layer)), framework="pt")
        return self._handles[layer]

    def rows(self, layer, indices):
        """(W [n, d_model], b [n], threshold [n] or None) for features `indices` (any order, repeats ok)."""
        c = self.config
        try:
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(f"layer must be an integer, got {layer!r}") from None
        if not 0 <= layer < c.n_layers:
            raise ValueError(f"layer {layer} out of range: valid layers are 0..{c.n_layers - 1}")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        bad = [i for i in idx if not 0 <= i < c.d_transcoder]
        if bad:
            raise ValueError(
                f"feature index {bad[0]} out of range for layer {layer}: valid indices are 0..{c.d_transcoder - 1}"
            )
        if not idx:
            raise ValueError("rows() needs at least one feature index")
        f = self._handle(layer)
        W, b, _, thr = _enc_names(c.kind, layer)
        has_thr = c.activation == "jumprelu"
        if has_thr and thr not in f.keys():
            raise ValueError(f"{self.directory / _enc_file(c.kind, layer)}: jumprelu needs tensor {thr!r}")
        # read the sorted unique rows as runs of consecutive indices, then put them back in the asked order
        uniq = sorted(set(idx))
        runs, start = [], uniq[0]
        for a, b_ in zip(uniq, uniq[1:] + [None]):
            if b_ != a + 1:
                runs.append((start, a + 1))
                start = b_
        where = {u: i for i, u in enumerate(uniq)}
        order = torch.tensor([where[i] for i in idx])

        def read(name):
            s = f.get_slice(name)
            if s.get_shape()[0] != c.d_transcoder:
                raise ValueError(f"{self.directory / _enc_file(c.kind, layer)}: {name} has shape {s.get_shape()}, "
                                 f"expected {c.d_transcoder} rows like layer 0")
            t = torch.cat([s[lo:hi] for lo, hi in runs])[order]
            return t.to(device=self.device, dtype=self.dtype)

        return read(W), read(b), read(thr) if has_thr else None

    def encode(self, x, layer, indices):
        # x [..., d_model] -> [..., n] activations of just the features `indices`
        if self.config.activation == "topk":
            raise ValueError(
                "a topk transcoder cannot be encoded for a subset of features: whether a feature is in the top k "
                "depends on all the others; use load_transcoder(...).encode and select the columns"
            )
        W, b, thr = self.rows(layer, indices)
        pre = x.to(device=self.device, dtype=self.dtype) @ W.T + b  # [..., n]
        return pre * (pre > thr) if thr is not None else pre.relu()
