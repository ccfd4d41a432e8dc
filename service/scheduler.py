"""The scheduler: an asyncio task per worker actor that takes queued jobs from the store and dreams them.

Each loop claims up to `features_per_call` queued jobs of one bundle with one identical config (the served bundles
take turns, and so do small requests and the jobs of batches too big for one call, so a large batch does not hold up
a single request), sends them to its actor in one `dream` call with the bundle's identity, polls the actor's progress
into the store while the call runs, and stores the results. A job whose search was stored before for fewer iterations
(`more`) continues the longest such run to the job's length (the engine runs the difference), which gives the result of
one run of that length.
If the actor dies (Ray restarts it) the jobs go back to the queue; a job whose worker died
`max_attempts` times, or that the engine rejected, fails with the error. A job cancelled while running stops its
call (the features of a call run in lockstep): it ends cancelled with its partial result, and the call's other
jobs go back to the queue without losing an attempt. Nothing here blocks the event loop:
store calls run in threads and object refs are awaited.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable

from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from dreaming.dream_cache import same_yardstick
from dreaming.engine import DreamConfig, DreamResult, longest_run
from service.store import Job, Store
from service.workers import Worker

log = logging.getLogger("dreaming.service")

POLL_SECONDS = 0.5  # progress polling while a call runs; also the idle wait between queue checks
MAX_BACKOFF = 30.0  # the longest wait before a worker's loop that raised is run again
CHECK_IDLE_EVERY = 5.0  # seconds between two checks that an idle actor is alive


class Scheduler:
    def __init__(self, store: Store, workers: list[Worker], dataset_max: dict[str, Callable[[str], float | None]],
                 features_per_call: int, max_attempts: int, call_seconds=None,
                 replace: Callable[[Worker], Worker] | None = None):
        """`dataset_max`: per served bundle identity, a feature's dataset max (the yardstick sent with a call)."""
        self.store, self.workers, self.dataset_max = store, workers, dataset_max
        self.features_per_call, self.max_attempts = features_per_call, max_attempts
        self.call_seconds = call_seconds  # a Prometheus histogram (labelled by outcome), or None
        self.replace = replace  # starts a new actor in the slot of one that is dead for good
        self._bulk_turn = False
        self._bundle_turn = 0  # the bundle whose queue is looked at first by the next claim
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self.describe: dict[int, dict] = {}  # worker index -> what its actor last said about itself
        self.loop_errors: dict[int, str] = {}  # worker index -> why its loop is restarting (cleared when it runs)

    def wake(self) -> None:
        """New jobs were queued: idle loops look at the queue now."""
        self._wake.set()

    async def run(self) -> None:
        """Serve with every worker until cancelled (or until every loop has ended: no `replace`)."""
        self._loops = [asyncio.create_task(self._supervise(worker)) for worker in self.workers]
        try:
            while not all(loop.done() for loop in self._loops):
                await asyncio.wait(self._loops)  # again if `add` started another meanwhile
        finally:
            for loop in self._loops:
                loop.cancel()

    def add(self, worker: Worker) -> None:
        """Serve with a worker started after `run` (a GPU that joined the cluster)."""
        self._loops.append(asyncio.create_task(self._supervise(worker)))

    async def _supervise(self, worker: Worker) -> None:
        """Run a worker's loop; when it raises (the store, Ray), log it, wait (doubling up to MAX_BACKOFF) and run
        it again, so one failure never stops a worker for good. `loop_errors` says why while it waits."""
        backoff = POLL_SECONDS
        while True:
            started = time.monotonic()
            try:
                await self._serve(worker)  # returns only when the actor is dead for good
                if self.replace is None:
                    return
                log.warning("worker %d is dead for good: a new actor in %.1f s", worker.index, backoff,
                            extra=about(worker))
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF)
                worker = self.replace(worker)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if time.monotonic() - started > 2 * MAX_BACKOFF:  # it had run well for a while: a fresh failure
                    backoff = POLL_SECONDS
                self.loop_errors[worker.index] = f"{type(error).__name__}: {error}"
                log.exception("worker %d: loop failed; restarting it in %.1f s", worker.index, backoff,
                              extra=about(worker))
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF)

    async def _serve(self, worker: Worker) -> None:
        while await self._until_ready(worker):
            checked = time.monotonic()
            while True:
                self._bulk_turn = not self._bulk_turn  # a big batch and single requests take turns
                jobs = await asyncio.to_thread(self._claim, self._bulk_turn)
                self.loop_errors.pop(worker.index, None)  # the store answers: the loop is healthy again
                if not jobs:
                    if time.monotonic() - checked > CHECK_IDLE_EVERY:  # an idle actor may have died meanwhile
                        checked = time.monotonic()
                        try:
                            self.describe[worker.index] = await worker.actor.describe.remote()
                        except RayActorError:
                            break  # restarting, or dead for good: _until_ready tells which
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                    except asyncio.TimeoutError:
                        pass
                    continue
                try:
                    if not await self._run(worker, jobs):
                        break  # the actor died: wait for its restart
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # never let one call stop the loop; its jobs fail with the reason
                    log.exception("worker %d: call failed", worker.index, extra=about(worker, jobs))
                    for job in jobs:  # the answer names no internals: the log has the traceback, by job id
                        await asyncio.to_thread(self.store.fail, job, f"internal error ({type(error).__name__}); "
                                                                      "the service log has the details")

    def _claim(self, bulk_first: bool) -> list[Job]:
        """One call's jobs, of one bundle: the bundles take turns (the first to look at moves on past the one that
        gave jobs), so a long queue of one bundle never starves another."""
        identities = list(self.dataset_max)
        first = self._bundle_turn
        for turn in range(len(identities)):
            at = (first + turn) % len(identities)
            jobs = self.store.claim(identities[at], self.features_per_call, self.max_attempts, bulk_first)
            if jobs:
                self._bundle_turn = (at + 1) % len(identities)
                return jobs
        return []

    async def _until_ready(self, worker: Worker) -> bool:
        """Wait until the actor answers (its constructor ran, after a start or a restart); False if it never will."""
        while True:
            try:
                self.describe[worker.index] = await worker.actor.describe.remote()
                return True
            except ActorUnavailableError:  # restarting
                await asyncio.sleep(POLL_SECONDS)
            except RayActorError as error:  # dead for good, e.g. its constructor raised
                log.error("worker %d is dead for good: %s", worker.index, error, extra=about(worker))
                self.describe[worker.index] = {"error": "the actor is dead for good (the service log says why)"}
                return False

    def longest_stored_run(self, identity: str, feature: str, config: DreamConfig, dataset_max: float | None,
                           below: int | None = None) -> DreamResult | None:
        """The stored result of `config`'s search of a feature of bundle `identity` (scored against `dataset_max`)
        that ran longest."""
        results = []
        for stored in self.store.results_for(identity, feature):
            try:  # a result stored in another shape cannot be continued (nor can an earlier engine's: longest_run)
                result = DreamResult.model_validate(stored)
            except ValidationError:
                continue
            if same_yardstick(result.dataset_max, dataset_max):
                results.append(result)
        return longest_run(results, config, below)

    async def _run(self, worker: Worker, jobs: list[Job]) -> bool:
        """One engine call for `jobs` (of one bundle and one config); False when the actor died during it."""
        identity, features = jobs[0].identity, [job.feature for job in jobs]
        log.info("worker %d: dreaming %s", worker.index, ",".join(features), extra=about(worker, jobs))
        # each job is scored against the yardstick it was keyed with (a job stored before jobs kept it: the max now)
        maxes = [job.dataset_max if job.dataset_max is not None else self.dataset_max[identity](job.feature)
                 for job in jobs]
        config = DreamConfig(**jobs[0].config)
        bases = [await asyncio.to_thread(self.longest_stored_run, identity, feature, config, dataset_max,
                                         config.iterations) for feature, dataset_max in zip(features, maxes)]
        previous = None  # the engine continues them all to the job's length, or runs every one afresh
        if all(bases) and len({base.config.iterations for base in bases}) == 1:
            previous = [base.model_dump(mode="json") for base in bases]
        call_id, incarnation = uuid.uuid4().hex, self.describe.get(worker.index, {}).get("incarnation")
        reply = worker.actor.dream.remote(call_id, identity, features, config.model_dump(mode="json"), maxes,
                                          previous)
        started = time.monotonic()

        def took(outcome: str) -> None:
            if self.call_seconds is not None:
                self.call_seconds.labels(outcome).observe(time.monotonic() - started)

        try:
            results = await self._results(worker, jobs, reply, call_id, incarnation)
        except RayActorError as error:
            took("worker died")
            await self._worker_died(worker, jobs, error)
            return False
        except RayTaskError as error:  # the engine raised: the same input would raise again
            took("failed")
            cause = error.cause if error.cause is not None else error
            log.error("worker %d: the engine rejected the call: %s", worker.index, cause, extra=about(worker, jobs))
            for job in jobs:
                await asyncio.to_thread(self.store.fail, job, f"{type(cause).__name__}: {cause}")
            return True
        took(results[0]["stopped"] if results else "done")
        log.info("worker %d: call ended (%s) in %.1f s", worker.index, results[0]["stopped"] if results else "done",
                 time.monotonic() - started, extra=about(worker, jobs))
        cancelled = await asyncio.to_thread(self.store.cancelling, [job.id for job in jobs])
        for job, result in zip(jobs, results):
            if job.id in cancelled:  # its partial best is kept, marked by result["stopped"]
                await asyncio.to_thread(self.store.finish_cancelled, job, result)
            elif result["stopped"] == "cancelled":  # stopped for another job of the call: its turn comes again
                await asyncio.to_thread(self.store.requeue, [job], False)
            else:
                await asyncio.to_thread(self.store.complete, job, result)
        return True

    async def _results(self, worker: Worker, jobs: list[Job], reply, call_id: str, incarnation: str | None
                       ) -> list[dict]:
        """The call's results, polling its progress meanwhile. When Ray says the actor is unavailable (a network
        blip or a restart, not a death) the actor is asked again until it answers: the same incarnation is still
        running the call, whose results are collected rather than run twice; a new one has lost it (raised)."""
        while True:
            call = asyncio.wrap_future(reply.future())
            try:
                while not call.done():
                    await asyncio.wait([call], timeout=POLL_SECONDS)
                    if not call.done():
                        await self._poll(worker, jobs)
                return call.result()
            except ActorUnavailableError:
                back = await self._until_ready(worker)
                if not back or self.describe[worker.index].get("incarnation") != incarnation:
                    raise
                log.warning("worker %d was unavailable during a call but is back: collecting the call",
                            worker.index, extra=about(worker, jobs))
                reply = worker.actor.collect.remote(call_id)

    async def _poll(self, worker: Worker, jobs: list[Job]) -> None:
        try:
            progress = await worker.actor.progress.remote()
        except RayActorError:
            return  # the call itself reports the death
        if progress:
            budget = jobs[0].config.get("seconds")  # the jobs of a call share one config
            await asyncio.to_thread(self.store.set_progress, [job.id for job in jobs], eta(progress, budget))
        if await asyncio.to_thread(self.store.cancelling, [job.id for job in jobs]):
            # the engine stops the whole call (its features run in lockstep): the others go back to the queue
            worker.actor.cancel.remote()

    async def _worker_died(self, worker: Worker, jobs: list[Job], error: Exception) -> None:
        log.warning("worker %d died during a call (%s); Ray restarts it", worker.index, type(error).__name__,
                    extra=about(worker, jobs))
        self.describe[worker.index] = {"restarting": True}
        cancelled = await asyncio.to_thread(self.store.cancelling, [job.id for job in jobs])
        for job in jobs:
            if job.id in cancelled:
                await asyncio.to_thread(self.store.finish_cancelled, job, None)
        jobs = [job for job in jobs if job.id not in cancelled]
        retry = [job for job in jobs if job.attempts < self.max_attempts]
        await asyncio.to_thread(self.store.requeue, retry)
        for job in jobs:
            if job.attempts >= self.max_attempts:
                await asyncio.to_thread(self.store.fail, job, f"the worker died {job.attempts} times on this job")


def about(worker: Worker, jobs: list[Job] | None = None) -> dict:
    """The structured fields of a log record about a worker and the jobs of its call (service/logs.py)."""
    fields = {"worker": worker.index}
    if jobs:
        fields.update(jobs=[job.id for job in jobs], features=[job.feature for job in jobs], attempt=jobs[0].attempts)
    return fields


def eta(progress: dict, budget_seconds: float | None = None) -> dict:
    """The actor's progress plus `eta_seconds`, extrapolated from the time per step so far, and no more than
    what is left of the config's time budget (`seconds`) when it has one."""
    done, total, seconds = progress["done"], progress["total"], progress["seconds"]
    remaining = seconds / done * (total - done) if done and total else None
    if budget_seconds is not None and remaining is not None:
        remaining = min(remaining, max(0.0, budget_seconds - seconds))
    return {**progress, "eta_seconds": remaining, "updated": time.time()}
