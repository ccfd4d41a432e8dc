"""The motivating update's first study: a feature dashboard built from too narrow a dataset misleads.

A dashboard built from one kind of text only (the "visualization") shows that kind's maxima. This study measures,
on a bundle, how far that is from the full corpus and from dreams:

1. Every corpus source alone: per live feature, the full max ÷ the max within that source (`source_max` of the
   maxima pass), how many features never fire on it, and how often the full top example comes from it.
2. A narrow visualization built with the product's own pass (`build_maxima` on the windows of `--narrow` sources
   only, as `dreaming maxima build --sources ... --out DIR` does; default: the three Python sources, i.e. a
   dashboard built from a code corpus): per feature of the quality study's sample (experiments/epo_quality.py),
   full max ÷ narrow max, whether the narrow and the full top examples come from different kinds of text, and the
   sample's dreamed prompts (the best fluent and best novel prompts of the quality study's results on this bundle,
   `--dreams`, re-measured now in their chat template) as "% of max in the visualization" and "% of the full max".
3. A case study: the sample feature whose narrow dashboard is furthest from the full one (largest full ÷ narrow
   max among those whose narrow top examples are all of the narrow kind and whose full top example is not), with
   both dashboards' top examples, a dream (`dreaming dream`, the defaults; cached in the bundle) and hand-written
   prompts from experiments/narrow_case_prompts.json (written after reading the printed evidence, so they probe
   what the narrow dashboard hides), in the update's format: Prompt | Feature activation (% max in visualization).

    python experiments/narrow_visualizations.py [--bundle DIR] [--narrow python-code,docstring,python-docs]
                                                [--dreams experiments/results/epo_quality_v4_clt.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dreaming.explorer import Explorer
from dreaming.features import Feature, parse_feature
from dreaming.dashboard import render_examples
from dreaming.maxima import build_maxima, load_maxima
from dreaming.models import fast_dtype

HERE = Path(__file__).parent
DREAMS = HERE / "results" / "epo_quality_v4_clt.json"  # the quality study on the default bundle (version 4)
CASE_PROMPTS = HERE / "narrow_case_prompts.json"


def per_source(maxima) -> list[dict]:
    """Per source: features silent on it, median full/narrow max among the rest, and top-1 examples from it."""
    arrays, sources = maxima.arrays, maxima.sources
    full = arrays["max_activation"].flatten()  # [features]
    live = full > 0
    top_source = torch.from_numpy(np.asarray(maxima.windows.source, dtype=np.int64))[
        arrays["top_window"][..., 0].flatten().clamp(min=0)]  # [features]
    rows = []
    for s, name in enumerate(sources):
        narrow = arrays["source_max"][..., s].flatten()
        firing = live & (narrow > 0)
        ratio = (full[firing] / narrow[firing]).numpy()
        rows.append({"source": name, "silent": int((live & (narrow == 0)).sum()), "live": int(live.sum()),
                     "median_full_over_narrow": float(np.median(ratio)) if len(ratio) else None,
                     "full_over_narrow_above_2": int((ratio > 2).sum()),
                     "top_example_from_it": int((live & (top_source == s)).sum())})
    return rows


def narrow_maxima(explorer: Explorer, names: list[str]):
    """The narrow visualization's maxima: the product's pass over those sources' windows, built once and kept."""
    out = explorer.bundle.directory / "studies" / f"narrow-{'+'.join(names)}" / "maxima"
    if (out / "maxima.safetensors").exists():
        return load_maxima(out, explorer.bundle.identity), None
    lm = explorer.bundle.load_model(dtype=fast_dtype())  # as the maxima pass
    transcoder = explorer.bundle.load_transcoder(dtype=lm.dtype)
    started = time.perf_counter()
    built = build_maxima(lm, transcoder, explorer.bundle.windows().of_sources(names), out, explorer.bundle.identity)
    return built, time.perf_counter() - started


def kinds(maxima, feature: Feature, top: int = 10) -> list[str]:
    return [maxima.sources[int(maxima.windows.source[w])] for _, w, _ in maxima.top_examples(feature)[:top]]


def remeasure(explorer: Explorer, feature: Feature, prompt: dict | None) -> float | None:
    """A dreamed prompt's activation now, measured as it was dreamed (inside the chat template)."""
    if not prompt:
        return None
    return explorer.activation(feature, [prompt["prompt"]], template="chat")[0]["activation"]


