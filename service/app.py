"""The HTTP API under /v1 (OpenAPI at /docs): dreams and batches as jobs (polled, or followed as server-sent
events), feature pages, browsing, similar features, activations of user texts, feature search, health and info;
the web pages at / (service/pages.py), which call it; Prometheus metrics at /metrics. `create_app()` reads the
settings from the environment; run it with `dreaming serve` (uvicorn). Errors are {"detail": "..."} naming what
was wrong and what is allowed: 401 missing API key, 404 unknown job/batch/feature (with the valid range), 409
nothing to continue or cancel, 413 request too large, 422 malformed, out-of-bounds or too costly input, 503 busy.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dreaming.activation import TextActivation
from dreaming.bundle import bundle_info
from dreaming.dream_cache import max_key
from dreaming.epo import DreamConfig
from dreaming.features import Feature, parse_feature
from service.access import BodyLimit, api_key_dependency, one_error_shape
from service.bundle_view import SORTS, Busy, UnknownFeature
from service.logs import service_log
from service.pages import add_pages
from service.runtime import Service
from service.schemas import (ActivationsRequest, BatchList, BatchOut, BatchRequest, BatchSummary, DreamRequest,
                             FeatureList, FeaturePage, Health, Info, JobList, JobOut, JobSummary, SearchHit,
                             SearchRequest, SimilarFeature)
from service.settings import Settings
from service.store import CANCELLED, DONE, ENDED, FAILED, QUEUED, RUNNING, Batch, Job

MAX_OFFSET = 10**9  # listings: past any real table, and within the database's integers
BUSY_RETRY_AFTER = 2  # seconds a client refused for a busy model is told to wait
EVENT_EVERY = 0.5  # seconds between two looks at a followed job or batch (an event is sent only on a change)
DISCONNECT_CHECK = 0.25  # seconds between two looks at whether the client of an interactive call is still there


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


def job_fields(job: Job) -> dict:
    """What every view of a job shows: its id, feature, status, attempts, progress while it runs, error."""
    return {"job_id": job.id, "feature": job.feature, "status": job.status, "attempts": job.attempts,
            "progress": (job.progress or None) if job.status == RUNNING else None, "error": job.error}


def job_out(job: Job) -> JobOut:
    return JobOut(**job_fields(job), result=job.result)


def job_summary(job: Job) -> JobSummary:
    best = (job.result or {}).get("best_fluent") or {}
    return JobSummary(**job_fields(job), best_fluent_fraction_of_max=best.get("fraction_of_max"),
                      best_fluent_prompt=best.get("prompt"))


def counts(jobs: list[Job]) -> dict[str, int]:
    return {status: sum(job.status == status for job in jobs) for status in (QUEUED, RUNNING, *ENDED)}


CSV_COLUMNS = ["feature", "status", "best_fluent_fraction_of_max", "best_fluent_activation",
               "best_fluent_cross_entropy", "best_fluent_prompt", "dataset_max", "iterations", "error", "job_id"]


def batch_csv(jobs: list[Job]) -> str:
    """One line per job: its best fluent prompt's figures (empty until done)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS)
    writer.writeheader()
    for job in jobs:
        result = job.result or {}
        best = result.get("best_fluent") or {}
        writer.writerow({"feature": job.feature, "status": job.status, "job_id": job.id, "error": job.error or "",
                         "best_fluent_fraction_of_max": best.get("fraction_of_max", ""),
                         "best_fluent_activation": best.get("activation", ""),
                         "best_fluent_cross_entropy": best.get("cross_entropy", ""),
                         "best_fluent_prompt": best.get("prompt", ""), "dataset_max": result.get("dataset_max", ""),
                         "iterations": result.get("iterations", "")})
    return out.getvalue()


def merge_dreams(served: list[dict], local: list[dict]) -> list[dict]:
    """The service's stored results, then the bundle's cached ones (`dreaming dream`) that are not the same dream:
    one result per (config, dataset max), the yardstick it was scored against."""
    def key(dream: dict) -> tuple[str, str]:
        return json.dumps(dream["config"], sort_keys=True), max_key(dream.get("dataset_max"))

    seen = {key(dream) for dream in served}
    return served + [dream for dream in local if key(dream) not in seen]


