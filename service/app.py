"""The HTTP API under /v1 (OpenAPI at /docs): dreams and batches as jobs, feature pages, activations of user
texts, feature search, health and info. `create_app()` reads the settings from the environment; run it with
`dreaming serve` (uvicorn). Errors are 4xx with a `detail` naming what was wrong and what is allowed:
401 missing API key, 404 unknown job/batch/feature (with the valid range), 413 request too large,
422 malformed or out-of-bounds input.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, HTTPException

from dreaming.activation import TextActivation
from dreaming.cli import bundle_info
from dreaming.dream_cache import max_key
from dreaming.epo import DreamConfig
from dreaming.features import Feature, parse_feature
from service.access import BodyLimit, api_key_dependency
from service.bundle_view import UnknownFeature
from service.runtime import Service
from service.schemas import ActivationsRequest, BatchOut, BatchRequest, DreamRequest, JobOut, SearchRequest
from service.settings import Settings
from service.store import DONE, FAILED, RUNNING, Job


def job_out(job: Job) -> JobOut:
    return JobOut(job_id=job.id, feature=job.feature, status=job.status, attempts=job.attempts,
                  progress=(job.progress or None) if job.status == RUNNING else None, error=job.error,
                  result=job.result)


def merge_dreams(served: list[dict], local: list[dict]) -> list[dict]:
    """The service's stored results, then the bundle's cached ones (`dreaming dream`) that are not the same dream:
    one result per (config, dataset max), the yardstick it was scored against."""
    def key(dream: dict) -> tuple[str, str]:
        return json.dumps(dream["config"], sort_keys=True), max_key(dream.get("dataset_max"))

    seen = {key(dream) for dream in served}
    return served + [dream for dream in local if key(dream) not in seen]


def batch_status(jobs: list[Job]) -> str:
    statuses = {job.status for job in jobs}
    if statuses == {DONE}:
        return DONE
    return FAILED if statuses <= {DONE, FAILED} else RUNNING


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    log = logging.getLogger("dreaming.service")
    if not log.handlers:  # uvicorn configures only its own loggers
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    limits = settings.limits
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="dreaming", version="0.1.0", lifespan=lifespan,
                  description="Fluent dreaming for transcoder features: prompts that activate a feature, beside its "
                              "dataset maxima, as % of the dataset max.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.state.service = service
    keyed = [Depends(api_key_dependency(settings.api_key))]
    v1 = APIRouter(prefix="/v1")

    def known(feature: Feature) -> Feature:
        try:
            return service.view.check(feature)
        except UnknownFeature as error:
            raise HTTPException(404, str(error)) from None

    def feature_or_error(text: str) -> Feature:
        try:
            return known(parse_feature(text))
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    def check_text(text: str) -> None:
        if len(text) > limits.max_text_chars:
            raise HTTPException(422, f"text too long: {len(text)} characters, at most {limits.max_text_chars}")

    async def in_thread(method, *args):  # store calls never block the event loop
        return await asyncio.to_thread(method, *args)

    @v1.post("/dreams", response_model=JobOut, dependencies=keyed,
             summary="Dream one feature: the cached result at once, else a job to poll")
    async def submit_dream(request: DreamRequest) -> JobOut:
        feature = feature_or_error(request.feature)
        dataset_max, config = service.view.dataset_max(str(feature)), request.config
        if request.more:  # the job of the longer run; the scheduler continues the stored one
            base = await in_thread(service.scheduler.longest_stored_run, str(feature), config, dataset_max)
            if base is None:
                raise HTTPException(409, f"nothing to continue for {feature}: no stored dream of this config (but "
                                         "its iterations, seconds and plateau); submit it without `more` first")
            config = config.model_copy(update={"iterations": base.config.iterations + config.iterations})
        job = await in_thread(service.store.submit, service.view.identity, str(feature),
                              config.model_dump(mode="json"), dataset_max)
        service.scheduler.wake()
        return job_out(job)

    @v1.get("/jobs/{job_id}", response_model=JobOut, summary="A job's status, progress (with ETA) and result")
    async def get_job(job_id: str) -> JobOut:
        job = await in_thread(service.store.job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job_out(job)

    @v1.post("/batches", response_model=BatchOut, dependencies=keyed,
             summary="Dream a list of features under one config (one job each, coalesced with existing ones)")
    async def submit_batch(request: BatchRequest) -> BatchOut:
        if len(request.features) > limits.max_batch_features:
            raise HTTPException(422, f"too many features: {len(request.features)}, at most "
                                     f"{limits.max_batch_features} per batch")
        features = list(dict.fromkeys(str(feature_or_error(text)) for text in request.features))
        batch = await in_thread(service.store.submit_batch, service.view.identity, features,
                                request.config.model_dump(mode="json"),
                                [service.view.dataset_max(feature) for feature in features])
        service.scheduler.wake()
        return await get_batch(batch.id)

    @v1.get("/batches/{batch_id}", response_model=BatchOut, summary="A batch's jobs and overall status")
    async def get_batch(batch_id: str) -> BatchOut:
        batch = await in_thread(service.store.batch, batch_id)
        if batch is None:
            raise HTTPException(404, f"no batch {batch_id!r}")
        jobs = await in_thread(service.store.jobs, batch.job_ids)
        counts = {status: sum(job.status == status for job in jobs) for status in ("queued", RUNNING, DONE, FAILED)}
        return BatchOut(batch_id=batch.id, status=batch_status(jobs), counts=counts, jobs=[job_out(j) for j in jobs])

    @v1.get("/features/{layer}/{index}", summary="Dataset maxima, cached dreams (the service's and those made with "
                                                  "`dreaming dream` on the bundle) and the comparison of a feature")
    async def get_feature(layer: int, index: int) -> dict:
        feature = known(Feature(layer, index))
        served = await in_thread(service.store.results_for, service.view.identity, str(feature))
        local = await in_thread(service.view.explorer.dreams, feature)  # made with `dreaming dream` on this bundle
        # the page lists results scored against another dataset max (an earlier maxima build) as stale
        return await service.view.page(feature, merge_dreams(served, local))

    @v1.post("/activations", dependencies=keyed, response_model=list[TextActivation],
             summary="A feature's activation on each text, per token and at its max, as % of the dataset max")
    async def activations(request: ActivationsRequest) -> list[dict]:
        feature = feature_or_error(request.feature)
        if len(request.texts) > limits.max_texts:
            raise HTTPException(422, f"too many texts: {len(request.texts)}, at most {limits.max_texts}")
        for text in request.texts:
            check_text(text)
        if request.template is not None:
            check_text(request.template)
        try:
            return await service.view.activations(feature, request.texts, request.template)
        except ValueError as error:  # empty text, too many tokens, a prompt that merges with the template
            raise HTTPException(422, str(error)) from None

    @v1.post("/search", dependencies=keyed, summary="The features most active on a text, by % of their dataset max")
    async def search(request: SearchRequest) -> list[dict]:
        check_text(request.text)
        if request.top > limits.max_search_top:
            raise HTTPException(422, f"top too large: {request.top}, at most {limits.max_search_top}")
        try:
            return await service.view.search(request.text, request.top)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    @v1.get("/health", summary="Liveness, workers ready, jobs per status")
    async def health() -> dict:
        workers = service.workers_info()
        ready = sum("pid" in worker for worker in workers)
        return {"status": "ok" if ready else "degraded", "workers_ready": ready, "workers": len(workers),
                "jobs": await in_thread(service.store.counts)}

    @v1.get("/info", summary="The served bundle, the workers, the limits and the dream config's defaults")
    async def info() -> dict:
        return {"bundle": bundle_info(service.view.bundle), "identity": service.view.identity,
                "workers": service.workers_info(), "features_per_call": settings.features_per_call,
                "limits": vars(limits), "api_key_required": settings.api_key is not None,
                "dream_config": DreamConfig().model_dump(mode="json"),
                "dream_config_schema": DreamConfig.model_json_schema()}

    app.include_router(v1)
    return app