def sample_rows(explorer: Explorer, full, narrow, narrow_names: list[str], dreams: Path) -> list[dict]:
    rows = []
    for study in json.loads(dreams.read_text()):
        feature = parse_feature(study["feature"])
        full_max, narrow_max = full.dataset_max(feature), narrow.dataset_max(feature)
        full_kinds, narrow_kinds = kinds(full, feature), kinds(narrow, feature)
        dreams = {name: remeasure(explorer, feature, study.get(name)) for name in ("best_fluent", "best_novel")}
        rows.append({
            "feature": str(feature), "full_max": full_max, "narrow_max": narrow_max,
            "full_over_narrow": full_max / narrow_max if narrow_max > 0 else None,
            "full_top10_of_narrow_kind": sum(kind in narrow_names for kind in full_kinds),
            "full_top_kind": full_kinds[0] if full_kinds else None,
            "narrow_top_kind": narrow_kinds[0] if narrow_kinds else None,
            **{f"{name}_prompt": (study.get(name) or {}).get("prompt") for name in dreams},
            **{f"{name}_of_narrow": value / narrow_max if value is not None and narrow_max > 0 else None
               for name, value in dreams.items()},
            **{f"{name}_of_full": value / full_max if value is not None else None for name, value in dreams.items()},
        })
    return rows


def case_study(explorer: Explorer, full, narrow, rows: list[dict], narrow_names: list[str]) -> dict:
    """The sample feature whose narrow dashboard is furthest from the full one, shown both ways, dreamed afresh,
    and probed with the hand-written prompts."""
    candidates = [row for row in rows if row["full_over_narrow"] is not None and row["full_top_kind"] not in narrow_names
                  and all(kind in narrow_names for kind in kinds(narrow, parse_feature(row["feature"])))]
    row = max(candidates or rows, key=lambda r: r["full_over_narrow"] or 0)
    feature = parse_feature(row["feature"])
    lm, transcoder = explorer.lm, explorer.transcoder

    def dashboard(maxima) -> list[dict]:
        # `text`: the same tokens decoded together, so characters split over several tokens (emoji) read whole
        return [{"source": e["source"], "of_its_max": e["fraction_of_max"], "context": e["context"],
                 "text": lm.tokenizer.decode(e["token_ids"][max(1, e["position"] - 12): e["position"] + 4])}
                for e in render_examples(lm, transcoder, maxima, feature, top=5)]

    command = [sys.executable, "-m", "dreaming.cli", "dream", "--feature", str(feature), "--json",
               "--bundle", str(explorer.bundle.directory)]  # the product's own command (cached in the bundle)
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    dreamed = [{"prompt": p["prompt"], "activation": p["activation"], "cross_entropy": p["cross_entropy"]}
               for p in result["diverse"][:5]]
    written = json.loads(CASE_PROMPTS.read_text()).get(str(feature), []) if CASE_PROMPTS.exists() else []
    measured = explorer.activation(feature, written) if written else []
    prompts = ([{"prompt": m["text"], "kind": "hand-written (bare text)", "activation": m["activation"]}
                for m in measured] +
               [{"prompt": d["prompt"], "kind": f"dream (chat template, CE {d['cross_entropy']:.2f})",
                 "activation": d["activation"]} for d in dreamed])
    for prompt in prompts:
        prompt["of_narrow"] = prompt["activation"] / row["narrow_max"]
        prompt["of_full"] = prompt["activation"] / row["full_max"]
    prompts.sort(key=lambda p: p["activation"], reverse=True)
    return {"feature": str(feature), "full_max": row["full_max"], "narrow_max": row["narrow_max"],
            "narrow_dashboard": dashboard(narrow), "full_dashboard": dashboard(full), "prompts": prompts}


