"""EPO speed and search quality on the default bundle, measured side by side in one run.

Prints:
  1. seconds per EPO iteration against the prompt length (this engine at fixed lengths, one feature), and the engine
     before this version (a checkout given by --previous, run in its own process on the same feature) at its
     default length;
  2. candidate tokens/s of the engine's children scoring (children from a real population, each run after its
     parent's KV cache) against a plain forward over the same children's prompt and suffix tokens: the
     engine/plain throughput ratio;
  3. activation reached (best, and best with CE <= 5, as % of the dataset max) vs. iterations for EPO, GCG and
     random single-token search from the same seed, on the study feature (experiments/epo_quality.py's draw)
     whose starting prompts are farthest from its max, all three starting from prompts sampled from the model
     (no dataset seeds), so the comparison is not decided at iteration 1;
  4. features per minute at the default configuration for K = 1, 4, 16 features sharing each batch (the cost of an
     iteration, timed by the search itself, plus what a call pays once): this engine (each feature at its chosen
     length) and, with --previous, the engine before it on the same features.

The search runs in the device's fast dtype (models.fast_dtype: bf16 on a GPU or a CPU with bf16 matmuls, else
fp32), the previous engine too, so both are timed as they would run on this machine.

    python benchmarks/bench_epo.py [--previous DIR] [--iterations 40] [--k 1,4,16] [--throughput-iterations 3]
                                   [--parts 1,2,3,4] [--threads 2]

--previous DIR: a checkout of the commit before this engine (e.g. `git worktree add /tmp/previous <commit>`).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dreaming.bundle import Bundle, default_bundle_dir
from dreaming.engine import DreamConfig, dream, dream_many, gcg_config, random_search_config
from dreaming.engine.search import Search, allowed_for
from dreaming.engine.starts import initial_prompts
from dreaming.engine.state import TaskState, task_generator
from dreaming.models import best_device, fast_dtype
from dreaming.objective import Scorer, make_target
from dreaming.templates import chat_template

SHORT, LONG = 2, 6  # iterations of the previous engine's two timed calls per K in part 4
LENGTHS = (8, 12, 16, 24, 32, 48, 64)  # part 1's fixed prompt lengths

# The engine before this version, in its own process: the seconds per iteration of `iterations` on one feature,
# or (with `ks`) the seconds of calls of SHORT and LONG iterations for K features, in the given dtype.
PREVIOUS_ENGINE = """
import json, sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, "experiments")
from epo_quality import sample_features
from dreaming.bundle import Bundle
from dreaming.epo import DreamConfig, dream_many
from dreaming.features import parse_feature
bundle = Bundle.open({bundle!r})
maxima = bundle.maxima()
lm, measure_lm = bundle.load_model(dtype=getattr(torch, {dtype!r})), bundle.load_model()
encoder = bundle.load_encoder()
config = DreamConfig(dtype={dtype!r})
def call(group, iterations):
    started = time.perf_counter()
    results = dream_many(lm, encoder, group, config.model_copy(update={{"iterations": iterations}}),
                         [maxima.dataset_max(f) for f in group], measure_lm=measure_lm,
                         contexts=[maxima.top_contexts(f) for f in group])
    return time.perf_counter() - started, results[0].timings["seconds_per_iteration"]
features = [parse_feature(f) for f in {features!r}]
if {ks!r}:
    call(features[:1], 1)
    print(json.dumps({{k: [call(features[:k], {short})[0], call(features[:k], {long})[0]] for k in {ks!r}}}))
else:
    print(json.dumps(call(features[:1], {iterations})[1]))
