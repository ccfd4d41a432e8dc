"""What one EPO iteration asks of the device: model calls, operators and host synchronisations, counted with the
torch profiler, for K features dreamed together. Run it in a checkout of another engine (`--previous DIR`, in its
own process) to compare before and after on the same machine.

The counts are per iteration: two calls of different lengths are profiled and their difference taken, so what a
call pays once (starting prompts, the final fp32 measurement) is printed apart. A host synchronisation is an
`aten::_local_scalar_dense` (`.item()`, `int(tensor)`), a device-to-host copy (`.cpu()`, `.tolist()` of a device
tensor) or a `nonzero`; on a GPU each one waits for the device to finish, on the CPU they cost nothing, which is
why they are counted here rather than timed.

    python benchmarks/profile_epo.py [--k 1,4] [--previous DIR] [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys

SHORT, LONG = 2, 4

CALL = """
import json, sys, torch
from collections import Counter
from torch.profiler import ProfilerActivity, profile
torch.set_num_threads({threads})
from dreaming.bundle import Bundle
from dreaming.epo import DreamConfig, dream_many
sys.path.insert(0, "experiments")
from epo_quality import sample_features
bundle = Bundle.open(None)
maxima = bundle.maxima()
lm, measure_lm = bundle.load_model(dtype=torch.bfloat16), bundle.load_model()
encoder = bundle.load_encoder()
features = sample_features(maxima, 26, 0)
calls = Counter()
for model in (lm.model, measure_lm.model):
    model.register_forward_pre_hook(lambda *a, name="search" if model is lm.model else "measure": calls.update([name]))
    model.base_model.register_forward_pre_hook(lambda *a, name="search" if model is lm.model else "measure":
                                               calls.update([name + " body"]))
SYNC = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
out = {{}}
for k in [int(x) for x in "{k}".split(",")]:
    group = features[:k]
    for iterations in ({short}, {long}):
        calls.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dream_many(lm, encoder, group, DreamConfig(iterations=iterations), [maxima.dataset_max(f) for f in group],
                       measure_lm=measure_lm, contexts=[maxima.top_contexts(f) for f in group])
        ops = Counter({{e.key: e.count for e in prof.key_averages()}})
        out[f"{{k}}/{{iterations}}"] = {{"ops": sum(v for n, v in ops.items() if n.startswith("aten::")),
                                     "syncs": sum(ops[n] for n in SYNC), "copies": ops["aten::copy_"],
                                     "search calls": calls["search"] + calls["search body"],
                                     "measure calls": calls["measure"] + calls["measure body"]}}
print(json.dumps(out))
"""


def run(directory: str, k: str, threads: int) -> dict:
    code = CALL.format(threads=threads, k=k, short=SHORT, long=LONG)
    out = subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": directory})
    if out.returncode:
        raise SystemExit(f"profiling in {directory} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, counts: dict, ks: list[int]) -> None:
    print(f"\n{name}")
    print(f"  {'K':>3} {'per iteration: ops':>20} {'syncs':>7} {'copies':>7} {'model calls':>12}   "
          f"{'once per call: ops':>19} {'syncs':>7} {'model calls':>12}")
    for k in ks:
        short, long = counts[f"{k}/{SHORT}"], counts[f"{k}/{LONG}"]
        per = {key: (long[key] - short[key]) / (LONG - SHORT) for key in short}
        once = {key: short[key] - SHORT * per[key] for key in short}
        print(f"  {k:>3} {per['ops']:>20.0f} {per['syncs']:>7.0f} {per['copies']:>7.0f} {per['search calls']:>12.0f}"
              f"   {once['ops']:>19.0f} {once['syncs']:>7.0f} {once['search calls'] + once['measure calls']:>12.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="1,4")
    parser.add_argument("--previous", help="a checkout of another engine, profiled the same way")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ks = [int(x) for x in args.k.split(",")]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("model calls count the search model's forward calls (whole model and body, each a pass); ops are aten "
          "operators")
    if args.previous:
        report(f"previous engine ({args.previous})", run(args.previous, args.k, args.threads), ks)
    report("this engine", run(here, args.k, args.threads), ks)


if __name__ == "__main__":
    main()
