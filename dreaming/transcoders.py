"""The transcoder itself, independent of any model and of any layout on disk.

Owns:
  TranscoderConfig / Transcoder  a cross-layer transcoder (CLT) or a per-layer set (transcoders, or SAEs: a set
                                 whose input and output hooks are one point), one module for both: encode one layer,
                                 decode every layer's output
  activate                       relu / jumprelu / topk of pre-activations
Reading and writing the layouts the field publishes is dreaming/formats' (open_transcoder, save_transcoder).

W_skip maps a layer's input to its output: skip = x @ W_skip.T (nn.Linear convention, [d_out, d_in]).
JumpReLU is x * (x > threshold); TopK keeps the k largest pre-activations per position, relu'd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    skip_connection: bool = False  # a W_skip per layer: the output of layer l gets a linear map of its input
    layers: list[int] | None = None  # the layers a per-layer set has, when not all of 0..n_layers-1 (an SAE on one)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown transcoder kind {self.kind!r}; expected one of {KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_transcoder):
            raise ValueError(f"topk needs an integer k in [1, {self.d_transcoder}], got k={self.k!r}")
        if min(self.n_layers, self.d_model, self.d_transcoder) < 1:
            raise ValueError(f"n_layers, d_model, d_transcoder must be >= 1, got {self}")
        if self.layers is not None:
            if self.kind == CLT:
                raise ValueError("a cross-layer transcoder has every layer 0..n_layers-1: layers must be None")
            if not self.layers or sorted(set(self.layers)) != list(self.layers) or not (
                    0 <= self.layers[0] and self.layers[-1] < self.n_layers):
                raise ValueError(f"layers must be increasing layers in 0..{self.n_layers - 1}, got {self.layers}")

    @property
    def layer_ids(self) -> list[int]:
        """The layers it has features in."""
        return list(range(self.n_layers)) if self.layers is None else list(self.layers)


def activate(pre, activation: str, threshold=None, k: int | None = None):
    """Activations from pre-activations [..., F] (relu and jumprelu also from [..., n] of chosen features, with
    their thresholds [n])."""
    if activation == "relu":
        return pre.relu()
    if activation == "jumprelu":
        return pre * (pre > threshold)
    vals, idx = pre.topk(k, dim=-1)  # [..., k]
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def sparse_matmul(acts, weights):
    """acts [..., F] (mostly zero) @ weights [F, m] -> [..., m], costing the active entries rather than F: each
    row's active features gather their weight rows (embedding_bag). A CLT's decoders write to every later layer, so
    the dense product costs F · n_layers² · d_model / 2 per token."""
    flat = acts.reshape(-1, acts.shape[-1])
    rows, features = flat.nonzero(as_tuple=True)  # sorted by row: one bag per row
    sizes = torch.bincount(rows, minlength=len(flat))
    out = torch.nn.functional.embedding_bag(features, weights, sizes.cumsum(0) - sizes, mode="sum",
                                            per_sample_weights=flat[rows, features].to(weights.dtype))
    return out.view(*acts.shape[:-1], weights.shape[-1])


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
        else:
            self.W_dec = zeros(n, F, d)  # [n_layers, F, d_model]
        self.register_parameter("W_skip", zeros(n, d, d) if c.skip_connection else None)  # [n_layers, d_out, d_in]

    def pre_activations(self, x, layer):
        # x [..., d_model] -> [..., F]
        return x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]

    def activate(self, pre, layer):
        c = self.config
        return activate(pre, c.activation, self.threshold[layer] if self.threshold is not None else None, c.k)

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
                y = sparse_matmul(a, self.W_dec[l].flatten(1)).unflatten(-1, (n - l, d))  # [..., n_layers - l, d_model]
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
            out = self.b_dec[layer] + sum(sparse_matmul(acts[l], self.W_dec[l][:, layer - l].contiguous())
                                          for l in range(layer + 1))
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
