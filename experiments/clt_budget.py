"""What a CLT's width and training tokens buy: the measurements behind the default recipe (dreaming/build/train_clt.py).

Trains one CLT per configuration on the default bundle's corpus (held-out windows excluded) and evaluates each,
with the closed-form per-layer set beside them, on the held-out varied texts and the held-out corpus windows:
FVU (mean, worst layer), L0, dead fraction, live features' density spread, and the cross-entropy and KL with every
MLP replaced. `--runs` takes CLTConfig fields per run, `;`-separated:

    python experiments/clt_budget.py --runs "tokens=0;tokens=131072;features_per_layer=2048,tokens=131072"

`tokens=0` is the closed-form start alone (no gradient step). Results go to experiments/results/clt_budget.{json,md};
finished runs (same fields) are kept and skipped.
"""

import argparse
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

from dreaming.build.default import build_default_bundle
from dreaming.build.evaluate import transcoder_report
from dreaming.build.recipes import RECIPES
from dreaming.build.train import split_windows
from dreaming.build.train_clt import CLTConfig
from dreaming.models import fast_dtype, load_model

RESULTS = Path(__file__).parent / "results"


def parse_run(text: str) -> dict:
    types = {f.name: f.type for f in fields(CLTConfig)}
    run = {}
    for item in filter(None, text.split(",")):
        name, value = item.split("=")
        run[name] = {"int": int, "float": float, "bool": lambda v: v.lower() == "true"}.get(types[name], str)(value)
    return run


def summary(report: dict) -> dict:
    """The figures of one text set that the table shows."""
    return {key: report.get(key) for key in ("mean_fvu", "max_fvu", "mean_l0", "mean_dead_fraction",
                                             "mean_dense_fraction", "density_p1", "density_p99", "density_decades",
                                             "cross_entropy", "replacement_cross_entropy", "replacement_kl")}


def table(results: list[dict]) -> str:
    lines = ["| recipe | features/layer | training tokens | train s | texts FVU mean / max | texts L0 | texts CE + | "
             "texts KL | windows FVU mean / max | windows CE + | dead | density decades |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        t, w = r["varied_texts"], r["heldout_windows"]
        decades = f"{t['density_decades']:.2f}" if t.get("density_decades") is not None else "-"
        lines.append(
            f"| {r['recipe']} | {r['config']['features_per_layer']} | {r['config'].get('tokens', 0):,} | "
            f"{r['seconds']:.0f} | {t['mean_fvu']:.3f} / {t['max_fvu']:.3f} | {t['mean_l0']:.1f} | "
            f"{t['replacement_cross_entropy'] - t['cross_entropy']:+.2f} | {t['replacement_kl']:.2f} | "
            f"{w['mean_fvu']:.3f} / {w['max_fvu']:.3f} | {w['replacement_cross_entropy'] - w['cross_entropy']:+.2f} | "
            f"{w['mean_dead_fraction']:.3f} | {decades} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="tokens=0;tokens=131072")
    parser.add_argument("--closed-form", action="store_true", help="also the closed-form set (default TrainConfig)")
    parser.add_argument("--out", default=str(RESULTS / "clt_budget.json"))
    args = parser.parse_args()

    bundle = build_default_bundle()
    lm = load_model("default", dtype=fast_dtype())  # as the build
    windows = bundle.windows()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    runs = [("clt", CLTConfig(**parse_run(text))) for text in args.runs.split(";")]
    if args.closed_form:
        runs.insert(0, ("closed-form", RECIPES["closed-form"].config()))
    for recipe, config in runs:
        if any(r["recipe"] == recipe and r["config"] == asdict(config) for r in results):
            continue
        started = time.perf_counter()
        transcoder = RECIPES[recipe].train(lm, windows, config, Path("/tmp") / f"clt_budget_{recipe}", progress=True)
        seconds = time.perf_counter() - started
        heldout = split_windows(windows, config.heldout_windows, config.seed)[1]
        report = transcoder_report(lm, transcoder, windows, heldout, progress=True)
        results.append({"recipe": recipe, "config": asdict(config), "seconds": seconds,
                        **{name: summary(report[name]) for name in ("varied_texts", "heldout_windows")},
                        "fvu_per_layer": report["varied_texts"]["fvu"]})
        out.write_text(json.dumps(results, indent=2))
        print(table(results[-1:]), flush=True)
    out.with_suffix(".md").write_text(
        "# CLT width and training tokens (`experiments/clt_budget.py`)\n\nOn the default bundle's corpus, 2-core "
        "CPU; CE + is the cross-entropy increase with every MLP replaced, KL the mean KL(model ‖ replacement); the "
        "density decades are log10(p99 / p1) of live features' densities on the varied texts.\n\n" + table(results)
        + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
