"""Operations routes: what a bundle is and what the server serves (info, per bundle), the served bundles, health
for probes, and Prometheus metrics."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dreaming.bundle import bundle_info
from dreaming.engine import DreamConfig
from service.bundle_view import BundleView
from service.routes.common import in_thread
from service.runtime import Service
from service.schemas import BundleOut, Health, Info


LOCAL_PATH = re.compile(r"(?<![\w:/.~])/[^\s'\",:]*")  # an absolute path in a text (not the // of hf:// or a URL)


def without_paths(value):
    """`value` with every absolute path on the server's disk cut to its last part, in keys' values and in texts
    (a warning names its file): an answer says what a bundle is, never where it lives."""
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item) for item in value]
    if isinstance(value, str):
        return LOCAL_PATH.sub(lambda match: Path(match.group()).name, value)
    return value


def public_info(view: BundleView) -> dict:
    """What `dreaming info` shows of the bundle, without where it, its model, transcoder or corpus live on the
    server's disk."""
    return without_paths({name: value for name, value in bundle_info(view.bundle).items() if name != "bundle"})


def router(service: Service, bundle) -> APIRouter:
    """GET /info of the bundle that the dependency `bundle` gives."""
    routes = APIRouter()
    settings = service.settings

    @routes.get("/info", response_model=Info,
                summary="The bundle, the workers, the limits and the dream config's defaults")
    async def info(view: BundleView = Depends(bundle)) -> Info:
        return {"bundle": public_info(view), "name": view.name, "identity": view.identity,
                "workers": service.workers_info(), "features_per_call": settings.features_per_call,
                "limits": vars(settings.limits), "api_key_required": settings.api_key is not None,
                "key_on_reads": settings.key_on_reads and settings.api_key is not None,
                "dream_config": DreamConfig().model_dump(mode="json"),
                "dream_config_schema": DreamConfig.model_json_schema()}

    return routes


def served(service: Service) -> APIRouter:
    """GET /bundles: the served bundles (read like the other GETs)."""
    routes = APIRouter()

    @routes.get("/bundles", response_model=list[BundleOut],
                summary="The served bundles, the default one (what the routes without /bundles/{name} mean) first")
    async def bundles() -> list[BundleOut]:
        listed = []
        for position, view in enumerate(service.views.values()):
            info = public_info(view)
            transcoder, maxima = info["transcoder"], info["maxima"] or {}
            listed.append(BundleOut(name=view.name, default=position == 0, identity=view.identity,
                                    model=info["model"]["name"], transcoder=transcoder["kind"],
                                    layers=transcoder["layers"], features_per_layer=transcoder["features_per_layer"],
                                    maxima_tokens=maxima.get("tokens")))
        return listed

    return routes


def probes(service: Service) -> APIRouter:
    """GET /health, open without a key (orchestrators' probes)."""
    routes = APIRouter()

    @routes.get("/health", summary="200 when serving; 503 with the reasons when degraded (no worker ready, a worker "
                "loop restarting, the job store not answering); workers ready, jobs per status",
                response_model=Health, responses={503: {"model": Health, "description": "degraded, with `reasons`"}})
    async def health() -> JSONResponse:
        workers = service.workers_info()
        ready = sum(worker["state"] == "ready" for worker in workers)
        reasons = [] if ready else ["no worker is ready"]
        reasons += [f"worker {index}: loop restarting after {error}"
                    for index, error in sorted(service.scheduler.loop_errors.items())]
        try:
            jobs = await in_thread(service.store.counts)
        except Exception as error:  # noqa: BLE001 - any store failure is the answer here
            jobs, reasons = None, [*reasons, f"the job store does not answer: {type(error).__name__}"]
        body = Health(status="degraded" if reasons else "ok", reasons=reasons, workers_ready=ready,
                      workers=len(workers), jobs=jobs)
        return JSONResponse(body.model_dump(), status_code=503 if reasons else 200)

    return routes


def metrics(service: Service) -> APIRouter:
    """GET /metrics (not under /v1, not in the OpenAPI document): Prometheus text format."""
    routes = APIRouter()

    @routes.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:  # read in a thread: the store answers the counts
        return Response(await in_thread(generate_latest, service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return routes
