"""The dataset maxima pass over Ray actors (`dreaming maxima build --ray`): the batches of `dreaming.maxima` cut
into shards, each run by an actor, the shards' statistics merged into exactly (bit for bit) what the
single-process pass writes.

Owns
  MaximaWorker       the actor: the bundle's model (bf16) and encoders, loaded once, and the windows (from the
                     object store); `shard` runs a range of batches and returns its statistics as CPU tensors
  build_maxima_ray   the driver: one actor per GPU of the cluster (else CPU actors), SHARDS_PER_ACTOR shards each,
                     a replacement for every actor that dies (its shard runs again; finished shards never do), a
                     checkpoint of the merged shards (dreaming/maxima_checkpoint.py) that a new run of the same pass
                     resumes from

Shards are whole batches (batch b: windows [b * batch_windows, (b + 1) * batch_windows)), so every forward pass is
the single-process pass's own: on the same kind of device (a GPU model, or CPUs) the same bits. Every node needs
the bundle at the same path. The caller initialises Ray.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from dreaming.bundle import Bundle
from dreaming.formats import read_config
from dreaming.maxima import Maxima, MaximaAccumulator, MaximaConfig, accumulate, batch_count, save_maxima
from dreaming.maxima_checkpoint import Checkpoint, pass_key
from dreaming.models import best_device, fast_dtype
from dreaming.windows import Windows

SHARDS_PER_ACTOR = 4  # the work balances across actors, and a shard lost with its actor is small
CPU_ACTORS = 2  # actors on a cluster without GPUs (each gets an equal share of the cluster's CPUs)
SHARD_ATTEMPTS = 3  # a shard whose actor dies this many times (out of memory, say) ends the build


class MaximaWorker:
    """The actor's body; `RemoteMaximaWorker` is the actor class. `die_once` (a test hook): a file path; the first
    actor to find no file there creates it and kills itself after the first batch of its shard, so that a death
    mid-shard is a certainty, not a race."""

    def __init__(self, bundle_dir: str, identity: str, windows: Windows, config: MaximaConfig,
                 die_once: str | None = None):
        bundle = Bundle.open(bundle_dir)
        if bundle.identity != identity:
            raise RuntimeError(f"this node's bundle {bundle.directory} is {bundle.identity}, the pass is over "
                               f"{identity}: copy the same bundle to every node")
        self.lm = bundle.load_model(dtype=fast_dtype(best_device()), device=best_device())
        self.transcoder = bundle.load_encoder(device=self.lm.device, dtype=self.lm.dtype)  # encoders only
        self.windows, self.config, self.die_once = windows, config, die_once

    def describe(self) -> dict:
        return {"model": self.lm.name, "device": str(self.lm.device)}

    def shard(self, first_batch: int, stop_batch: int) -> dict:
        """The statistics of batches [first_batch, stop_batch) (`MaximaAccumulator.state()`)."""
        stats = accumulate(self.lm, self.transcoder, self.windows, self.config, range(first_batch, stop_batch),
                           on_batch=self._maybe_die if self.die_once else None)
        return stats.state()

    def _maybe_die(self, tokens: int) -> None:
        try:
            Path(self.die_once).touch(exist_ok=False)
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


RemoteMaximaWorker = ray.remote(max_restarts=0, max_task_retries=0)(MaximaWorker)


def run_shards(start_actor, count: int, shards: list[tuple[int, int]], todo: list[int], merge) -> tuple[int, dict]:
    """Run the shards `todo` (indices into `shards`) on `count` actors made by `start_actor()`, one shard at a time
    each, handing every result to `merge(index, state)` as it comes. An actor that dies is replaced and its shard
    runs again (a shard that kills SHARD_ATTEMPTS actors ends the build). Returns (the actors replaced, the first
    actor's `describe()`)."""
    workers = [start_actor() for _ in range(count)]
    todo, running = deque(todo), {}  # running: ObjectRef -> (shard index, worker slot)
    deaths, replaced = Counter(), 0

    def submit(slot: int) -> None:
        if todo:
            index = todo.popleft()
            running[workers[slot].shard.remote(*shards[index])] = (index, slot)

    try:
        for slot in range(count):
            submit(slot)
        while running:
            (ref,), _ = ray.wait(list(running))
            index, slot = running.pop(ref)
            try:
                state = ray.get(ref)
            except RayActorError as error:
                if error.actor_init_failed:
                    raise RuntimeError(f"a maxima worker could not start (every node needs the bundle, at the same "
                                       f"path): {error}") from error
                deaths[index] += 1
                if deaths[index] == SHARD_ATTEMPTS:
                    raise RuntimeError(f"batches {shards[index]} killed their actor {SHARD_ATTEMPTS} times; the "
                                       f"last time: {error}") from error
                workers[slot] = start_actor()
                replaced += 1
                todo.appendleft(index)
            else:
                merge(index, state)
            submit(slot)
        return replaced, ray.get(workers[0].describe.remote())
    finally:
        for worker in workers:
            ray.kill(worker)


def build_maxima_ray(bundle: Bundle, windows: Windows, out_dir: str | Path, config: MaximaConfig | None = None,
                     actors: int | None = None, progress: bool = True, die_once: str | None = None
                     ) -> tuple[Maxima, dict]:
    """`build_maxima` over Ray actors: the same `out_dir`, bit for bit but the timings (seconds: the whole pass,
    from the actors starting to the last shard merged, over every run that contributed to it).

    actors: how many (default: one per GPU of the cluster, each with `num_gpus=1`; CPU_ACTORS on a cluster without
    GPUs, sharing its CPUs). Returns the maxima and {"actors", "device", "shards", "shards_resumed",
    "actors_replaced"}."""
    config = config or MaximaConfig()
    gpus, cpus = int(ray.cluster_resources().get("GPU", 0)), int(ray.cluster_resources().get("CPU", 0))
    room = gpus or cpus  # actors the cluster can hold at once: one a GPU, else one a CPU at least
    count = actors if actors is not None else gpus or min(CPU_ACTORS, cpus)
    if not 1 <= count <= room:  # an actor that cannot be placed would hold its shard forever
        raise ValueError(f"actors must be in 1..{room} (the cluster's {'GPUs' if gpus else 'CPUs'}), got {count}")
    batches = batch_count(windows, config)
    shard_batches = -(-batches // (SHARDS_PER_ACTOR * count))
    shards = [(first, min(first + shard_batches, batches)) for first in range(0, batches, shard_batches)]
    lengths = np.asarray(windows.lengths, dtype=np.int64)
    shard_tokens = [int(lengths[first * config.batch_windows : stop * config.batch_windows].sum())
                    for first, stop in shards]
    tc = read_config(bundle.transcoder_reference)
    stats = MaximaAccumulator(tc.n_layers, tc.d_transcoder, len(windows.sources), config.top_k, "cpu",
                              config.interval_examples)
    checkpoint = Checkpoint(out_dir, pass_key(bundle.identity, windows, config, shards))
    done, seconds_before = checkpoint.resume(stats)
    done = done or []  # the shards finished
    resumed = len(done)
    windows_ref = ray.put(windows)
    options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus // count}
    started = time.perf_counter() - seconds_before

    def start_actor():
        return RemoteMaximaWorker.options(**options).remote(str(bundle.directory), bundle.identity, windows_ref,
                                                            config, die_once)

    def merge(index: int, state: dict) -> None:
        stats.merge(state)
        done.append(index)
        bar.update(shard_tokens[index])
        if len(done) < len(shards):
            checkpoint.save_if_due(stats, done, time.perf_counter() - started)

    with tqdm(total=int(lengths.sum()), initial=sum(shard_tokens[index] for index in done), desc="maxima",
              unit="tok", unit_scale=True, disable=not progress) as bar:
        todo = [index for index in range(len(shards)) if index not in done]
        replaced, described = run_shards(start_actor, count, shards, todo, merge)
    maxima = save_maxima(stats, windows, out_dir, bundle.identity, described["model"], config,
                         time.perf_counter() - started)
    checkpoint.remove()
    return maxima, {"actors": count, "device": described["device"], "shards": len(shards),
                    "shards_resumed": resumed, "actors_replaced": replaced}
