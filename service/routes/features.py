"""Feature routes: browse a bundle's features, a feature's page (dataset maxima beside its dreams) and the features
with the most similar decoders."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from dreaming.dream_cache import max_key
from dreaming.features import Feature
from dreaming.formats.files import layer_span
from service.bundle_view import SORTS, BundleView
from service.routes.common import MAX_OFFSET, in_thread, known, unless_disconnected
from service.runtime import Service
from service.schemas import FeatureList, FeaturePage, SimilarFeature


def merge_dreams(served: list[dict], local: list[dict]) -> list[dict]:
    """The service's stored results, then the bundle's cached ones (`dreaming dream`) that are not the same dream:
    one result per (config, dataset max), the yardstick it was scored against."""
    def key(dream: dict) -> tuple[str, str]:
        return json.dumps(dream["config"], sort_keys=True), max_key(dream.get("dataset_max"))

    seen = {key(dream) for dream in served}
    return served + [dream for dream in local if key(dream) not in seen]


def router(service: Service, bundle) -> APIRouter:
    """The feature routes of the bundle that the dependency `bundle` gives."""
    routes = APIRouter()

    def features_with_dreams(view: BundleView) -> set[str]:
        return service.store.features_with_results(view.identity) | view.explorer.features_with_dreams()

    @routes.get("/features", response_model=FeatureList, summary="Browse the features: filter by layer, live (ever "
                "active), dense, has dreams; in feature order or by density or dataset max; paginated")
    async def list_features(layer: int | None = Query(None, ge=0), live: bool = False, dense: bool | None = None,
                            dreams: bool = False, sort: Literal[tuple(SORTS)] = "index",
                            offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500),
                            view: BundleView = Depends(bundle)) -> dict:
        if layer is not None and layer not in view.layers:
            raise HTTPException(422, f"unknown layer {layer}: layer must be in {layer_span(view.layers)}")
        with_dreams = await in_thread(features_with_dreams, view)
        return view.browse(with_dreams, layer, live, dense, dreams, sort, offset, limit)

    @routes.get("/features/{layer}/{index}/similar", response_model=list[SimilarFeature],
                summary="The features whose decoder vectors (normalised, concatenated over every output layer) have "
                        "the highest cosine with this one's")
    async def similar(layer: int, index: int, top: int = Query(10, ge=1, le=100),
                      view: BundleView = Depends(bundle)) -> list[dict]:
        feature = known(view, Feature(layer, index))
        try:
            return await view.similar(feature, top)
        except ValueError as error:  # the feature and `top` are checked above: a dictionary without decoders
            raise HTTPException(404, str(error)) from None

    @routes.get("/features/{layer}/{index}", response_model=FeaturePage,
                summary="Dataset maxima, cached dreams (the service's and those made with `dreaming dream` on the "
                        "bundle) and the comparison of a feature")
    async def get_feature(layer: int, index: int, request: Request, view: BundleView = Depends(bundle)) -> FeaturePage:
        feature = known(view, Feature(layer, index))
        served = await in_thread(service.store.results_for, view.identity, str(feature))
        local = await in_thread(view.explorer.dreams, feature)  # made with `dreaming dream` on this bundle
        # the page lists results scored against another dataset max (an earlier maxima build) as stale
        return await unless_disconnected(request, view.page(feature, merge_dreams(served, local)))

    return routes
