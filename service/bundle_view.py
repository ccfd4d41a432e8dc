"""A served bundle as the web process sees it (one view per bundle): the library's `Explorer` on the CPU (the web
process never touches a GPU), feature ids checked against it, and the light, interactive calls (activations of user
texts, feature search, feature pages).

Dreams run in the Ray workers. These calls are short; they run one at a time (the model's capture hooks are
not re-entrant) on a thread of their own, so neither the event loop nor the store's threads wait for them, with a
bounded queue (`ModelThread`): past its bound a call is refused at once (503 with Retry-After).
Feature pages are cached (on the event loop) until a new dream of the feature arrives.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch

from dreaming.explorer import Explorer
from dreaming.features import Feature, parse_feature
from dreaming.maxima import DENSE_ABOVE, SEARCH_ORDER, SearchOrder
from service.schemas import FeaturePage

PAGE_CACHE_SIZE = 1024
SORTS = {"index": None, "density": "density", "max": "max_activation"}  # browse order: none, or this array, descending


class UnknownFeature(LookupError):
    """A well-formed feature id that this bundle does not have (the message names the valid range)."""


class Busy(RuntimeError):
    """The model thread has as many calls waiting as it may: the caller should come back later (503)."""


class ModelThread:
    """The one thread that runs the model for interactive calls, with a bounded queue: past `max_waiting` calls
    waiting or running, a new one is refused at once (Busy) rather than waiting behind an unbounded queue. A call
    whose caller has gone (its task cancelled, e.g. the client disconnected) before it starts never runs."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._calls: list[Future] = []  # submitted, not finished (a cancelled caller's running call included)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @property
    def waiting(self) -> int:
        self._calls = [call for call in self._calls if not call.done()]
        return len(self._calls)

    async def run(self, call, *args, **kwargs):
        if self.waiting >= self.max_waiting:
            raise Busy(f"the model is busy with {self.waiting} interactive calls; try again in a few seconds")
        submitted = self._executor.submit(partial(call, *args, **kwargs))
        self._calls.append(submitted)
        return await asyncio.wrap_future(submitted)  # cancelling this cancels a call that has not started

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BundleView:
    def __init__(self, name: str, bundle_dir: str | None, max_waiting: int = 8):
        self.name = name  # as served: the {bundle} of /v1/bundles/{bundle}/...
        self.explorer = Explorer.open(bundle_dir, device="cpu")
        self.bundle = self.explorer.bundle
        self.identity = self.bundle.identity
        self.maxima = self.explorer.require_maxima()
        self.n_layers, self.features_per_layer = self.maxima.shape
        self.layers = self.explorer.transcoder_config.layer_ids  # those it has features in (some, for an SAE)
        self._model_thread = ModelThread(max_waiting)
        self._pages: OrderedDict = OrderedDict()
        self._similar: OrderedDict = OrderedDict()

    @property
    def waiting(self) -> int:
        """Interactive calls waiting for or using the model now."""
        return self._model_thread.waiting

    def check(self, feature: Feature) -> Feature:
        """The feature itself if this bundle has it, else UnknownFeature naming the valid range."""
        try:
            return self.explorer.feature(feature)
        except ValueError as error:
            raise UnknownFeature(str(error)) from None

    def dataset_max(self, feature: str) -> float | None:
        return self.maxima.dataset_max(parse_feature(feature))

    def count_tokens(self, texts: list[str]) -> int:
        """How many tokens the texts are, together (the model's tokenizer, without special tokens)."""
        return sum(map(len, self.explorer.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]))

    async def _on_model_thread(self, call, *args, **kwargs):
        return await self._model_thread.run(call, *args, **kwargs)

    def _load(self) -> None:
        _ = self.explorer.lm  # a cached property: loads the model once
        _ = self.explorer.encoder  # opens the transcoder's files (its encoders are read on use)

    async def warm_up(self) -> None:
        """Load the model and transcoder now rather than on the first request."""
        await self._on_model_thread(self._load)

    async def activations(self, feature: Feature, texts: list[str], template: str | None = None) -> list[dict]:
        return await self._on_model_thread(self.explorer.activation, feature, texts, template)

    async def search(self, text: str, top: int, order: SearchOrder = SEARCH_ORDER) -> list[dict]:
        return await self._on_model_thread(self.explorer.search, text, top, order)

    async def page(self, feature: Feature, dreams: list[dict]) -> FeaturePage:
        """The comparison page of a feature beside `dreams` (the service's stored results for it)."""
        key = (feature, len(dreams))  # results are only ever added, so a new dream changes the key
        if key not in self._pages:
            page = await self._on_model_thread(self.explorer.compare, feature, dreams=dreams)
            self._pages[key] = FeaturePage.model_validate(page)  # validated once, served many times
            if len(self._pages) > PAGE_CACHE_SIZE:
                self._pages.popitem(last=False)
        self._pages.move_to_end(key)
        return self._pages[key]

    def row(self, feature: Feature, has_dreams: bool = False) -> dict:
        """A feature's line in a listing: its dataset statistics."""
        at, arrays = (feature.layer, feature.index), self.maxima.arrays
        density = float(arrays["density"][at])
        return {"feature": str(feature), "dataset_max": float(arrays["max_activation"][at]), "density": density,
                "mean_when_active": float(arrays["mean_active"][at]), "dead": bool(arrays["active_count"][at] == 0),
                "dense": density > DENSE_ABOVE, "first_token": self.maxima.first_token(feature),
                "has_dreams": has_dreams}

    def browse(self, with_dreams: set[str], layer: int | None = None, live: bool = False, dense: bool | None = None,
               dreams: bool = False, sort: str = "index", offset: int = 0, limit: int = 50) -> dict:
        """One page of the features matching the filters (`dense`: None either way, True only dense, False none
        dense), in feature order or by `sort` (descending)."""
        arrays = self.maxima.arrays
        keep = torch.zeros(self.maxima.shape, dtype=torch.bool)  # [layers, features]
        keep[self.layers] = True
        if layer is not None:
            keep[torch.arange(self.n_layers) != layer] = False
        if live:
            keep &= arrays["active_count"] > 0
        if dense is not None:
            keep &= (arrays["density"] > DENSE_ABOVE) == dense
        if dreams:
            dreamed = torch.zeros_like(keep)
            for feature in map(parse_feature, with_dreams):
                if feature.layer < self.n_layers and feature.index < self.features_per_layer:
                    dreamed[feature.layer, feature.index] = True
            keep &= dreamed
        flat = keep.flatten().nonzero().squeeze(1)  # [matching] indices into the flattened [layers * features]
        if SORTS[sort] is not None:
            values = arrays[SORTS[sort]].flatten()[flat]
            flat = flat[torch.argsort(values, descending=True, stable=True)]
        rows = [self.row(Feature(*divmod(int(i), self.features_per_layer))) for i in flat[offset: offset + limit]]
        for row in rows:
            row["has_dreams"] = row["feature"] in with_dreams
        return {"total": len(flat), "offset": offset, "limit": limit, "features": rows}

    async def similar(self, feature: Feature, top: int) -> list[dict]:
        """The features with the most similar decoder directions (read from disk in chunks, cached)."""
        key = (feature, top)
        if key not in self._similar:
            self._similar[key] = await asyncio.to_thread(self.explorer.similar, feature, top)
            if len(self._similar) > PAGE_CACHE_SIZE:
                self._similar.popitem(last=False)
        return self._similar[key]

    def close(self) -> None:
        self._model_thread.close()
