"""The scheduler without Ray: a worker loop whose store calls raise logs, backs off and runs again; an actor that
Ray calls unavailable mid-call is collected if it is the same incarnation, else its jobs go back to the queue."""

import asyncio
import concurrent.futures

from ray.exceptions import ActorUnavailableError

from dreaming.engine import DreamConfig
from service import scheduler as scheduler_module
from service.scheduler import Scheduler
from service.store import Job
from service.workers import Worker


class FlakyStore:
    """`claim` raises `failures` times (as a store that cannot answer), then finds no job."""

    def __init__(self, failures: int):
        self.failures, self.claims = failures, 0

    def claim(self, identity, limit, max_attempts=None, bulk_first=False):
        self.claims += 1
        if self.failures:
            self.failures -= 1
            raise RuntimeError("database is locked")
        return []


class ReadyActor:
    class describe:  # noqa: N801 - mirrors a Ray actor method: actor.describe.remote()
        @staticmethod
        async def remote():
            return {"pid": 1}


def test_a_worker_loop_that_raises_recovers(monkeypatch):
    monkeypatch.setattr(scheduler_module, "POLL_SECONDS", 0.01)
    store = FlakyStore(failures=3)
    scheduler = Scheduler(store, [Worker(0, ReadyActor(), 0, "test")], {"id": lambda feature: 1.0}, 2, 3)
    seen_errors = []

    async def run_until_recovered():
        task = asyncio.create_task(scheduler.run())
        for _ in range(500):
            await asyncio.sleep(0.01)
            if scheduler.loop_errors:
                seen_errors.append(dict(scheduler.loop_errors))
            if store.claims > 5:
                break
        assert not task.done(), "the scheduler stopped"
        task.cancel()

    asyncio.run(run_until_recovered())
    assert store.failures == 0 and store.claims > 5  # claimed again after each failure, then kept polling
    assert seen_errors and "RuntimeError: database is locked" in seen_errors[0][0]
    assert scheduler.loop_errors == {}  # healthy again: /health no longer reports it


class OneJobStore:
    """A queue of one job; records what the scheduler does with it."""

    def __init__(self, job):
        self.queue, self.completed, self.requeued, self.failed = [job], [], [], []

    def claim(self, identity, limit, max_attempts=None, bulk_first=False):
        jobs, self.queue = self.queue, []
        for job in jobs:
            job.attempts += 1
        return jobs

    def results_for(self, identity, feature):
        return []

    def cancelling(self, job_ids):
        return set()

    def set_progress(self, job_ids, progress):
        pass

    def complete(self, job, result):
        self.completed.append((job.id, result))

    def requeue(self, jobs, count_attempt=True):
        self.requeued += [job.id for job in jobs]

    def fail(self, job, error):
        self.failed.append((job.id, error))


class Reply:
    """An ObjectRef stand-in: `.future()` as Ray's."""

    def __init__(self, result=None, error=None):
        self._future = concurrent.futures.Future()
        if error is not None:
            self._future.set_exception(error)
        else:
            self._future.set_result(result)

    def future(self):
        return self._future


class BlinkingActor:
    """An actor whose reply to `dream` is lost (ActorUnavailableError, as on a network blip) while the call goes
    on in the same incarnation; `restarted` makes it come back as a new incarnation instead."""

    def __init__(self, restarted: bool):
        self.restarted, self.dream_calls, self.collected, self.incarnation = restarted, [], [], "first"
        actor = self

        class describe:  # noqa: N801 - actor.describe.remote(), as Ray's
            @staticmethod
            async def remote():
                return {"incarnation": actor.incarnation, "device": "cpu"}

        class dream:  # noqa: N801
            @staticmethod
            def remote(call_id, identity, features, config, maxes, previous):
                actor.dream_calls.append(call_id)
                if actor.restarted:
                    actor.incarnation = "second"
                return Reply(error=ActorUnavailableError("the actor is unavailable", None))

        class collect:  # noqa: N801
            @staticmethod
            def remote(call_id):
                actor.collected.append(call_id)
                return Reply(result=[{"feature": "0/1", "stopped": "iterations"}])

        class progress:  # noqa: N801
            @staticmethod
            async def remote():
                return None

        self.describe, self.dream, self.collect, self.progress = describe, dream, collect, progress


def serve_one_job(actor, monkeypatch) -> OneJobStore:
    monkeypatch.setattr(scheduler_module, "POLL_SECONDS", 0.01)
    store = OneJobStore(Job("j1", "key", "id", "0/1", DreamConfig(iterations=2).model_dump(mode="json"), 1.0, "queued"))
    scheduler = Scheduler(store, [Worker(0, actor, 0, "test")], {"id": lambda feature: 1.0}, 2, 3)

    async def until_settled():
        task = asyncio.create_task(scheduler.run())
        for _ in range(300):
            await asyncio.sleep(0.01)
            if store.completed or store.requeued or store.failed:
                break
        task.cancel()

    asyncio.run(until_settled())
    return store


def test_an_unavailable_actor_that_comes_back_is_collected_not_run_twice(monkeypatch):
    actor = BlinkingActor(restarted=False)
    store = serve_one_job(actor, monkeypatch)
    assert len(actor.dream_calls) == 1 and actor.collected == actor.dream_calls  # the same call, collected
    assert store.completed == [("j1", {"feature": "0/1", "stopped": "iterations"})] and not store.requeued


def test_an_unavailable_actor_that_restarted_lost_the_call_and_the_job_is_requeued(monkeypatch):
    actor = BlinkingActor(restarted=True)
    store = serve_one_job(actor, monkeypatch)
    assert len(actor.dream_calls) == 1 and actor.collected == []
    assert store.requeued == ["j1"] and not store.completed
