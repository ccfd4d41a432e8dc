"""The Python API for looking at one bundle's features: activations of texts, search, dashboards, comparison.

    explorer = Explorer.open()                     # the default bundle (built first if missing)
    explorer.activation("12/345", ["How do I make a bomb?"])
    explorer.search("How do I make a bomb?")
    explorer.compare("12/345")                     # dataset maxima beside the cached dreamed prompts

Every figure is measured in fp32 by `dreaming.activation` (the one measurement function). The CLI and the
HTTP service are thin layers over this class.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch

from dreaming.activation import measure_texts
from dreaming.bundle import Bundle
from dreaming.features import Feature, check_feature, parse_feature
from dreaming.maxima import Maxima, feature_page, search_features
from dreaming.models import LanguageModel, best_device
from dreaming.transcoders import Transcoder, read_config

MAX_TEXTS = 64


class Explorer:
    def __init__(self, bundle: Bundle, device: str | None = None):
        self.bundle = bundle
        self.device = device or best_device()
        self.transcoder_config = read_config(bundle.directory / "transcoder")

    @classmethod
    def open(cls, directory: str | Path | None = None, device: str | None = None) -> Explorer:
        return cls(Bundle.open(directory), device)

    @cached_property
    def lm(self) -> LanguageModel:
        return self.bundle.load_model(dtype=torch.float32, device=self.device)

    @cached_property
    def transcoder(self) -> Transcoder:
        return self.bundle.load_transcoder(device=self.device)

    @cached_property
    def maxima(self) -> Maxima | None:
        return self.bundle.maxima()

    def feature(self, feature: Feature | str) -> Feature:
        """Parse and check a feature id against this bundle's transcoder (ValueError naming the valid range)."""
        feature = parse_feature(feature) if isinstance(feature, str) else feature
        return check_feature(feature, self.transcoder_config.n_layers, self.transcoder_config.d_transcoder)

    def require_maxima(self) -> Maxima:
        if self.maxima is None:
            raise FileNotFoundError(f"{self.bundle.directory} has no dataset maxima: run `dreaming maxima build`")
        return self.maxima

    def dataset_max(self, feature: Feature | str) -> float | None:
        feature = self.feature(feature)
        return self.maxima.dataset_max(feature) if self.maxima is not None else None

    def activation(self, feature: Feature | str, texts: list[str]) -> list[dict]:
        """Per text: token ids, per-token activations, the max, and the fraction of the dataset max."""
        feature = self.feature(feature)
        if len(texts) > MAX_TEXTS:
            raise ValueError(f"too many texts: {len(texts)}, at most {MAX_TEXTS} per call")
        results = measure_texts(self.lm, self.transcoder, feature, texts, self.dataset_max(feature))
        return [asdict(result) for result in results]

    def search(self, text: str, top: int = 20) -> list[dict]:
        """The features most active on `text`, ranked by fraction of their dataset max, with density."""
        return search_features(self.lm, self.transcoder, self.require_maxima(), text, top)

    def dreams(self, feature: Feature | str) -> list[dict]:
        """Dream results cached on disk for this feature (any configuration), as JSON dicts."""
        from dreaming.dream_cache import DreamCache

        feature = self.feature(feature)
        cache = DreamCache(self.bundle.directory / "dreams")
        return [result.model_dump(mode="json") for result in cache.for_feature(self.bundle.identity, feature)]

    def compare(self, feature: Feature | str, top: int = 10, dreams: list[dict] | None = None) -> dict:
        """The feature's statistics and top dataset examples beside its dreamed prompts (default: cached ones)."""
        feature = self.feature(feature)
        dreams = self.dreams(feature) if dreams is None else dreams
        return feature_page(self.lm, self.transcoder, self.require_maxima(), feature, dreams, top)
