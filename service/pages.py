"""The web pages, served by the API's own process: static HTML, scripts and styles from `service/web/` (no build
step, nothing from a CDN), which call the JSON API under /v1 from the browser.

    /                               search a text for its most active features; browse every feature
    /features/{layer}/{index}       a feature's dashboard: dataset maxima beside its dreams
    /batch                          dream a list of features and follow the batch

Each page is about one served bundle: `?bundle=NAME` in its address (the default bundle when absent), which its
links and API calls carry (service/web/common.js); the home page has a picker when several are served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"


def add_pages(app: FastAPI) -> None:
    def page(name: str):
        async def serve() -> FileResponse:
            return FileResponse(WEB / name, headers={"Cache-Control": "no-cache"})
        return serve

    app.get("/", include_in_schema=False)(page("index.html"))
    app.get("/features/{layer}/{index}", include_in_schema=False)(page("feature.html"))
    app.get("/batch", include_in_schema=False)(page("batch.html"))
    app.mount("/static", StaticFiles(directory=WEB), name="static")
