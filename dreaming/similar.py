"""Similar features: the features whose decoder directions have the highest cosine with a given feature's.

A feature's decoder direction is what it writes to every output layer of the model, concatenated (zeros for the
layers it does not write to) and normalised. Feature (a, f) of a CLT writes to layers a..n_layers - 1, so (a, f) and
(b, g) share layers max(a, b)..n_layers - 1; a feature of a per-layer set writes to its own layer only, so only
features of the same layer share any (every other cosine is exactly 0). The decoders are read from disk a chunk of
rows at a time, never a whole file: memory stays at about two chunks whatever the transcoder's size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreaming.features import Feature, check_feature, parse_feature
from dreaming.formats import open_transcoder
from dreaming.formats.files import TranscoderFiles
from dreaming.transcoders import CLT

# Features read at once: a chunk of a CLT's layer 0 is [CHUNK_ROWS, n_layers, d_model] fp32, 17 MB at 30 layers of
# 576; the peak is about two chunks (experiments/results/similar_features.md).
CHUNK_ROWS = 256


def similar_features(transcoder: str | Path | TranscoderFiles, feature: Feature | str, top: int = 10,
                     chunk_rows: int = CHUNK_ROWS, lowest: bool = False) -> list[dict]:
    """The `top` other features whose decoder directions have the highest cosine with `feature`'s, highest first:
    [{"feature": "L/I", "cosine": float}]; with `lowest`, those with the lowest cosine (the most opposite
    directions), lowest first. Features with an all-zero decoder, and a set's features of other layers (cosine 0
    by construction), are not listed, so fewer than `top` may come back (none for a zero decoder). `transcoder`: any
    reference `open_transcoder` takes, or open files."""
    files = transcoder if isinstance(transcoder, TranscoderFiles) else open_transcoder(transcoder)
    c = files.config
    F = c.d_transcoder
    feature = check_feature(parse_feature(feature) if isinstance(feature, str) else feature, c.layer_ids, F)
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if not files.has_decoders:
        raise ValueError(f"{files.reference} has no decoders (a model's neurons): similar features compare decoder "
                         f"directions")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    a = feature.layer
    target = files.decoder_rows(a, feature.index, feature.index + 1)[0]  # [output layers a.., d_model]
    target_norm = target.norm()
    if target_norm == 0:
        return []
    cosines, keys = torch.empty(0), torch.empty(0, dtype=torch.long)  # the running top/bottom; key = layer * F + index
    for b in range(c.n_layers) if c.kind == CLT else [a]:
        first = max(a, b)  # the first output layer both write to; both write to every layer after it
        shared_target = target[first - a :].flatten()  # [shared layers * d_model]
        for lo in range(0, F, chunk_rows):
            rows = files.decoder_rows(b, lo, lo + chunk_rows)  # [n, output layers b.., d_model]
            norms = rows.flatten(1).norm(dim=1)  # [n]
            cosine = rows[:, first - b :].flatten(1) @ shared_target / (norms * target_norm)  # [n]
            index = torch.arange(lo, lo + len(rows))  # [n]
            keep = (norms > 0) & ((b != a) | (index != feature.index))
            cosines = torch.cat([cosines, cosine[keep]])
            keys = torch.cat([keys, b * F + index[keep]])
            cosines, order = cosines.topk(min(top, len(cosines)), largest=not lowest)
            keys = keys[order]
    return [{"feature": str(Feature(*divmod(int(key), F))), "cosine": float(value)}
            for value, key in zip(cosines, keys)]
