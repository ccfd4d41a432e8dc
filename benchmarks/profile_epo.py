"""What one EPO iteration asks of the device: model calls, operators and host synchronisations per iteration, for
K features dreamed together. Run it against a checkout of another engine (`--previous DIR`, in its own process)
to compare before and after on the same machine; no GPU is needed, since counts do not depend on the device.

Every aten operator is counted by a TorchDispatchMode, and the counts are read at each iteration's progress
callback, so an iteration's figures are exactly its own (the last iterations' mean is printed; what a call pays
once, the starting prompts and the final fp32 measurement, is printed apart). Host synchronisations counted:
`aten::_local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `bool(t)`) and `aten::nonzero` (a shape that
depends on the data); a GPU waits at each. Copies to the host by `.cpu()`/`.tolist()` do not show as operators on
a CPU and are not counted.

    python benchmarks/profile_epo.py [--k 1,4] [--iterations 4] [--previous DIR] [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys

CALL = """
import json, sys, torch
from collections import Counter
from torch.utils._python_dispatch import TorchDispatchMode
torch.set_num_threads({threads})
from dreaming.build.default import build_default_bundle
from dreaming.bundle import Bundle
try:
    from dreaming.engine import DreamConfig, dream_many
except ImportError:  # an engine before the package (version 4 and earlier)
    from dreaming.epo import DreamConfig, dream_many
sys.path.insert(0, "experiments")
from epo_quality import sample_features

class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {{}}))

bundle = build_default_bundle()
maxima = bundle.maxima()
native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
lm, measure_lm = bundle.load_model(dtype=torch.bfloat16 if native_bf16 else torch.float32), bundle.load_model()
encoder = bundle.load_encoder()
features = sample_features(maxima, 26, 0)
calls = Counter()
lm.model.register_forward_pre_hook(lambda *a: calls.update(["model"]))
lm.model.base_model.register_forward_pre_hook(lambda *a: calls.update(["body"]))
SYNC = ("_local_scalar_dense", "nonzero")
out = {{}}
for k in [int(x) for x in "{k}".split(",")]:
    group = features[:k]
    counter, snapshots = Count(), []
    def snapshot(*_):
        snapshots.append((sum(counter.ops.values()), sum(counter.ops[n] for n in SYNC), calls["model"] + calls["body"]))
    calls.clear()
    with counter:
        snapshot()
        dream_many(lm, encoder, group, DreamConfig(iterations={iterations}, dtype=str(lm.dtype)[6:]),
                   [maxima.dataset_max(f) for f in group],
                   measure_lm=measure_lm, contexts=[maxima.top_contexts(f) for f in group], progress=snapshot)
        snapshot()
    out[k] = snapshots
print(json.dumps(out))
"""


def run(directory: str, k: str, iterations: int, threads: int) -> dict:
    code = CALL.format(threads=threads, k=k, iterations=iterations)
    out = subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": directory})
    if out.returncode:
        raise SystemExit(f"profiling in {directory} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, counts: dict) -> None:
    print(f"\n{name}")
    print(f"  {'K':>3}  per iteration (mean of the last {len(next(iter(counts.values()))) - 3}): "
          f"{'ops':>8} {'syncs':>6} {'model calls':>11}   once per call: {'ops':>9} {'syncs':>6} {'model calls':>11}")
    for k, snapshots in counts.items():
        # snapshots: before the call, after each iteration, after the call; iteration 1 also expands every member
        steps = [[b - a for a, b in zip(before, after)] for before, after in zip(snapshots[1:-1], snapshots[2:-1])]
        per = [sum(column) / len(steps) for column in zip(*steps)]
        total = [b - a for a, b in zip(snapshots[0], snapshots[-1])]
        once = [t - p * (len(snapshots) - 2) for t, p in zip(total, per)]
        print(f"  {k:>3}  {'':>34}{per[0]:>8.0f} {per[1]:>6.0f} {per[2]:>11.1f}   {'':>15}{once[0]:>9.0f} "
              f"{once[1]:>6.0f} {once[2]:>11.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="1,4")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--previous", help="a checkout of another engine, profiled the same way")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("model calls: forward calls of the search model (the whole model or its body; each is one pass)")
    if args.previous:
        report(f"previous engine ({args.previous})", run(args.previous, args.k, args.iterations, args.threads))
    report("this engine", run(here, args.k, args.iterations, args.threads))


if __name__ == "__main__":
    main()
