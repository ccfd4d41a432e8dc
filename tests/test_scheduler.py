"""The scheduler's supervision, without Ray: a worker loop whose store calls raise logs, backs off and runs again."""

import asyncio

from service import scheduler as scheduler_module
from service.scheduler import Scheduler
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
    scheduler = Scheduler(store, [Worker(0, ReadyActor(), 0, "test")], "id", lambda feature: 1.0, 2, 3)
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
