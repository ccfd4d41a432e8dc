"""A dictionary's encoders read from its files on demand (LazyEncoder): what measuring and dreaming read, whatever
the layout (dreaming/formats), in bounded memory."""

from __future__ import annotations

import torch

from dreaming.formats import open_transcoder
from dreaming.formats.files import TranscoderFiles, check_indices, check_layer
from dreaming.transcoders import activate

ENCODER_CACHE_BYTES = 4 << 30  # whole layers' encoders kept resident up to this many bytes


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
        layer = check_layer(layer, self.config.layer_ids)
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