"""The checkpoint of a dataset maxima pass, so a pass that dies (killed, out of memory, a lost node) resumes where it
was instead of starting over. Shared by the single-process pass (dreaming/maxima.py) and the sharded one
(dreaming/maxima_ray.py).

A checkpoint is the running statistics (`MaximaAccumulator.state()`), what part of the pass they cover (`done`: the
batches or shards finished) and the seconds spent, in `<out>.partial/checkpoint.safetensors` beside the output
directory. It is saved at most once every CHECKPOINT_SECONDS (a save is the size of the maxima), keyed by everything
the statistics depend on (`pass_key`), so a checkpoint of another pass is never resumed, and removed once the maxima
are saved. Merging it into an empty accumulator gives back the same statistics exactly, so a resumed pass writes
the same maxima, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreaming.atomic import atomic_file

if TYPE_CHECKING:
    from dreaming.maxima import MaximaAccumulator, MaximaConfig
    from dreaming.windows import Windows

CHECKPOINT_SECONDS = 60.0


def pass_key(identity: str, windows: Windows, config: MaximaConfig, plan) -> str:
    """A fingerprint of everything a pass's statistics depend on: the model + transcoder, the windows, the config and
    how the pass is cut (`plan`: the shards of a sharded pass, a name for the single-process one)."""
    digest = hashlib.sha256(json.dumps([identity, asdict(config), plan, windows.sources]).encode())
    for array in (windows.tokens, windows.lengths, windows.source):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


class Checkpoint:
    """The checkpoint of the pass keyed `key` that writes `out_dir`."""

    def __init__(self, out_dir: str | Path, key: str):
        self.directory = Path(out_dir).with_name(Path(out_dir).name + ".partial")
        self.path = self.directory / "checkpoint.safetensors"
        self.key = key
        self.saved = time.monotonic()

    def resume(self, stats: MaximaAccumulator) -> tuple[object, float]:
        """Merge the checkpoint into `stats` (empty): (what it covers, the seconds it took); (None, 0.0) when there
        is none, or it is of another pass."""
        if not self.path.exists():
            return None, 0.0
        with safe_open(str(self.path), framework="pt") as f:
            metadata = f.metadata()
        if metadata["key"] != self.key:
            return None, 0.0
        stats.merge(load_file(str(self.path)))
        return json.loads(metadata["done"]), float(metadata["seconds"])

    def save_if_due(self, stats: MaximaAccumulator, done, seconds: float) -> None:
        """Save the statistics covering `done` when the last save is CHECKPOINT_SECONDS old."""
        if time.monotonic() - self.saved < CHECKPOINT_SECONDS:
            return
        with atomic_file(self.path) as scratch:
            save_file(stats.state(), str(scratch),
                      metadata={"key": self.key, "done": json.dumps(done), "seconds": str(seconds)})
        self.saved = time.monotonic()

    def remove(self) -> None:
        """Once the maxima are saved: the checkpoint has nothing left to resume."""
        shutil.rmtree(self.directory, ignore_errors=True)
