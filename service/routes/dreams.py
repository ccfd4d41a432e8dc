"""Dream routes: dreams and batches become jobs of the bundle (coalesced by the store), followed by polling or as
server-sent events, listed, cancelled, and a batch's results downloaded as JSON or CSV. A job or batch of another
bundle is not found here (404)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from dreaming.engine import DreamConfig, continuation
from service.bundle_view import BundleView
from service.routes.common import MAX_OFFSET, feature_or_error, in_thread
from service.runtime import Service
from service.schemas import (BatchList, BatchOut, BatchRequest, BatchSummary, DreamRequest, JobList, JobOut,
                             JobSummary)
from service.store import CANCELLED, DONE, ENDED, FAILED, QUEUED, RUNNING, Batch, Job

EVENT_EVERY = 0.5  # seconds between two looks at a followed job or batch (an event is sent only on a change)
BEST = ("best_fluent", "best_novel")  # a result's best prompts, each summed up by these fields of its own
BEST_FIELDS = ("fraction_of_max", "fraction_of_length_matched", "prompt_tokens", "activation", "cross_entropy",
               "prompt")  # both yardsticks: the dataset max, and the best dataset excerpt of the prompt's length
CSV_COLUMNS = ["feature", "status", *(f"{best}_{field}" for best in BEST for field in BEST_FIELDS), "dataset_max",
               "yardstick", "iterations", "error", "job_id"]


def job_fields(job: Job) -> dict:
    """What every view of a job shows: its id, feature, yardstick, status, attempts, progress while it runs, error."""
    return {"job_id": job.id, "feature": job.feature, "dataset_max": job.dataset_max, "status": job.status,
            "attempts": job.attempts, "progress": (job.progress or None) if job.status == RUNNING else None,
            "error": job.error}


def job_out(job: Job) -> JobOut:
    return JobOut(**job_fields(job), result=job.result)


def best_prompts(result: dict, empty=None) -> dict:
    """`best_fluent_prompt`, `best_novel_fraction_of_max`, ...: the figures of a result's best prompts (`empty`
    where it has none)."""
    return {f"{best}_{field}": (result.get(best) or {}).get(field, empty) for best in BEST for field in BEST_FIELDS}


def job_summary(job: Job) -> JobSummary:
    result = job.result or {}
    return JobSummary(**job_fields(job), **best_prompts(result), yardstick=result.get("yardstick"))


def counts(jobs: list[Job]) -> dict[str, int]:
    return {status: sum(job.status == status for job in jobs) for status in (QUEUED, RUNNING, *ENDED)}


def batch_status(jobs: list[Job]) -> str:
    """done when every job is; else, once none is pending, cancelled if one was, failed if one failed; else running."""
    statuses = {job.status for job in jobs}
    if statuses == {DONE}:
        return DONE
    if statuses <= set(ENDED):
        return CANCELLED if CANCELLED in statuses else FAILED
    return RUNNING


def batch_csv(jobs: list[Job]) -> str:
    """One line per job: its best fluent and best novel prompts' figures (empty until done)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS)
    writer.writeheader()
    for job in jobs:
        result = job.result or {}
        writer.writerow({"feature": job.feature, "status": job.status, "job_id": job.id, "error": job.error or "",
                         **best_prompts(result, ""), "dataset_max": result.get("dataset_max", ""),
                         "yardstick": result.get("yardstick") or "", "iterations": result.get("iterations", "")})
    return out.getvalue()


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


