"""The running service: the store, the served bundles (one `BundleView` each, by name; the first is the default),
Ray, the worker actors and the scheduler, started and stopped together (FastAPI's lifespan calls `start` and `stop`).

At start-up every job left running by a previous process goes back to the queue, so a restart resumes
interrupted work; jobs already done keep their stored results and are never run again.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from service.bundle_view import BundleView
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import SQLiteStore, Store
from service.workers import Worker, connect_ray, start_worker, start_workers, stop_workers

log = logging.getLogger("dreaming.service")


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Store | None = None
        self.views: dict[str, BundleView] = {}  # name -> view, in the order served: the first is the default
        self.workers: list[Worker] = []
        self.scheduler: Scheduler | None = None
        self._tasks: list[asyncio.Task] = []
        self._started_ray = False
        self.metrics = Metrics(self)

    async def start(self) -> None:
        settings = self.settings
        for name, directory in settings.bundles:
            self.views[name] = await asyncio.to_thread(BundleView, name, directory,
                                                        settings.limits.max_interactive_waiting)
        same = [name for name, view in self.views.items()
                if [other.identity for other in self.views.values()].count(view.identity) > 1]
        if same:  # their jobs, results and workers' models would be one: serve one of them
            raise ValueError(f"bundles {', '.join(same)} have the same model and transcoder: serve one of them")
        self.store = SQLiteStore(settings.database)
        resumed = self.store.recover(settings.max_attempts)
        if resumed:
            log.info("resuming %d interrupted jobs", resumed)
        self._started_ray = connect_ray(settings.ray_address)
        self.workers = start_workers(settings, self.worker_bundles())
        self.scheduler = Scheduler(self.store, self.workers,
                                   {view.identity: view.dataset_max for view in self.views.values()},
                                   settings.features_per_call, settings.max_attempts, self.metrics.call_seconds,
                                   self.replace_worker)
        self._tasks = [asyncio.create_task(self.scheduler.run()),
                       *(asyncio.create_task(view.warm_up()) for view in self.views.values())]
        if settings.gpu_workers is None:
            self._tasks.append(asyncio.create_task(self.watch_gpus()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        stop_workers(self.workers)
        if self._started_ray:
            ray.shutdown()
        if self.store is not None:
            self.store.close()
        for view in self.views.values():
            view.close()

    def worker_bundles(self) -> dict[str, str | None]:
        """What a worker actor opens: identity -> directory of each served bundle (None: each node opens its own
        default bundle; the actor's identity check makes sure it is the same one)."""
        return {view.identity: directory for view, (_, directory) in zip(self.views.values(), self.settings.bundles)}

    def replace_worker(self, dead: Worker) -> Worker:
        """A new actor in the slot of one that is dead for good (killed, or its constructor raised)."""
        worker = start_worker(self.settings, self.worker_bundles(), dead.index, dead.gpus)
        self.workers[self.workers.index(dead)] = worker
        return worker

    async def watch_gpus(self) -> None:
        """Start a GPU worker for each GPU that joins the cluster after the start (when DREAMING_GPU_WORKERS does
        not fix the count): a node added by hand or by an autoscaler is used without a restart."""
        while True:
            await asyncio.sleep(self.settings.gpu_check_seconds)
            gpus = int((await asyncio.to_thread(ray.cluster_resources)).get("GPU", 0))
            for _ in range(gpus - sum(worker.gpus for worker in self.workers)):
                worker = start_worker(self.settings, self.worker_bundles(), len(self.workers), 1)
                log.info("a GPU joined the cluster: worker %d starts", worker.index, extra={"worker": worker.index})
                self.workers.append(worker)
                self.scheduler.add(worker)

    def workers_info(self) -> list[dict]:
        """What the API shows of each worker: slot, GPUs, actor name, state and device (no process ids, nodes or
        paths: those are in the service log)."""
        described = self.scheduler.describe if self.scheduler else {}
        info = []
        for worker in self.workers:
            about = described.get(worker.index, {})
            info.append({"index": worker.index, "gpus": worker.gpus, "name": worker.name, "state": worker_state(about),
                         "device": about.get("device"), **({"error": about["error"]} if "error" in about else {})})
        return info


def worker_state(described: dict) -> str:
    """ready, error (its constructor failed), restarting (Ray restarts it) or starting, from what the scheduler
    last heard of the actor."""
    if "incarnation" in described:
        return "ready"
    if "error" in described:
        return "error"
    return "restarting" if described.get("restarting") else "starting"
