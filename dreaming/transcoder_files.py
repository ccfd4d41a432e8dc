"""A transcoder's files, opened from a reference, and checked against a model.

PROVISIONAL: the contract that branch `files` implements in full (config.yaml lists, hf:// references, Gemma Scope,
sparsify folders); this stand-in reads circuit-tracer directories only, through dreaming/transcoders.py, so that
`dreaming bundle create` is built and tested against the contract. The merge of `files` replaces this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dreaming.models import LanguageModel
from dreaming.transcoders import (
    LazyEncoder,
    Transcoder,
    TranscoderConfig,
    decoder_rows,
    load_transcoder,
    read_config,
)


@dataclass
class TranscoderFiles:
    reference: str
    config: TranscoderConfig
    layout: str

    def encoder_rows(self, layer, indices, dtype=torch.float32, device="cpu"):
        return LazyEncoder(self.reference, dtype=dtype, device=device).rows(layer, indices)

    def encoder(self, layer, dtype=torch.float32, device="cpu"):
        return self.encoder_rows(layer, range(self.config.d_transcoder), dtype, device)

    def decoder_rows(self, layer, lo, hi):
        return decoder_rows(Path(self.reference), self.config, layer, lo, hi)

    def load(self, dtype=torch.float32, device="cpu") -> Transcoder:
        return load_transcoder(self.reference, dtype=dtype, device=device)

    def identity(self, model_name: str) -> str:
        from dreaming.bundle import transcoder_identity

        return transcoder_identity(model_name, Path(self.reference))


def open_transcoder(reference: str | os.PathLike) -> TranscoderFiles:
    return TranscoderFiles(str(reference), read_config(reference), "circuit-tracer")


def check_against_model(files: TranscoderFiles, lm: LanguageModel) -> list[str]:
    c = files.config
    if c.n_layers != lm.n_layers:
        raise ValueError(f"{files.reference}: {c.n_layers} layers, the model {lm.name} has {lm.n_layers}")
    if c.d_model != lm.d_model:
        raise ValueError(f"{files.reference}: d_model {c.d_model}, the model {lm.name} has {lm.d_model}")
    for hook in (c.feature_input_hook, c.feature_output_hook):
        try:
            lm.hook_module(hook, 0)
        except ValueError as error:
            raise ValueError(f"{files.reference}/config.yaml: {error}") from None
    if c.model_name and c.model_name != lm.name:
        return [f"{files.reference} was made for the model {c.model_name!r}, not {lm.name!r}"]
    return []