def router(service: Service, bundle, keyed: list) -> APIRouter:
    """The dream, job and batch routes of the bundle that the dependency `bundle` gives; `keyed`: the API key
    check of the routes that change something."""
    routes = APIRouter()
    limits = service.settings.limits

    async def check_budget(view: BundleView, config: DreamConfig, features: int) -> None:
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
            tokens = await in_thread(view.count_tokens, [config.template.replace("{prompt}", "")])
            if tokens > limits.max_template_tokens:
                raise HTTPException(422, f"template too long: {tokens} tokens, at most "
                                         f"{limits.max_template_tokens}")

    async def existing_job(job_id: str, view: BundleView = Depends(bundle)) -> Job:
        job = await in_thread(service.store.job, job_id)
        if job is None or job.identity != view.identity:
            raise HTTPException(404, f"no job {job_id!r} of bundle {view.name!r}")
        return job

    async def existing_batch(batch_id: str, view: BundleView = Depends(bundle)) -> Batch:
        batch = await in_thread(service.store.batch, batch_id)
        if batch is None or batch.identity != view.identity:
            raise HTTPException(404, f"no batch {batch_id!r} of bundle {view.name!r}")
        return batch

    async def batch_out(batch: Batch) -> BatchOut:
        jobs = await in_thread(service.store.jobs, batch.job_ids)
        return BatchOut(batch_id=batch.id, status=batch_status(jobs), counts=counts(jobs),
                        jobs=[job_out(job) for job in jobs])

    async def summary(batch: Batch) -> BatchSummary:
        jobs = await in_thread(service.store.jobs, batch.job_ids)
        return BatchSummary(batch_id=batch.id, status=batch_status(jobs), counts=counts(jobs),
                            jobs=[job_summary(job) for job in jobs])

    @routes.post("/dreams", response_model=JobOut, dependencies=keyed,
                 summary="Dream one feature: the cached result at once, else a job to poll")
    async def submit_dream(request: DreamRequest, view: BundleView = Depends(bundle)) -> JobOut:
        feature = feature_or_error(view, request.feature)
        # a job is keyed and run under the config the feature is dreamed under (a positional feature's own template)
        dataset_max, config = view.dataset_max(str(feature)), view.explorer.dream_config(feature, request.config)
        if request.more:  # the job of the longer run; the scheduler continues the stored one
            base = await in_thread(service.scheduler.longest_stored_run, view.identity, str(feature), config,
                                   dataset_max)
            if base is None:
                raise HTTPException(409, f"nothing to continue for {feature}: no stored dream of this config (but "
                                         "its iterations, seconds and plateau); submit it without `more` first")
            config = continuation(base, config.iterations)
        await check_budget(view, config, 1)
        job = await in_thread(service.store.submit, view.identity, str(feature), config.model_dump(mode="json"),
                              dataset_max)
        service.scheduler.wake()
        return job_out(job)

    @routes.get("/jobs", response_model=JobList, summary="This bundle's jobs, newest first, paginated, of one "
                "status or all (without results)")
    async def list_jobs(status: Literal[QUEUED, RUNNING, DONE, FAILED, CANCELLED] | None = None,
                        offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500),
                        view: BundleView = Depends(bundle)) -> JobList:
        total, jobs = await in_thread(service.store.list_jobs, view.identity, status, offset, limit)
        return JobList(total=total, offset=offset, limit=limit, jobs=[job_summary(job) for job in jobs])

    @routes.get("/jobs/{job_id}", response_model=JobOut, summary="A job's status, progress (with ETA) and result")
    async def get_job(job: Job = Depends(existing_job)) -> JobOut:
        return job_out(job)

    @routes.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
                summary="A job's progress as server-sent events (`update`: the job, as GET /jobs/{id}) until it ends")
    async def job_events(job: Job = Depends(existing_job)) -> AsyncIterator[ServerSentEvent]:
        async def look() -> JobOut:
            return job_out(await in_thread(service.store.job, job.id))

        async for event in changes(look, lambda out: out.status in ENDED):
            yield event

    @routes.delete("/jobs/{job_id}", response_model=JobOut, dependencies=keyed,
                   summary="Cancel a job: a queued one at once; a running one stops within seconds, keeping its best "
                           "so far (result.stopped = cancelled); 409 when it has already ended")
    async def cancel_job(job: Job = Depends(existing_job)) -> JobOut:
        if job.status in ENDED:
            raise HTTPException(409, f"job {job.id} has already ended ({job.status}): nothing to cancel")
        (job,) = await in_thread(service.store.cancel, [job.id])
        return job_out(job)

    @routes.get("/batches", response_model=BatchList, summary="This bundle's batches, newest first, paginated")
    async def list_batches(offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500),
                           view: BundleView = Depends(bundle)) -> BatchList:
        total, batches = await in_thread(service.store.list_batches, view.identity, offset, limit)
        return BatchList(total=total, offset=offset, limit=limit, batches=[
            {"batch_id": batch.id, "created": batch.created, "jobs": len(batch.job_ids)} for batch in batches])

    @routes.post("/batches", response_model=BatchOut, dependencies=keyed,
                 summary="Dream a list of features under one config (one job each, coalesced with existing ones)")
    async def submit_batch(request: BatchRequest, view: BundleView = Depends(bundle)) -> BatchOut:
        if len(request.features) > limits.max_batch_features:
            raise HTTPException(422, f"too many features: {len(request.features)}, at most "
                                     f"{limits.max_batch_features} per batch")
        features = list(dict.fromkeys(str(feature_or_error(view, text)) for text in request.features))
        await check_budget(view, request.config, len(features))
        batch = await in_thread(service.store.submit_batch, view.identity, features,
                                [view.explorer.dream_config(feature, request.config).model_dump(mode="json")
                                 for feature in features],
                                [view.dataset_max(feature) for feature in features])
        service.scheduler.wake()
        return await batch_out(batch)

    @routes.get("/batches/{batch_id}", response_model=BatchOut, summary="A batch's jobs and overall status")
    async def get_batch(batch: Batch = Depends(existing_batch)) -> BatchOut:
        return await batch_out(batch)

    @routes.get("/batches/{batch_id}/summary", response_model=BatchSummary,
                summary="A batch without its results: per job its status, progress and best fluent % of max")
    async def batch_summary(batch: Batch = Depends(existing_batch)) -> BatchSummary:
        return await summary(batch)

    @routes.get("/batches/{batch_id}/events", response_class=EventSourceResponse,
                summary="A batch's summary as server-sent events (`update`) each time it changes, until it ends")
    async def batch_events(batch: Batch = Depends(existing_batch)) -> AsyncIterator[ServerSentEvent]:
        async for event in changes(lambda: summary(batch), lambda out: out.status in ENDED):
            yield event

    @routes.delete("/batches/{batch_id}", response_model=BatchSummary, dependencies=keyed,
                   summary="Cancel every job of a batch that has not ended (as DELETE /jobs/{id} does for one)")
    async def cancel_batch(batch: Batch = Depends(existing_batch)) -> BatchSummary:
        await in_thread(service.store.cancel, batch.job_ids)
        return await summary(batch)

    @routes.get("/batches/{batch_id}/results", summary="A batch's results to download: every job as JSON, or one "
                "CSV line per feature with its best fluent prompt",
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

    return routes