"""


def previous_engine(args, features: list, dtype: str, iterations: int = 0, ks: list[int] | None = None):
    code = PREVIOUS_ENGINE.format(threads=args.threads, bundle=args.bundle, features=[str(f) for f in features],
                                  dtype=dtype, iterations=iterations, ks=ks or [], short=SHORT, long=LONG)
    out = subprocess.run([sys.executable, "-c", code], cwd=args.previous, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": args.previous})
    if out.returncode:
        print(f"  previous engine failed: {out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up (first calls of a shape are slow on CPU)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def study_features(maxima, count: int = 10) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from epo_quality import sample_features

    return sample_features(maxima, count, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--previous", help="a checkout of the engine before this version, timed on the same features")
    parser.add_argument("--iterations", type=int, default=40, help="iterations of the EPO/GCG/random comparison")
    parser.add_argument("--timing-iterations", type=int, default=6, help="iterations timed per length in part 1")
    parser.add_argument("--k", default="1,4,16", help="batch sizes (features) for features/minute")
    parser.add_argument("--throughput-iterations", type=int, default=3, help="iterations of part 4's call per K")
    parser.add_argument("--parts", default="1,2,3,4", help="which of the four measurements to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=best_device(), help="where the models run (default: a GPU if any)")
    args = parser.parse_args()
    parts = {int(part) for part in args.parts.split(",")}
    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle)
    dtype = fast_dtype(args.device)
    lm = bundle.load_model(dtype=dtype, device=args.device)
    measure_lm = bundle.load_model(dtype=torch.float32, device=args.device)
    transcoder = bundle.load_encoder(device=args.device)  # as the service's workers load it
    maxima = bundle.maxima()
    if maxima is None:
        raise SystemExit(f"{args.bundle} has no dataset maxima: run `dreaming maxima build` first")
    features = study_features(maxima)
    feature = features[0]
    dataset_max = maxima.dataset_max(feature)
    config = DreamConfig()
    print(f"device {args.device}, search dtype {dtype}, threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f} at start; timing feature {feature}, dataset max {dataset_max:.3f}", flush=True)

    if 1 in parts:
        timing(args, lm, measure_lm, transcoder, maxima, feature, config)
    if 2 in parts:
        overhead(lm, transcoder, feature, dataset_max, config.model_copy(update={"prompt_length": 12}))
    if 3 in parts:
        methods(args, lm, measure_lm, transcoder, maxima, features, config)
    if 4 in parts:
        throughput(args, lm, measure_lm, transcoder, maxima, features, config)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


def timing(args, lm, measure_lm, transcoder, maxima, feature, config):
    """1. seconds per iteration against the prompt length; the previous engine at its default (12 tokens)"""
    print(f"\nseconds per iteration ({args.timing_iterations} iterations, one feature, the iterations only)")
    dtype = str(lm.dtype).removeprefix("torch.")
    if args.previous:
        previous = previous_engine(args, [feature], dtype, iterations=args.timing_iterations)
        if previous is not None:
            print(f"  previous engine ({args.previous}), its defaults (12 tokens)  {previous:6.2f} s (its starts "
                  "included: engines before version 5 timed them with the iterations)", flush=True)
    for length in LENGTHS:
        result = dream(lm, transcoder, feature, config.model_copy(update={"iterations": args.timing_iterations,
                                                                          "prompt_length": length}),
                       maxima.dataset_max(feature), measure_lm=measure_lm, contexts=maxima.top_contexts(feature))
        print(f"  this engine, {length:>2} tokens{'':<27} {result.timings['seconds_per_iteration']:6.2f} s", flush=True)


def overhead(lm, transcoder, feature, dataset_max, config):
    """2. children scoring vs. a plain forward of the same tokens"""
    scorer = Scorer(lm, transcoder.config.feature_input_hook, chat_template(lm),
                    [make_target(transcoder, feature, dataset_max)], config.position)
    M = config.population
    task = TaskState(task_generator(0, feature), config.prompt_length)
    search = Search(scorer, config, [0], [task])  # one task's real population
    search.start([[]])
    search.expand()
    children, parent, changed = search.propose()
    device = lm.device
    ids, lengths = search.members.ids.to(device), search.members.lengths.to(device)
    rows = torch.zeros(M, dtype=torch.long, device=device)
    expansion, allowed = search.expansion, search.allowed.to(device)
    children.ids, children.lengths, parent, changed = (children.ids.to(device), children.lengths.to(device),
                                                       parent.to(device), changed.to(device))
    child_rows = rows[parent]
    s = len(scorer.suffix_ids)
    tokens = [row[:n] + scorer.suffix_ids for row, n in zip(children.ids.tolist(), children.lengths.tolist())]
    width = max(map(len, tokens))
    # [children, width]
    plain_ids = torch.tensor([t + [scorer.pad_id] * (width - len(t)) for t in tokens], device=device)

    def plain():
        with torch.no_grad():
            for start in range(0, len(plain_ids), scorer.batch_size):
                lm.model(input_ids=plain_ids[start : start + scorer.batch_size], use_cache=False)

    engine_s = seconds(lambda: scorer.score_children(children.ids, children.lengths, child_rows, parent, changed,
                                                     expansion.parents))
    full_s = seconds(lambda: scorer.score(children.ids, children.lengths, child_rows))
    plain_s = seconds(plain)
    expand_s = seconds(lambda: scorer.expand(ids, lengths, rows, config.lambdas(), allowed, config.topk, 32))
    count = int((children.lengths + s).sum())
    print(f"\nchildren batch: {len(children)} children, {count} prompt + suffix tokens (+ {len(scorer.prefix_ids)} "
          "cached prefix tokens each)")
    print(f"  engine, parents' KV cache  {count / engine_s:8.0f} candidate tokens/s ({engine_s:.2f}s)")
    print(f"  engine, prefix cache only  {count / full_s:8.0f} candidate tokens/s ({full_s:.2f}s)")
    print(f"  plain forward              {count / plain_s:8.0f} tokens/s ({plain_s:.2f}s)")
    print(f"  ratio engine / plain       {plain_s / engine_s:8.2f} (target >= 0.9)")
    print(f"  expansion (gradient pass)  {expand_s:8.2f}s for {M} members", flush=True)



def methods(args, lm, measure_lm, transcoder, maxima, features, config):
    """3. EPO vs GCG vs random search, from the same seed, on the study feature whose starts are farthest from max"""
    config = config.model_copy(update={"prompt_length": 12})  # the comparison of methods, at one length
    allowed, W = allowed_for(lm), config.length_range()[1]
    starts = []
    for candidate in features:
        s_ = Scorer(lm, transcoder.config.feature_input_hook, chat_template(lm),
                    [make_target(transcoder, candidate, maxima.dataset_max(candidate))], config.position)
        drawn = initial_prompts(s_, config.model_copy(update={"init": "sample"}), allowed,
                                [TaskState(task_generator(config.seed, candidate), 12)], [0], [[]])[0]
        prompts = [prompt for prompt, _ in drawn]
        padded = torch.zeros(len(prompts), W, dtype=torch.long)
        for m, prompt in enumerate(prompts):
            padded[m, : len(prompt)] = torch.tensor(prompt)
        start = s_.score(padded, torch.tensor([len(p) for p in prompts]), torch.zeros(len(prompts), dtype=torch.long))
        starts.append((float(start.f.max()), candidate))
    far, far_feature = min(starts)
    far_max = maxima.dataset_max(far_feature)
    short = config.model_copy(update={"iterations": args.iterations, "init": "sample"})  # no dataset seeds
    checkpoints = sorted({i for i in (1, 5, 10, 20, 40, 80, 160, args.iterations) if i <= args.iterations})
    print(f"\nactivation reached vs. iterations on {far_feature} (its starting prompts reach {far:.0%} of max; the "
          f"study's first 10 start at {', '.join(f'{v:.0%}' for v, _ in starts)})")
    print("(% of dataset max, search dtype; cells: best any CE / best with CE <= 5; same seed; GCG and random get "
          "the population's children per iteration)")
    print(f"{'method':<8} {'s/iter':>6}  " + " ".join(f"{'it ' + str(i):>13}" for i in checkpoints)
          + "   final fp32 best fluent")
    children_per_iteration = short.population * short.children
    for name, cfg in (("EPO", short), ("GCG", gcg_config(short, children=children_per_iteration)),
                      ("random", random_search_config(short, children=children_per_iteration))):
        result = dream(lm, transcoder, far_feature, cfg, far_max, measure_lm=measure_lm)
        best, fluent = result.history["best"], result.history["best_fluent"]
        cells = [f"{best[i - 1]:6.0%}/" + ("    -" if fluent[i - 1] is None else f"{fluent[i - 1]:5.0%}")
                 for i in checkpoints]
        final = result.best_fluent
        print(f"{name:<8} {result.timings['seconds_per_iteration']:6.2f}  " + " ".join(f"{c:>13}" for c in cells)
              + (f"   {final.fraction_of_max:.0%} (CE {final.cross_entropy:.2f})" if final else "   none"), flush=True)



def throughput(args, lm, measure_lm, transcoder, maxima, features, config):
    """4. features per minute with K features sharing each forward/backward pass, from one call of
    --throughput-iterations per K: the search's own clock gives the seconds per iteration; the rest of the call (the
    length rule, the starting prompts, the final measurement) is paid once per call. A warm-up call first, so no K
    pays the device's warm-up. The previous engine (--previous), whose results count the starts in with the
    iterations, runs calls of SHORT and LONG iterations on the same features at its defaults: their difference is
    the cost of LONG - SHORT iterations."""
    iterations = args.throughput_iterations
    print(f"\nfeatures/minute at {config.iterations} iterations (from a call of {iterations} iterations per K)")
    pool = list(dict.fromkeys(features + study_features(maxima, 26)))
    ks = [int(x) for x in args.k.split(",")]

    def call(group, iterations) -> list:
        return dream_many(lm, transcoder, group, config.model_copy(update={"iterations": iterations}),
                          [maxima.dataset_max(f) for f in group], measure_lm=measure_lm,
                          contexts=[maxima.top_contexts(f) for f in group])

    def line(name: str, k: int, per_iteration: float, once: float, note: str = "") -> None:
        minutes = (once + per_iteration * config.iterations) / 60
        print(f"  {name:<16} K = {k:>2}: {per_iteration:6.3f} s/iteration, {once:5.1f} s once per call, "
              f"{minutes * 60 / k:6.1f} s a feature, {k / minutes:6.2f} features/minute{note}", flush=True)

    call(pool[:1], 1)
    for k in ks:
        results = call(pool[:k], iterations)
        per_iteration = results[0].timings["seconds_per_iteration"]
        once = results[0].seconds - results[0].iterations * per_iteration
        lengths = ", ".join(str(r.prompt_length) for r in results)
        line("this engine", k, per_iteration, once, f" (lengths {lengths}; call {results[0].seconds:.0f} s)")
    if args.previous:
        previous = previous_engine(args, pool[: max(ks)], str(lm.dtype).removeprefix("torch."), ks=ks)
        for k, (short, long) in (previous or {}).items():
            per_iteration = (long - short) / (LONG - SHORT)
            line("previous engine", int(k), per_iteration, short - SHORT * per_iteration, " (12 tokens)")


if __name__ == "__main__":
    main()
