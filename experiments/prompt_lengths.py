"""How much context do features need? The data behind the engine's prompt-length rule (dreaming/engine/length.py).

For each feature, its top `--examples` dataset examples are cut to their last n tokens up to their max token and
measured alone after BOS (engine.length.cut_examples), for every n of `--lengths`; the table gives the best cut
example as % of the dataset max at each n, and the length the rule chooses (the shortest of the rule's lengths whose
best cut keeps KEEP of the best over them, within the default cap) beside what other thresholds would choose.

Features: the quality study's 20 (experiments/epo_quality.py's rule, seeds 0 and 1), and with `--seed 2,3` other
draws of the same rule, to see that the rule's choice is not tuned to the study's features.

    python experiments/prompt_lengths.py [--seed 0,1] [--count 10] [--out experiments/results/prompt_lengths.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epo_quality import sample_features  # noqa: E402

from dreaming.bundle import Bundle, default_bundle_dir  # noqa: E402
from dreaming.engine import DreamConfig  # noqa: E402
from dreaming.engine.length import EXAMPLES, KEEP, LENGTHS, cut_examples  # noqa: E402

THRESHOLDS = (0.85, 0.9, KEEP, 0.98)


def chosen(lengths: list[int], best: list[float], keep: float, cap: int) -> int:
    """The rule of engine/length.py at another threshold: the shortest length <= cap within `keep` of the best."""
    within = [(n, b) for n, b in zip(lengths, best) if n <= cap]
    peak = max(b for _, b in within)
    return next(n for n, b in within if (b / peak if peak > 0 else 1.0) >= keep)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--seed", default="0,1", help="seeds of the feature draw (epo_quality's rule)")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--lengths", default="4,8,12,16,24,32,48,64,96,128")
    parser.add_argument("--examples", type=int, default=EXAMPLES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="experiments/results/prompt_lengths.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle)
    maxima = bundle.maxima()
    lm, encoder = bundle.load_model(), bundle.load_encoder()
    lengths = [int(n) for n in args.lengths.split(",")]
    cap = DreamConfig().max_prompt_length
    rows = []
    for seed in (int(s) for s in args.seed.split(",")):
        for feature in sample_features(maxima, args.count, seed):
            started = time.perf_counter()
            dataset_max = maxima.dataset_max(feature)
            contexts = maxima.top_contexts(feature, args.examples)
            best = [max(c["activation"] for c in cut_examples(lm, encoder, feature, contexts, n)) for n in lengths]
            rule = [b for n, b in zip(lengths, best) if n in LENGTHS]
            row = {"feature": str(feature), "draw_seed": seed, "dataset_max": dataset_max,
                   "max_position": contexts[0][1], "lengths": lengths,
                   "best_fraction_of_max": [b / dataset_max for b in best],
                   "chosen": {str(keep): chosen(list(LENGTHS), rule, keep, cap) for keep in THRESHOLDS},
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            print(row["feature"], " ".join(f"{n}:{f:.0%}" for n, f in zip(lengths, row["best_fraction_of_max"])),
                  "→", row["chosen"][str(KEEP)], flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, lengths))
    print(markdown(rows, lengths))


def markdown(rows: list[dict], lengths: list[int]) -> str:
    lines = ["# How much context the features need (experiments/prompt_lengths.py)", "",
             f"The best of each feature's top {EXAMPLES} dataset examples cut to n tokens up to its max token, measured "
             "alone after BOS, as % of the dataset max; the length the rule (dreaming/engine/length.py) chooses at "
             f"each threshold, over the rule's lengths {', '.join(map(str, LENGTHS))} (the default keeps {KEEP:.0%}).",
             "",
             "| feature (draw) | max at position | " + " | ".join(f"{n} tok" for n in lengths) + " | "
             + " | ".join(f"chosen at {k:.0%}" for k in THRESHOLDS) + " |",
             "|" + "---|" * (2 + len(lengths) + len(THRESHOLDS))]
    for row in rows:
        lines.append(f"| {row['feature']} ({row['draw_seed']}) | {row['max_position']} | "
                     + " | ".join(f"{f:.0%}" for f in row["best_fraction_of_max"]) + " | "
                     + " | ".join(str(row["chosen"][str(k)]) for k in THRESHOLDS) + " |")
    lines.append("")
    for keep in THRESHOLDS:
        picks = [row["chosen"][str(keep)] for row in rows]
        lines.append(f"- keep {keep:.0%}: " + ", ".join(f"{n} tokens {picks.count(n)}" for n in LENGTHS
                                                      if picks.count(n)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
