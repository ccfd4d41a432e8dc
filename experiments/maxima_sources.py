"""Which features' dataset maxima come mostly from one corpus source?

A dashboard built from one narrow source misleads exactly for these features. For every live feature this
counts the sources of its top-k examples and prints, per source, the features whose top-k come (>= 90%) from
it and whose max there most exceeds their max in any other source, with their top example's context, plus the
dead/dense counts.

    python experiments/maxima_sources.py [--bundle DIR] [--per-source 3] [--json]
"""

import argparse
import json
from collections import Counter

import numpy as np
import torch

from dreaming.explorer import Explorer
from dreaming.features import Feature
from dreaming.maxima import DENSE_ABOVE


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle")
    parser.add_argument("--per-source", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    explorer = Explorer.open(args.bundle)
    maxima = explorer.require_maxima()
    windows = maxima.windows
    token_share = Counter()
    for source, length in zip(np.asarray(windows.source), np.asarray(windows.lengths)):
        token_share[maxima.sources[source]] += int(length) - 1
    total = sum(token_share.values())
    top_window = maxima.arrays["top_window"]  # [L, F, k]
    source_of_window = torch.from_numpy(np.asarray(windows.source, dtype=np.int64))
    live = top_window[..., 0] >= 0  # [L, F]
    counts = torch.stack([((top_window >= 0) & (source_of_window[top_window.clamp(min=0)] == s)).sum(-1)
                          for s in range(len(maxima.sources))], dim=-1)  # [L, F, S]
    share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    report = {"features": int(live.numel()), "dead": int((~live).sum()),
              "dense": int((maxima.arrays["density"] > DENSE_ABOVE).sum()),
              "corpus_token_share": {s: token_share[s] / total for s in maxima.sources}, "concentrated": {}}
    for s, source in enumerate(maxima.sources):
        # among features with >= 90% of their top-k from this source, the ones whose max here most exceeds
        # their max in every other source: a dashboard without this source would miss their strongest contexts
        source_max = maxima.arrays["source_max"]  # [L, F, S]
        others = torch.cat([source_max[..., :s], source_max[..., s + 1 :]], dim=-1).max(-1).values
        ratio = source_max[..., s] / others.clamp(min=1e-6)
        score = torch.where(live & (counts.sum(-1) >= 8) & (share[..., s] >= 0.9), ratio, -1.0).flatten()
        picked = []
        for index in score.topk(args.per_source).indices.tolist():
            feature = Feature(*divmod(index, share.shape[1]))
            (example,) = explorer.compare(feature, top=1, dreams=[])["examples"]
            picked.append({"feature": str(feature), "share_of_top_k": float(share[feature.layer, feature.index, s]),
                           "max_over_other_sources": float(ratio[feature.layer, feature.index]),
                           "top_k": int(counts[feature.layer, feature.index].sum()),
                           "source_max": maxima.summary(feature)["source_max"], "top_example": example["context"]})
        report["concentrated"][source] = picked
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['features']:,} features: {report['dead']:,} dead, {report['dense']:,} dense "
          f"(active on > {DENSE_ABOVE:.0%} of tokens)")
    for source, picked in report["concentrated"].items():
        print(f"\n{source} ({report['corpus_token_share'][source]:.1%} of corpus tokens)")
        for row in picked:
            maxes = ", ".join(f"{k} {v:.2f}" for k, v in row["source_max"].items())
            print(f"  {row['feature']:>7}: {row['share_of_top_k']:.0%} of top {row['top_k']} from {source}; "
                  f"{row['max_over_other_sources']:.1f}x its max elsewhere ({maxes})")
            print(f"           {row['top_example']!r}")


if __name__ == "__main__":
    main()