def batch_status(jobs: list[Job]) -> str:
    """done when every job is; else, once none is pending, cancelled if one was, failed if one failed; else running."""
    statuses = {job.status for job in jobs}
    if statuses == {DONE}:
        return DONE
    if statuses <= set(ENDED):
        return CANCELLED if CANCELLED in statuses else FAILED
    return RUNNING


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    service_log()
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

    app.add_exception_handler(RequestValidationError, one_error_shape)

    @app.exception_handler(Busy)
    async def busy(request, error: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": str(BUSY_RETRY_AFTER)})
    app.state.service = service
    keyed = [Depends(api_key_dependency(settings.api_key))]
    # with DREAMING_KEY_ON_READS, reads need the key too; /v1/health stays open for orchestrators' probes
    v1 = APIRouter(prefix="/v1", dependencies=keyed if settings.key_on_reads else [])
    probes = APIRouter(prefix="/v1")

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

    def count_tokens(texts: list[str]) -> int:
        return sum(map(len, service.view.explorer.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]))

    async def check_tokens(texts: list[str]) -> None:
        """422 before the model is asked when one request's texts are more tokens than it may run."""
        tokens = await in_thread(count_tokens, texts)
        if tokens > limits.max_request_tokens:
            raise HTTPException(422, f"request too long: {tokens} tokens in all, at most {limits.max_request_tokens} "
                                     "per request; split the texts over several requests")

    async def in_thread(method, *args):  # store calls never block the event loop
        return await asyncio.to_thread(method, *args)

    async def check_budget(config: DreamConfig, features: int) -> None:
        """422 before anything is queued when a request asks for more work than one job or batch may."""
        cost = config.cost()
        what = "iterations × population × children × seeds × longest prompt"
        if cost > limits.max_job_cost:
            raise HTTPException(422, f"dream config too costly: {cost:,} ({what}), at most {limits.max_job_cost:,} "
                                     "per job; lower iterations, population, children or seeds")
        if cost * features > limits.max_batch_cost:
            raise HTTPException(422, f"batch too costly: {features} features × {cost:,} ({what}) = "
                                     f"{cost * features:,}, at most {limits.max_batch_cost:,} per batch")
        if config.template not in (None, "chat"):
            tokens = await in_thread(count_tokens, [config.template.replace("{prompt}", "")])
            if tokens > limits.max_template_tokens:
                raise HTTPException(422, f"template too long: {tokens} tokens, at most "
                                         f"{limits.max_template_tokens}")

    async def existing_job(job_id: str) -> Job:
        job = await in_thread(service.store.job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    async def existing_batch(batch_id: str) -> Batch:
        batch = await in_thread(service.store.batch, batch_id)
        if batch is None:
            raise HTTPException(404, f"no batch {batch_id!r}")
        return batch

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
        await check_budget(config, 1)
        job = await in_thread(service.store.submit, service.view.identity, str(feature),
                              config.model_dump(mode="json"), dataset_max)
        service.scheduler.wake()
        return job_out(job)

    @v1.get("/jobs", response_model=JobList, summary="This bundle's jobs, newest first, paginated, of one status "
            "or all (without results)")
    async def list_jobs(status: Literal[QUEUED, RUNNING, DONE, FAILED, CANCELLED] | None = None,
                        offset: int = Query(0, ge=0, le=MAX_OFFSET),
                        limit: int = Query(50, ge=1, le=500)) -> JobList:
        total, jobs = await in_thread(service.store.list_jobs, service.view.identity, status, offset, limit)
        return JobList(total=total, offset=offset, limit=limit, jobs=[job_summary(job) for job in jobs])

    @v1.get("/batches", response_model=BatchList, summary="The batches, newest first, paginated")
    async def list_batches(offset: int = Query(0, ge=0, le=MAX_OFFSET),
                           limit: int = Query(50, ge=1, le=500)) -> BatchList:
        total, batches = await in_thread(service.store.list_batches, offset, limit)
        return BatchList(total=total, offset=offset, limit=limit, batches=[
            {"batch_id": batch.id, "created": batch.created, "jobs": len(batch.job_ids)} for batch in batches])

    @v1.get("/jobs/{job_id}", response_model=JobOut, summary="A job's status, progress (with ETA) and result")
    async def get_job(job: Job = Depends(existing_job)) -> JobOut:
        return job_out(job)

    @v1.post("/batches", response_model=BatchOut, dependencies=keyed,
             summary="Dream a list of features under one config (one job each, coalesced with existing ones)")
    async def submit_batch(request: BatchRequest) -> BatchOut:
        if len(request.features) > limits.max_batch_features:
            raise HTTPException(422, f"too many features: {len(request.features)}, at most "
                                     f"{limits.max_batch_features} per batch")
        features = list(dict.fromkeys(str(feature_or_error(text)) for text in request.features))
        await check_budget(request.config, len(features))
        batch = await in_thread(service.store.submit_batch, service.view.identity, features,
                                request.config.model_dump(mode="json"),
                                [service.view.dataset_max(feature) for feature in features])
        service.scheduler.wake()
        return await batch_out(batch)

    @v1.get("/batches/{batch_id}", response_model=BatchOut, summary="A batch's jobs and overall status")
    async def get_batch(batch: Batch = Depends(existing_batch)) -> BatchOut:
        return await batch_out(batch)

    async def batch_out(batch: Batch) -> BatchOut:
        jobs = await in_thread(service.store.jobs, batch.job_ids)
        return BatchOut(batch_id=batch.id, status=batch_status(jobs), counts=counts(jobs),
                        jobs=[job_out(j) for j in jobs])

    async def changes(look, finished) -> AsyncIterator[ServerSentEvent]:
        """An event each time `look()` gives something new, until `finished` of it; the client may leave early."""
        last = None
        while True:
            current = await look()
            if current != last:
                yield ServerSentEvent(data=current.model_dump(mode="json"), event="update")
                last = current
            if finished(current):
                return
            await asyncio.sleep(EVENT_EVERY)

    @v1.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
            summary="A job's progress as server-sent events (`update`: the job, as GET /jobs/{id}) until it ends")
    async def job_events(job: Job = Depends(existing_job)) -> AsyncIterator[ServerSentEvent]:
        async def look() -> JobOut:
            return job_out(await in_thread(service.store.job, job.id))

        async for event in changes(look, lambda out: out.status in ENDED):
            yield event

    async def summary(batch: Batch) -> BatchSummary:
        jobs = await in_thread(service.store.jobs, batch.job_ids)
        return BatchSummary(batch_id=batch.id, status=batch_status(jobs), counts=counts(jobs),
                            jobs=[job_summary(job) for job in jobs])

    @v1.get("/batches/{batch_id}/summary", response_model=BatchSummary,
            summary="A batch without its results: per job its status, progress and best fluent % of max")
    async def batch_summary(batch: Batch = Depends(existing_batch)) -> BatchSummary:
        return await summary(batch)

    @v1.get("/batches/{batch_id}/events", response_class=EventSourceResponse,
            summary="A batch's summary as server-sent events (`update`) each time it changes, until it ends")
    async def batch_events(batch: Batch = Depends(existing_batch)) -> AsyncIterator[ServerSentEvent]:
        async for event in changes(lambda: summary(batch), lambda out: out.status in ENDED):
            yield event

    @v1.delete("/jobs/{job_id}", response_model=JobOut, dependencies=keyed,
               summary="Cancel a job: a queued one at once; a running one stops within seconds, keeping its best so "
                       "far (result.stopped = cancelled); 409 when it has already ended")
    async def cancel_job(job: Job = Depends(existing_job)) -> JobOut:
        if job.status in ENDED:
            raise HTTPException(409, f"job {job.id} has already ended ({job.status}): nothing to cancel")
        (job,) = await in_thread(service.store.cancel, [job.id])
        return job_out(job)

    @v1.delete("/batches/{batch_id}", response_model=BatchSummary, dependencies=keyed,
               summary="Cancel every job of a batch that has not ended (as DELETE /jobs/{id} does for one)")
    async def cancel_batch(batch: Batch = Depends(existing_batch)) -> BatchSummary:
        await in_thread(service.store.cancel, batch.job_ids)
        return await summary(batch)

    @v1.get("/batches/{batch_id}/results", summary="A batch's results to download: every job as JSON, or one CSV "
                                                   "line per feature with its best fluent prompt",
            responses={200: {"model": list[JobOut], "content": {"text/csv": {"schema": {"type": "string"}}}}})
    async def batch_results(batch: Batch = Depends(existing_batch),
                            format: Literal["json", "csv"] = "json") -> Response:
        jobs = await in_thread(service.store.jobs, batch.job_ids)
        name = f"batch-{batch.id}.{format}"
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        if format == "csv":
            return Response(batch_csv(jobs), media_type="text/csv", headers=headers)
        body = json.dumps([job_out(job).model_dump(mode="json") for job in jobs])
        return Response(body, media_type="application/json", headers=headers)

    @v1.get("/features", response_model=FeatureList, summary="Browse the features: filter by layer, live (ever "
            "active), dense, has dreams; in feature order or by density or dataset max; paginated")
    async def list_features(layer: int | None = Query(None, ge=0), live: bool = False, dense: bool | None = None,
                            dreams: bool = False, sort: Literal[tuple(SORTS)] = "index",
                            offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500)) -> dict:
        if layer is not None and layer >= service.view.n_layers:
            raise HTTPException(422, f"unknown layer {layer}: layer must be in 0..{service.view.n_layers - 1}")
        with_dreams = await in_thread(features_with_dreams)
        return service.view.browse(with_dreams, layer, live, dense, dreams, sort, offset, limit)

    def features_with_dreams() -> set[str]:
        return service.store.features_with_results(service.view.identity) | service.view.explorer.features_with_dreams()

    @v1.get("/features/{layer}/{index}/similar", response_model=list[SimilarFeature],
            summary="The features whose decoder vectors (normalised, concatenated over every output layer) have "
                    "the highest cosine with this one's")
    async def similar(layer: int, index: int, top: int = Query(10, ge=1, le=100)) -> list[dict]:
        return await service.view.similar(known(Feature(layer, index)), top)

    @v1.get("/features/{layer}/{index}", response_model=FeaturePage,
            summary="Dataset maxima, cached dreams (the service's and those made with `dreaming dream` on the "
                    "bundle) and the comparison of a feature")
    async def get_feature(layer: int, index: int, request: Request) -> FeaturePage:
        feature = known(Feature(layer, index))
        served = await in_thread(service.store.results_for, service.view.identity, str(feature))
        local = await in_thread(service.view.explorer.dreams, feature)  # made with `dreaming dream` on this bundle
        # the page lists results scored against another dataset max (an earlier maxima build) as stale
        return await unless_disconnected(request, service.view.page(feature, merge_dreams(served, local)))

    @v1.post("/activations", dependencies=keyed, response_model=list[TextActivation],
             summary="A feature's activation on each text, per token and at its max, as % of the dataset max")
    async def activations(request: ActivationsRequest, http: Request) -> list[dict]:
        feature = feature_or_error(request.feature)
        if len(request.texts) > limits.max_texts:
            raise HTTPException(422, f"too many texts: {len(request.texts)}, at most {limits.max_texts}")
        for text in request.texts:
            check_text(text)
        if request.template is not None:
            check_text(request.template)
        await check_tokens(request.texts + ([request.template] if request.template else []))
        try:
            return await unless_disconnected(http, service.view.activations(feature, request.texts, request.template))
        except ValueError as error:  # empty text, too many tokens, a prompt that merges with the template
            raise HTTPException(422, str(error)) from None

    @v1.post("/search", dependencies=keyed, response_model=list[SearchHit], summary="The features most active on a text, by % of their dataset max")
    async def search(request: SearchRequest, http: Request) -> list[SearchHit]:
        check_text(request.text)
        if request.top > limits.max_search_top:
            raise HTTPException(422, f"top too large: {request.top}, at most {limits.max_search_top}")
        await check_tokens([request.text])
        try:
            return await unless_disconnected(http, service.view.search(request.text, request.top))
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    @probes.get("/health", summary="200 when serving; 503 with the reasons when degraded (no worker ready, a worker loop "
            "restarting, the job store not answering); workers ready, jobs per status",
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

    @v1.get("/info", response_model=Info, summary="The served bundle, the workers, the limits and the dream config's defaults")
    async def info() -> Info:
        # what the bundle is, without where it or its model lives on the server's disk
        bundle = {name: value for name, value in bundle_info(service.view.bundle).items() if name != "bundle"}
        source = bundle["model"]["source"]
        bundle["model"]["source"] = Path(source).name if Path(source).is_absolute() else source
        return {"bundle": bundle, "identity": service.view.identity,
                "workers": service.workers_info(), "features_per_call": settings.features_per_call,
                "limits": vars(limits), "api_key_required": settings.api_key is not None,
                "key_on_reads": settings.key_on_reads and settings.api_key is not None,
                "dream_config": DreamConfig().model_dump(mode="json"),
                "dream_config_schema": DreamConfig.model_json_schema()}

    @app.get("/metrics", include_in_schema=False, dependencies=keyed if settings.key_on_reads else [])
    async def metrics() -> Response:  # Prometheus text format, read in a thread (the store answers the counts)
        return Response(await in_thread(generate_latest, service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(v1)
    app.include_router(probes)
    add_pages(app)
    return app
