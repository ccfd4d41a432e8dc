"""Throughput of `maxima build` against the plain bf16 forward pass of the same model on the same batches.

Runs, in one process and interleaved (so machine load hits both alike), over the first windows of the default
bundle: (a) the plain bf16 forward pass `model(input_ids)` with logits, batch by batch; (b) `build_maxima` on
the same windows (capture of every layer's transcoder input, bf16 encoding of every feature, the running
statistics, and writing the result). Prints tokens/s of each, the ratio (target >= 0.8), and the machine load.

    python benchmarks/bench_maxima.py [--windows 128] [--repeats 3]
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from dreaming.build.default import build_default_bundle
from dreaming.maxima import MaximaConfig, build_maxima
from dreaming.models import fast_dtype
from dreaming.windows import Windows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bundle = build_default_bundle()
    lm = bundle.load_model(dtype=fast_dtype())
    transcoder = bundle.load_transcoder(dtype=lm.dtype)  # as `maxima build` runs it
    full = bundle.windows()
    n = min(args.windows, len(full))
    windows = Windows(np.asarray(full.tokens[:n]), np.asarray(full.lengths[:n]), np.asarray(full.document[:n]),
                      np.asarray(full.source[:n]), full.sources)
    config = MaximaConfig()
    tokens = int(windows.lengths.sum())

    def plain():
        with torch.no_grad():
            for start in range(0, n, config.batch_windows):
                width = int(windows.lengths[start : start + config.batch_windows].max())
                batch = torch.from_numpy(windows.tokens[start : start + config.batch_windows, :width].astype(np.int64))
                lm.model(input_ids=batch.to(lm.device))

    def maxima():
        with tempfile.TemporaryDirectory() as scratch:
            build_maxima(lm, transcoder, windows, f"{scratch}/maxima", bundle.identity, config, progress=False)

    plain()  # warm-up
    times = {"plain": [], "maxima": []}
    for _ in range(args.repeats):
        for name, run in (("plain", plain), ("maxima", maxima)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    plain_rate = tokens / statistics.median(times["plain"])
    maxima_rate = tokens / statistics.median(times["maxima"])
    tc = transcoder.config
    print(f"{n} windows, {tokens:,} tokens, batches of {config.batch_windows}; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'plain bf16 forward (with logits)':<44} {plain_rate:8.0f} tokens/s")
    print(f"{'maxima build (' + str(tc.n_layers * tc.d_transcoder) + ' features, all statistics)':<44} "
          f"{maxima_rate:8.0f} tokens/s")
    print(f"{'ratio maxima / plain':<44} {maxima_rate / plain_rate:8.2f}")


if __name__ == "__main__":
    main()
