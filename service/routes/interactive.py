"""Interactive routes: a feature's activation on user texts, and the features most active on a text. Both run the
bundle's model in the web process (its model thread), bounded by the request limits."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from dreaming.activation import TextActivation
from service.bundle_view import BundleView
from service.routes.common import feature_or_error, in_thread, unless_disconnected
from service.runtime import Service
from service.schemas import ActivationsRequest, SearchHit, SearchRequest


def router(service: Service, bundle, keyed: list) -> APIRouter:
    """The interactive routes of the bundle that the dependency `bundle` gives; `keyed`: the API key check."""
    routes = APIRouter()
    limits = service.settings.limits

    def check_text(text: str) -> None:
        if len(text) > limits.max_text_chars:
            raise HTTPException(422, f"text too long: {len(text)} characters, at most {limits.max_text_chars}")

    async def check_tokens(view: BundleView, texts: list[str]) -> None:
        """422 before the model is asked when one request's texts are more tokens than it may run."""
        tokens = await in_thread(view.count_tokens, texts)
        if tokens > limits.max_request_tokens:
            raise HTTPException(422, f"request too long: {tokens} tokens in all, at most {limits.max_request_tokens} "
                                     "per request; split the texts over several requests")

    @routes.post("/activations", dependencies=keyed, response_model=list[TextActivation],
                 summary="A feature's activation on each text, per token and at its max, as % of the dataset max")
    async def activations(request: ActivationsRequest, http: Request, view: BundleView = Depends(bundle)
                          ) -> list[dict]:
        feature = feature_or_error(view, request.feature)
        if len(request.texts) > limits.max_texts:
            raise HTTPException(422, f"too many texts: {len(request.texts)}, at most {limits.max_texts}")
        for text in request.texts:
            check_text(text)
        if request.template is not None:
            check_text(request.template)
        await check_tokens(view, request.texts + ([request.template] if request.template else []))
        try:
            return await unless_disconnected(http, view.activations(feature, request.texts, request.template))
        except ValueError as error:  # empty text, too many tokens, a prompt that merges with the template
            raise HTTPException(422, str(error)) from None

    @routes.post("/search", dependencies=keyed, response_model=list[SearchHit],
                 summary="The features most active on a text, by % of their dataset max; by default positional "
                         "features (which fire on a text's first token) at the text's first token are listed last")
    async def search(request: SearchRequest, http: Request, view: BundleView = Depends(bundle)) -> list[SearchHit]:
        check_text(request.text)
        if request.top > limits.max_search_top:
            raise HTTPException(422, f"top too large: {request.top}, at most {limits.max_search_top}")
        await check_tokens(view, [request.text])
        try:
            return await unless_disconnected(http, view.search(request.text, request.top, request.order))
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    return routes