def plot(sources: list[dict], rows: list[dict], narrow_names: list[str], path: Path) -> None:
    """Left: per source, the live features silent on it and those whose full max is > 2x its max. Right: the
    sample's dreams as % of the narrow visualization's max against % of the full max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [s["source"] for s in sources]
    left.barh(names, [s["silent"] for s in sources], label="never fires on it")
    left.barh(names, [s["full_over_narrow_above_2"] for s in sources], left=[s["silent"] for s in sources],
              label="fires, but full max > 2x its max")
    left.set_xlabel("live features")
    left.set_title("A dashboard built from one source alone")
    left.legend(loc="upper right", fontsize=8)
    for name, marker in (("best_fluent", "o"), ("best_novel", "^")):
        points = [(r[f"{name}_of_full"] * 100, r[f"{name}_of_narrow"] * 100) for r in rows
                  if r[f"{name}_of_full"] is not None and r[f"{name}_of_narrow"] is not None]
        right.scatter(*zip(*points), marker=marker, label=name.replace("_", " ") + " dream")
    right.axhline(100, color="gray", linestyle="--")
    right.axvline(100, color="gray", linestyle=":")
    right.set_yscale("log")
    right.set_xlabel("% of the full dataset max")
    right.set_ylabel("% max in the visualization (log)")
    right.set_title("Dreams against the narrow visualization")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(narrow_names, seconds, sources, rows, case) -> str:
    narrow = ", ".join(narrow_names)
    lines = ["# Narrow visualizations (experiments/narrow_visualizations.py)", "",
             "## Every corpus source alone", "",
             "| source | live features silent on it | median full max ÷ its max (features firing on it) | "
             "full max > 2× its max | features whose full top example is from it |", "|---|---:|---:|---:|---:|"]
    for s in sources:
        median = "–" if s["median_full_over_narrow"] is None else f"{s['median_full_over_narrow']:.2f}"
        lines.append(f"| {s['source']} | {s['silent']:,} of {s['live']:,} | {median} | "
                     f"{s['full_over_narrow_above_2']:,} | {s['top_example_from_it']:,} |")
    built = "" if seconds is None else f" (its maxima pass took {seconds:.0f} s)"
    lines += ["", f"## A visualization built from {narrow} only{built}", "",
              "Features of the quality study's sample; dreams are that study's best fluent and best novel prompts, "
              "re-measured in their chat template.", "",
              "| feature | full max ÷ narrow max | full top-10 of the narrow kind | full top kind | narrow top kind | "
              "best fluent dream, % max in visualization / % full max | best novel dream, same |",
              "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        ratio = "∞ (silent)" if r["full_over_narrow"] is None else f"{r['full_over_narrow']:.2f}"
        lines.append(f"| {r['feature']} | {ratio} | {r['full_top10_of_narrow_kind']}/10 | {r['full_top_kind']} | "
                     f"{r['narrow_top_kind'] or '–'} | {percent(r['best_fluent_of_narrow'])} / "
                     f"{percent(r['best_fluent_of_full'])} | {percent(r['best_novel_of_narrow'])} / "
                     f"{percent(r['best_novel_of_full'])} |")
    lines += ["", f"## Case study: feature {case['feature']}", "",
              f"Full dataset max {case['full_max']:.3f}; max in the visualization ({narrow}) {case['narrow_max']:.3f}.",
              "", "The visualization's top examples (max token in [[ ]]; decoded together in parentheses):", ""]
    lines += [f"- {e['source']}, {percent(e['of_its_max'])}: `{e['context']!r}` ({e['text']!r})"
              for e in case["narrow_dashboard"]]
    lines += ["", "The full corpus's top examples (decoded together in parentheses):", ""]
    lines += [f"- {e['source']}, {percent(e['of_its_max'])}: `{e['context']!r}` ({e['text']!r})"
              for e in case["full_dashboard"]]
    lines += ["", "| Prompt | Feature activation (% max in visualization) | % of the full max | kind |", "|---|---:|---:|---|"]
    lines += [f"| `{p['prompt']!r}` | {percent(p['of_narrow'])} | {percent(p['of_full'])} | {p['kind']} |"
              for p in case["prompts"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory (default: the default bundle)")
    parser.add_argument("--narrow", default="python-code,docstring,python-docs",
                        help="the sources the narrow visualization is built from, comma-separated")
    parser.add_argument("--dreams", type=Path, default=DREAMS,
                        help="the quality study's results (experiments/epo_quality.py --out) on this bundle")
    parser.add_argument("--out", default=str(HERE / "results"), help="results directory")
    args = parser.parse_args()
    explorer = Explorer.open(args.bundle, device="cpu")
    full = explorer.require_maxima()
    names = args.narrow.split(",")
    sources = per_source(full)
    narrow, seconds = narrow_maxima(explorer, names)
    narrow_max = narrow.arrays["max_activation"]
    expected = full.arrays["source_max"][..., [full.sources.index(n) for n in names]].amax(-1)
    print(f"narrow maxima equal the full pass's max over {names}: {bool(torch.equal(narrow_max, expected))}")
    rows = sample_rows(explorer, full, narrow, names, args.dreams)
    case = case_study(explorer, full, narrow, rows, names)
    text = markdown(names, seconds, sources, rows, case)
    print(text)
    out = Path(args.out)
    (out / "narrow_visualizations.md").write_text(text)
    plot(sources, rows, names, out / "narrow_visualizations.png")
    (out / "narrow_visualizations.json").write_text(json.dumps(
        {"narrow": names, "narrow_pass_seconds": seconds, "sources": sources, "sample": rows, "case": case,
         "median_full_over_narrow_in_sample": statistics.median(
             [r["full_over_narrow"] for r in rows if r["full_over_narrow"] is not None])}, indent=1))


if __name__ == "__main__":
    main()
