"""The JSON API's routers, one module per resource. Each bundle router is mounted twice: under /v1, where it means
the default bundle (the first served), and under /v1/bundles/{bundle}, the bundle named; one dependency
(`common.bundle_dependencies`) resolves the bundle either way."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from service.access import api_key_dependency
from service.routes import dreams, features, interactive, ops
from service.routes.common import SCOPED, bundle_dependencies
from service.runtime import Service


def add_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    keyed = [Depends(api_key_dependency(settings.api_key))]
    reads = keyed if settings.key_on_reads else []  # with DREAMING_KEY_ON_READS, every GET needs the key too
    first, named = bundle_dependencies(service, [name for name, _ in settings.bundles])
    for prefix, bundle in (("/v1", first), ("/v1" + SCOPED, named)):
        for routes in (features.router(service, bundle), dreams.router(service, bundle, keyed),
                       interactive.router(service, bundle, keyed), ops.router(service, bundle)):
            app.include_router(routes, prefix=prefix, dependencies=reads)
    app.include_router(ops.served(service), prefix="/v1", dependencies=reads)
    app.include_router(ops.probes(service), prefix="/v1")  # /v1/health stays open for orchestrators' probes
    app.include_router(ops.metrics(service), dependencies=reads)
