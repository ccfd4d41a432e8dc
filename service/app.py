"""The HTTP service: the JSON API under /v1 (OpenAPI at /docs; the routers are in service/routes/), the web pages
at / (service/pages.py), which call it, and Prometheus metrics at /metrics. Several bundles can be served: the routes
under /v1 mean the first, those under /v1/bundles/{name} the bundle named. `create_app()` reads the settings from
the environment; run it with `dreaming serve` (uvicorn). Errors are {"detail": "..."} naming what was wrong and what
is allowed: 401 missing API key, 404 unknown bundle/job/batch/feature (with the valid range), 409 nothing to
continue or cancel, 413 request too large, 422 malformed, out-of-bounds or too costly input, 503 busy.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.access import BodyLimit, one_error_shape
from service.bundle_view import Busy
from service.logs import service_log
from service.pages import add_pages
from service.routes import add_routes
from service.runtime import Service
from service.settings import Settings

BUSY_RETRY_AFTER = 2  # seconds a client refused for a busy model is told to wait


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    service_log()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="dreaming", version="0.1.0", lifespan=lifespan,
                  description="Fluent dreaming for transcoder features: prompts that activate a feature, beside its "
                              "dataset maxima, as % of the dataset max.")
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_request_bytes)
    app.add_exception_handler(RequestValidationError, one_error_shape)

    @app.exception_handler(Busy)
    async def busy(request, error: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": str(BUSY_RETRY_AFTER)})

    app.state.service = service
    add_routes(app, service)
    add_pages(app)
    return app
