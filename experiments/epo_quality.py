"""EPO quality on the default bundle: how far above the dataset max do fluent dreamed prompts get?

Features: `--count` (10) features drawn with a fixed seed among the live, non-dense features of the bundle, i.e.
density (fraction of the maxima corpus's tokens on which the feature is active) in [1e-4, 0.1] (0.1 is the
dashboards' line for dense, `maxima.DENSE_ABOVE`) and a positive dataset max. 1e-4 of the default corpus is ~80
tokens, so the dataset max is not one outlier. (Until the default transcoder was refitted the upper bound was
1e-2, the rarer fifth of the old CLT's features; the new one gives every feature about k/F = 2% of the tokens,
so that window would hold almost none.)

Each feature is dreamed with each configuration named in `--configs`:
  default   DreamConfig() as shipped
  previous  the engine's defaults before the fixes and moves of this version (epo.previous_config)
  paper     the paper's settings (λ grid 0.1–10, restart λ in [0.667, 6], k = 512, r = 32, target at the last token,
            no template), given the same number of children in all (fewer iterations), so the same time
  NAME:field=value,...  a variant of `--base` (default or previous): one factor at a time for the ablation
Per feature and configuration it records the best fluent prompt (CE <= 5 inside the run's own template,
re-measured in fp32) as % of the dataset max; how many prompts of the `diverse` set reach >= 80%; and the best
novel fluent prompt (no run of NOVEL_BELOW tokens shared with the feature's top dataset contexts). Results are
appended to `--out` (JSON) after every run and a markdown table is written beside it. `--seed 0,1` draws features
with each seed (the same rule) and studies them all.

    python experiments/epo_quality.py [--count 10] [--seed 0,1] [--configs 'default;previous'] [--threads 2]
                                      [--out experiments/results/epo_quality.json]
    python experiments/epo_quality.py --print-features 3     # the first 3 features of the rule, comma-separated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dreaming.bundle import Bundle, default_bundle_dir
from dreaming.engine import DreamConfig, basins, dream, paper_config, previous_config
from dreaming.explorer import Explorer
from dreaming.features import Feature
from dreaming.maxima import DENSE_ABOVE

DENSITY = (1e-4, DENSE_ABOVE)


def sample_features(maxima, count: int, seed: int = 0) -> list[Feature]:
    """`count` live, non-dense features (density in DENSITY, dataset max > 0), drawn with a fixed seed."""
    density = maxima.arrays["density"].float().numpy()
    peak = maxima.arrays["max_activation"].float().numpy()
    layers, indices = np.nonzero((density >= DENSITY[0]) & (density <= DENSITY[1]) & (peak > 0))
    pick = np.random.default_rng(seed).choice(len(layers), size=min(count, len(layers)), replace=False)
    return [Feature(int(layers[i]), int(indices[i])) for i in pick]


def configs(names: list[str], base: DreamConfig) -> dict[str, DreamConfig]:
    out = {}
    for name in names:
        if name == "default":
            out[name] = DreamConfig(**{**DreamConfig().model_dump(), "iterations": base.iterations})
        elif name == "previous":
            out[name] = previous_config(iterations=base.iterations)
        elif name == "paper":
            children = base.iterations * base.children  # per member over the run: same compute as the default
            out[name] = paper_config(base, iterations=max(1, children // 32))
        elif ":" in name:  # a variant for tuning, e.g. "wide:lambda_max=2,topk=256"
            label, changes = name.split(":", 1)
            fields = dict(part.split("=", 1) for part in changes.split(","))
            out[label] = DreamConfig(**{**base.model_dump(), **fields})
        else:
            raise ValueError(f"unknown configuration {name!r}: default | previous | paper | NAME:field=value,...")
    return out


def figures(result) -> dict:
    """The study's figures of one result: best fluent, strong diverse prompts and the basins (starts) they came
    from, best novel fluent prompt."""
    strong = [p for p in result.diverse if (p.fraction_of_max or 0) >= 0.8]
    return {"prompt_length": result.prompt_length, "engine_version": result.engine_version,
            "best_fluent": result.best_fluent and result.best_fluent.model_dump(mode="json"),
            "diverse_at_80": len(strong), "basins_at_80": basins(strong),
            "best_novel": result.best_novel and result.best_novel.model_dump(mode="json"),
            "best_any": max((p.fraction_of_max for p in result.frontier), default=None)}


def strong_and_varied(row: dict) -> bool:
    """>= 3 fluent prompts of the diverse set at >= 80% of the max, from >= 2 basins."""
    return row.get("diverse_at_80", 0) >= 3 and row.get("basins_at_80", 0) >= 2


def markdown(rows: list[dict], names: list[str]) -> str:
    header = "| feature | density | dataset max | " + " | ".join(
        f"{n}: tokens | {n}: best fluent % (CE), origin | {n}: diverse >= 80% (basins) | {n}: best novel % | {n}: s"
        for n in names) + " |"
    lines = [header, "|" + "---|" * (3 + 5 * len(names))]
    for feature in dict.fromkeys(r["feature"] for r in rows):
        mine = {r["config_name"]: r for r in rows if r["feature"] == feature}
        first = next(iter(mine.values()))
        cells = [feature, f"{first['density']:.1e}", f"{first['dataset_max']:.3f}"]
        for n in names:
            r = mine.get(n)
            best, novel = r and r["best_fluent"], r and r.get("best_novel")
            cells += [str(r.get("prompt_length") or r["config"].get("prompt_length") or "") if r else "",
                      f"{best['fraction_of_max']:.1%} ({best['cross_entropy']:.2f}), {best['origin']}" if best
                      else ("—" if r else ""),
                      f"{r.get('diverse_at_80', '')} ({r.get('basins_at_80', '?')})" if r else "",
                      f"{novel['fraction_of_max']:.1%}" if novel else ("—" if r else ""),
                      f"{r['seconds']:.0f}" if r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        done = [r for r in rows if r["config_name"] == n]
        hits = sum(1 for r in done if r["best_fluent"] and r["best_fluent"]["fraction_of_max"] >= 1.0)
        diverse = sum(1 for r in done if r.get("diverse_at_80", 0) >= 3)
        varied = sum(1 for r in done if strong_and_varied(r))
        novel = sum(1 for r in done if r.get("best_novel") and r["best_novel"]["fraction_of_max"] >= 1.0)
        fractions = [r["best_fluent"]["fraction_of_max"] if r["best_fluent"] else 0.0 for r in done]
        median = statistics.median(fractions) if fractions else float("nan")
        lines.append(f"- {n}: {hits}/{len(done)} with a fluent prompt at >= 100% of the dataset max; {novel}/"
                     f"{len(done)} with a novel fluent prompt at >= 100%; {diverse}/{len(done)} with >= 3 diverse "
                     f"fluent prompts at >= 80%, {varied}/{len(done)} of them from >= 2 basins; median best fluent "
                     f"{median:.1%}")
    return "\n".join(lines) + "\n"


def table(files: list[str], out: Path) -> None:
    """One markdown table of earlier result files; FILE:CONFIG=NAME renames a configuration (and keeps only it).
    Rows saved before basins were counted get them from their stored diverse set (their sampled starts were not
    numbered, so all of them count as one basin there)."""
    rows, names = [], []
    for spec in files:
        path, _, rename = spec.partition(":")
        old, _, new = rename.partition("=")
        for row in json.loads(Path(path).read_text()):
            if old and row["config_name"] != old:
                continue
            row = {**row, "config_name": new or row["config_name"]}
            if "basins_at_80" not in row:
                row["basins_at_80"] = len({p["origin"] for p in row["diverse"] if (p["fraction_of_max"] or 0) >= 0.8})
            rows.append(row)
            names = list(dict.fromkeys([*names, row["config_name"]]))
    out.write_text(markdown(rows, names))
    print(markdown(rows, names))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", default="0", help="seeds of the feature draw, comma-separated")
    parser.add_argument("--configs", default="default;previous", help="';'-separated: default, previous, paper, "
                        "NAME:field=value,field=value (a variant of --base)")
    parser.add_argument("--base", choices=("default", "previous"), default="default",
                        help="the configuration NAME:field=value variants change")
    parser.add_argument("--iterations", type=int, help="override every config's iterations")
    parser.add_argument("--features", help="only these features (comma-separated), of the drawn ones")
    parser.add_argument("--out", default="experiments/results/epo_quality.json")
    parser.add_argument("--print-features", type=int, metavar="N", help="print the first N features and exit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", nargs="+", metavar="FILE[:CONFIG=NAME]", help="only write one markdown table of "
                        "these result files side by side (to --out's .md), e.g. v3.json:default=v3 v4.json")
    args = parser.parse_args()
    if args.table:
        return table(args.table, Path(args.out).with_suffix(".md"))
    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle)
    maxima = bundle.maxima()
    if maxima is None:
        raise SystemExit(f"{args.bundle} has no dataset maxima: run `dreaming maxima build` first")
    seeds = [int(seed) for seed in args.seed.split(",")]
    features = list(dict.fromkeys(f for seed in seeds for f in sample_features(maxima, args.count, seed)))
    if args.print_features:
        # the first N of the study's own sample (a smaller draw would pick other features)
        return print(",".join(str(f) for f in features[: args.print_features]))
    if args.features:
        features = [f for f in features if str(f) in args.features.split(",")]
    base = DreamConfig() if args.base == "default" else previous_config()
    if args.iterations is not None:
        base = base.model_copy(update={"iterations": args.iterations})
    runs = configs(args.configs.split(";"), base)
    names = list(runs)
    explorer = Explorer(bundle)  # the fp32 measuring model, the transcoder and a model per config's search dtype
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    print(f"features: {', '.join(map(str, features))}", flush=True)
    for feature in features:
        for name, config in runs.items():
            if any(r["feature"] == str(feature) and r["config_name"] == name and r["config"] == config.model_dump(
                    mode="json") for r in rows):
                continue  # done in an earlier (interrupted) run
            load = os.getloadavg()[0]
            started = time.perf_counter()
            result = dream(explorer.search_model(config.dtype), explorer.transcoder, feature, config,
                           maxima.dataset_max(feature), measure_lm=explorer.lm, contexts=maxima.top_contexts(feature))
            row = {"feature": str(feature), "config_name": name, "config": config.model_dump(mode="json"),
                   "density": float(maxima.arrays["density"][feature.layer, feature.index]),
                   "dataset_max": maxima.dataset_max(feature), "seconds": time.perf_counter() - started,
                   "iterations": result.iterations, "stopped": result.stopped,
                   "load_before": load, "load_after": os.getloadavg()[0], **figures(result),
                   "frontier": [p.model_dump(mode="json") for p in result.frontier],
                   "diverse": [p.model_dump(mode="json") for p in result.diverse],
                   "history_best_fluent": result.history["best_fluent"]}
            rows.append(row)
            best = row["best_fluent"]
            novel = row["best_novel"]
            print(f"{feature} {name:>8}: best fluent {best['fraction_of_max']:.0%} (CE {best['cross_entropy']:.2f}) "
                  f"{best['prompt']!r}" if best else f"{feature} {name:>8}: no fluent prompt",
                  f"| diverse >= 80%: {row['diverse_at_80']} | best novel: "
                  + (f"{novel['fraction_of_max']:.0%} {novel['prompt']!r}" if novel else "none"),
                  f"[{row['seconds']:.0f}s, load {load:.1f}]", flush=True)
            out.write_text(json.dumps(rows, indent=1))
            out.with_suffix(".md").write_text(markdown(rows, names))
    print(markdown(rows, names))


if __name__ == "__main__":
    main()
