"""Ray worker actors: each opens every served bundle, holds the model and encoder of each bundle it has dreamed
(loaded at that bundle's first job and kept) and dreams batches of features of one bundle per call (the service
sends the bundle identity and the features' dataset maxima along).

One actor per GPU of the cluster (`num_gpus=1` each); on a cluster without GPUs one CPU actor. An actor that
dies is restarted by Ray (`max_restarts=-1`, its constructor opens the bundles again); the scheduler re-queues the
jobs it held. Actors are threaded (`max_concurrency=4`) so `progress()`, `cancel()` and `collect()` answer while
`dream()` runs. Each construction draws a new `incarnation`, and each call has an id whose results the actor
keeps: when Ray says an actor is unavailable (not dead: a network blip, or a restart), the scheduler asks it
again, and if it is the same incarnation it collects the running call instead of running it twice.
The driver (the web service) never touches CUDA: devices are chosen inside the actors.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import ray

from service.settings import Settings


class ServedBundle:
    """One bundle inside a worker: opened (its identity checked against the service's) when the actor starts; its
    models loaded at its first job and kept (by its `Explorer`), so a worker holds only the models of bundles it
    dreamed."""

    def __init__(self, directory: str | None, identity: str, device: str):
        from dreaming.explorer import Explorer

        self.explorer = Explorer.open(directory, device=device)
        bundle = self.explorer.bundle
        if bundle.identity != identity:
            raise RuntimeError(f"this node's bundle {bundle.directory} is {bundle.identity}, the service "
                               f"serves {identity}: copy the same bundle to every node")

    def held_bytes(self) -> int:
        """Bytes of the parameters and buffers of this bundle's loaded models (the encoder reads the rows it needs
        from disk: it holds next to nothing)."""
        return sum(tensor.numel() * tensor.element_size() for lm in self.explorer.loaded_models()
                   for tensor in [*lm.model.parameters(), *lm.model.buffers()])


class DreamWorker:
    """The actor's body; `RemoteDreamWorker` is the actor class."""

    def __init__(self, bundles: dict[str, str | None], step_delay: float = 0.0, deadline: float | None = None):
        """`bundles`: identity -> directory of every served bundle (None: this node's default bundle)."""
        import torch

        from dreaming.models import best_device

        self.device = best_device()
        if self.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # Ray sets OMP_NUM_THREADS=1; the CPU actor owns the CPU
        self.bundles = {identity: ServedBundle(directory, identity, self.device)
                        for identity, directory in bundles.items()}
        self.step_delay = step_delay
        self.deadline = deadline  # seconds a call may search; then it stops, keeping its best (stopped="deadline")
        self._progress: dict | None = None
        self._cancel = threading.Event()  # set by `cancel`: the running call stops after its iteration
        self.incarnation = uuid.uuid4().hex  # new at every (re)start: a restarted actor has lost its calls
        self._calls: dict[str, Future] = {}  # call id -> its results (the latest call only)

    def describe(self) -> dict:
        """What the service shows of this actor (device) and what it checks (incarnation); pid and node for logs
        and tests, never shown by the API."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": self.device,
                "gpu_ids": ray.get_gpu_ids(), "incarnation": self.incarnation, "rss_bytes": resident_bytes(),
                "loaded": {identity: served.held_bytes() for identity, served in self.bundles.items()
                           if served.explorer.loaded_models()}}

    def collect(self, call_id: str) -> list[dict]:
        """The results of call `call_id` of this incarnation, waiting for it to finish (KeyError if unknown)."""
        return self._calls[call_id].result()

    def cancel(self) -> None:
        """Stop the running call after its current iteration; its results keep what was found (stopped =
        "cancelled")."""
        self._cancel.set()

    def progress(self) -> dict | None:
        """The running call's latest progress: {done, total, best_fraction_of_max, seconds}, or None."""
        return self._progress

    def dream(self, call_id: str, identity: str, features: list[str], config: dict, dataset_maxes: list[float],
              previous: list[dict] | None = None) -> list[dict]:
        """Dream every feature of the bundle `identity` under one config (continuing `previous` results, one per
        feature, when given); one JSON result per feature, in order. The results are also kept under `call_id` for
        `collect`, in case the caller loses this call's reply."""
        outcome = Future()
        self._calls = {call_id: outcome}  # only the latest call can be collected
        try:
            results = self._dream(self.bundles[identity], features, config, dataset_maxes, previous)
        except BaseException as error:
            outcome.set_exception(error)
            raise
        outcome.set_result(results)
        return results

    def _dream(self, served: ServedBundle, features: list[str], config: dict, dataset_maxes: list[float],
               previous: list[dict] | None) -> list[dict]:
        from dreaming.engine import DreamConfig, DreamResult

        config = DreamConfig(**config)
        continued = [DreamResult.model_validate(result) for result in previous] if previous else None
        started = time.perf_counter()

        def report(done: int, total: int, best_fraction_of_max) -> str | None:
            seconds = time.perf_counter() - started
            self._progress = {"done": done, "total": total, "best_fraction_of_max": best_fraction_of_max,
                              "seconds": seconds}
            if self.step_delay:
                time.sleep(self.step_delay)
            if self._cancel.is_set():
                return "cancelled"
            return "deadline" if self.deadline is not None and seconds >= self.deadline else None

        self._progress = {"done": 0, "total": None, "best_fraction_of_max": None, "seconds": 0.0}
        self._cancel.clear()
        try:
            # the service's job store is its cache: the bundle's own dream cache is neither read nor written
            results = served.explorer.dream_many(features, config, report, dataset_maxes=dataset_maxes,
                                                 continue_from=continued, read_cache=False, write_cache=False,
                                                 features_per_call=len(features))
        finally:
            self._progress = None
        return [result.model_dump(mode="json") for result in results]


RemoteDreamWorker = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4)(DreamWorker)


def connect_ray(address: str | None) -> bool:
    """Attach to the cluster at `address`, else start a local Ray. True when this call started Ray."""
    if ray.is_initialized():
        return False
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=address or "local", include_dashboard=False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ray.init replaces it; uvicorn's handler shuts down gracefully
    return True


NAMESPACE = "dreaming"  # the Ray namespace of the worker actors (named, so operators and tests can find them)


@dataclass
class Worker:
    index: int
    actor: ray.actor.ActorHandle
    gpus: int
    name: str  # the actor's name in NAMESPACE


def start_worker(settings: Settings, bundles: dict[str, str | None], index: int, gpus: int) -> Worker:
    """A new worker actor for slot `index` (a GPU actor when `gpus`) serving `bundles` (identity -> directory),
    named uniquely in the cluster."""
    name = f"dreaming-worker-{index}-{uuid.uuid4().hex[:8]}"
    actor = RemoteDreamWorker.options(num_gpus=gpus, num_cpus=1, name=name, namespace=NAMESPACE).remote(
        bundles, settings.worker_step_delay, settings.job_deadline)
    return Worker(index, actor, gpus, name)


def start_workers(settings: Settings, bundles: dict[str, str | None]) -> list[Worker]:
    """One actor per GPU (`settings.gpu_workers`, default the cluster's GPU count), else one CPU actor."""
    gpus = settings.gpu_workers
    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
    return [start_worker(settings, bundles, index, 1) for index in range(gpus)] or [
        start_worker(settings, bundles, 0, 0)]


def resident_bytes() -> int:
    """This process's resident memory (RSS), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        ray.kill(worker.actor, no_restart=True)
