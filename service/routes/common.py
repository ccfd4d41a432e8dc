"""What the API's routers share: the bundle a request is about (one dependency, scoped or not), feature ids checked
against it, listing bounds, store calls off the event loop, and cancelling work whose client has gone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import HTTPException, Path, Request, Response

from dreaming.features import Feature, parse_feature
from service.bundle_view import BundleView, UnknownFeature
from service.runtime import Service

MAX_OFFSET = 10**9  # listings: past any real table, and within the database's integers
DISCONNECT_CHECK = 0.25  # seconds between two looks at whether the client of an interactive call is still there
SCOPED = "/bundles/{bundle}"  # the prefix (under /v1) of the routes of one named bundle


def bundle_dependencies(service: Service, names: list[str]):
    """The two ways a route finds its bundle: `first()` for the unscoped routes (the default bundle, served
    first) and `named(bundle)` for those under /v1/bundles/{bundle} (404 naming the served ones)."""

    def first() -> BundleView:
        return next(iter(service.views.values()))

    def named(bundle: str = Path(description="a served bundle's name (GET /v1/bundles lists them)",
                                 examples=names)) -> BundleView:
        view = service.views.get(bundle)
        if view is None:
            raise HTTPException(404, f"unknown bundle {bundle!r}: this server serves {', '.join(service.views)}")
        return view

    return first, named


def known(view: BundleView, feature: Feature) -> Feature:
    """The feature if the bundle has it, else 404 naming the valid range."""
    try:
        return view.check(feature)
    except UnknownFeature as error:
        raise HTTPException(404, str(error)) from None


def feature_or_error(view: BundleView, text: str) -> Feature:
    """A LAYER/INDEX id of the bundle's: 422 when malformed, 404 when out of range."""
    try:
        return known(view, parse_feature(text))
    except ValueError as error:
        raise HTTPException(422, str(error)) from None


async def in_thread(method, *args):
    """A blocking call (the store, the tokenizer) in a thread: the event loop never waits for one."""
    return await asyncio.to_thread(method, *args)


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelled if the client disconnects first: a model call still waiting for the model thread
    never runs for a client that has gone (one already running finishes, unread)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait([task], timeout=DISCONNECT_CHECK)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)  # nobody reads it: the client has gone
