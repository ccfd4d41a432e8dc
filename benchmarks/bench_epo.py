"""EPO speed and search quality on the default bundle, measured side by side in one run.

Prints:
  1. seconds per EPO iteration (default config) and its parts;
  2. candidate tokens/s of the engine's children scoring (prefix KV cache, hooks, cross-entropy) against a plain
     bf16 forward over the same [children, prompt + suffix] token batch: the engine overhead ratio (target >= 0.7);
  3. activation reached (best, and best with CE <= 5, as % of the dataset max) vs. iterations for EPO, GCG and
     random single-token search from the same seed;
  4. features per minute at the default iteration count for K = 1, 4, 16 features sharing each batch.

    python benchmarks/bench_epo.py [--feature 8/3] [--iterations 40] [--k 1,4,16] [--threads 2]
"""

import argparse
import os
import time

import torch

from dreaming.bundle import Bundle, default_bundle_dir
from dreaming.epo import DreamConfig, dream, dream_many, gcg_config, random_search_config
from dreaming.features import parse_feature
from dreaming.objective import Scorer, chat_template, make_target


def seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up (first calls of a shape are slow on CPU)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--feature", default="8/3")
    parser.add_argument("--iterations", type=int, default=40, help="iterations of the EPO/GCG/random comparison")
    parser.add_argument("--k", default="1,4,16", help="batch sizes (features) for features/minute")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle)
    lm = bundle.load_model(dtype=torch.bfloat16)
    measure_lm = bundle.load_model(dtype=torch.float32)
    transcoder = bundle.load_transcoder()
    maxima = bundle.maxima()
    feature = parse_feature(args.feature)
    dataset_max = maxima.dataset_max(feature) if maxima else None
    config = DreamConfig()
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start; feature {feature}, "
          f"dataset max {dataset_max}; config {config.model_dump()}", flush=True)

    # 2. engine overhead: children scoring vs. a plain forward of the same token batch
    template = chat_template(lm)
    scorer = Scorer(lm, transcoder.config.feature_input_hook, template, config.prompt_length,
                    [make_target(transcoder, feature, dataset_max or 1.0)], config.position)
    children = config.population * config.children
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 40000, (children, config.prompt_length), generator=g)
    rows = torch.zeros(children, dtype=torch.long)
    width = config.prompt_length + len(scorer.suffix_ids)
    plain_ids = torch.cat([ids, torch.tensor(scorer.suffix_ids).expand(children, -1)], dim=1)  # [children, width]

    def plain():
        with torch.no_grad():
            for start in range(0, children, scorer.batch_size):
                lm.model(input_ids=plain_ids[start : start + scorer.batch_size], use_cache=False)

    engine_s = seconds(lambda: scorer.score(ids, rows))
    plain_s = seconds(plain)
    members = torch.zeros(config.population, dtype=torch.long)
    grad_s = seconds(lambda: scorer.gradient(ids[: config.population], members, config.lambdas()))
    tokens = children * width
    print(f"\nchildren batch: {children} x {width} tokens (+ {len(scorer.prefix_ids)} cached prefix tokens)")
    print(f"  engine scoring  {tokens / engine_s:8.0f} candidate tokens/s ({engine_s:.2f}s)")
    print(f"  plain forward   {tokens / plain_s:8.0f} tokens/s ({plain_s:.2f}s)")
    print(f"  overhead ratio  {plain_s / engine_s:8.2f} (engine / plain throughput; target >= 0.7)")
    print(f"  gradient pass   {grad_s:8.2f}s for {config.population} members", flush=True)

    # 1 + 3. seconds per iteration, and activation vs. iterations for EPO, GCG and random search
    short = config.model_copy(update={"iterations": args.iterations})
    checkpoints = sorted({i for i in (1, 5, 10, 20, 40, 80, 160, args.iterations) if i <= args.iterations})
    print(f"\nactivation reached vs. iterations (% of dataset max; search dtype; fluent = CE <= 5), "
          f"same seed, same children per iteration")
    print(f"{'method':<8} {'s/iter':>6}  " + " ".join(f"{'it ' + str(i):>13}" for i in checkpoints)
          + "   final fp32 best fluent")
    for name, cfg in (("EPO", short), ("GCG", gcg_config(short, children=short.population * short.children)),
                      ("random", random_search_config(short, children=short.population * short.children))):
        result = dream(lm, transcoder, feature, cfg, dataset_max, measure_lm=measure_lm)
        best, fluent = result.history["best"], result.history["best_fluent"]
        cells = [f"{best[i - 1]:6.0%}/" + ("    -" if fluent[i - 1] is None else f"{fluent[i - 1]:5.0%}")
                 for i in checkpoints]
        final = result.best_fluent
        print(f"{name:<8} {result.timings['seconds_per_iteration']:6.2f}  " + " ".join(f"{c:>13}" for c in cells)
              + (f"   {final.fraction_of_max:.0%} (CE {final.cross_entropy:.2f})" if final else "   none"), flush=True)
    print("  (cells: best any CE / best with CE <= 5)")

    # 4. features per minute with K features sharing each forward/backward pass
    print(f"\nfeatures/minute at {config.iterations} iterations (measured over 3 iterations per K)")
    pool = [f for f in (parse_feature(t) for t in ("8/3", "12/40", "3/100", "20/7", "15/200", "5/60", "25/300",
                                                     "10/11", "1/5", "17/77", "22/123", "6/6", "28/28", "13/13",
                                                     "9/90", "19/19"))]
    for k in (int(x) for x in args.k.split(",")):
        features = pool[:k]
        maxes = [maxima.dataset_max(f) if maxima else None for f in features]
        started = time.perf_counter()
        results = dream_many(lm, transcoder, features, config.model_copy(update={"iterations": 3}), maxes,
                             measure_lm=measure_lm)
        per_it = results[0].timings["seconds_per_iteration"]
        measure = (time.perf_counter() - started) - 3 * per_it
        minutes = (per_it * config.iterations + measure) / 60
        print(f"  K = {k:>2}: {per_it:6.2f} s/iteration, {k / minutes:6.2f} features/minute", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
