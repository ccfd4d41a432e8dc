"""Which closed-form transcoder recipe generalises: the comparison behind the default (dreaming/build/train.py).

On the default bundle's corpus it captures MLP inputs/outputs of `--fit-tokens` positions of the windows the
default fit uses, the held-out windows, and the held-out varied texts (never in any corpus), then fits
a few layers with each recipe and prints the FVU on the held-out windows and on the varied texts:

  encoder  data    each feature is a random fit token's (centred) input direction
           xkm     spherical k-means of the inputs
           ykm     spherical k-means of what a linear skip leaves of the outputs; encoder = regression of
                   cluster membership on the input (the default)
  reach    0 (a per-layer set) or R: a target layer is fitted from the features of layers t-R..t
  skip     with or without a least-squares linear map from input to output beside the features

Every recipe gives each feature the same bias rule (ReLU, fires on k/F of the fit tokens) and fits decoders by
least squares. Writes experiments/results/transcoder_recipes.md.

    python experiments/transcoder_recipes.py [--layers 3,11,20] [--fit-tokens 32768]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dreaming.build.evaluate import heldout_sequences
from dreaming.build.train import (
    TrainConfig,
    collect_activations,
    firing_thresholds,
    layer_activations,
    least_squares,
    output_cluster_directions,
    spherical_kmeans,
    split_windows,
)
from dreaming.bundle import Bundle
from dreaming.models import fast_dtype

RECIPES = [  # (encoder, features, reach, skip)
    ("data", 1024, 0, False), ("xkm", 1024, 0, False), ("xkm", 1024, 2, False), ("xkm", 1024, 0, True),
    ("xkm", 1024, 2, True), ("ykm", 1024, 0, True), ("ykm", 1024, 2, True), ("xkm", 2048, 0, True),
    ("ykm", 2048, 0, True),
]


def encoder(x, y, method, features, k, generator):
    """A function x [N, d] -> acts [N, F] fitted on (x, y) of one layer."""
    scale = (x.shape[1] / x.pow(2).sum(-1).mean()).sqrt()
    mean = (x * scale).mean(0)
    centred = x * scale - mean
    if method == "data":
        directions = centred[torch.randperm(len(x), generator=generator)[:features]].T
    elif method == "xkm":
        cluster = spherical_kmeans(centred, features, 8, generator)
        directions = torch.zeros(features, x.shape[1]).index_add_(0, cluster, centred).T
    else:
        directions = output_cluster_directions(centred, y, features, 8, generator)
    directions = directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-12)  # unit columns, as ykm's are
    quantile = firing_thresholds(centred @ directions, k / features)
    return lambda inputs: ((inputs.float() * scale - mean) @ directions - quantile).relu()


def fvu(y, prediction):
    return ((y - prediction).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="3,11,20")
    parser.add_argument("--fit-tokens", type=int, default=32_768)
    parser.add_argument("--k", type=int, default=TrainConfig.k)
    parser.add_argument("--bundle", help="bundle directory (default: the default bundle, built if missing)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = Bundle.open(args.bundle)
    lm = bundle.load_model(dtype=fast_dtype())  # as the build
    windows = bundle.windows()
    config = TrainConfig()
    fit_windows, heldout = split_windows(windows, config.heldout_windows, config.seed)
    data = {"fit": collect_activations(lm, windows, fit_windows, args.fit_tokens, config.batch_windows)}
    data["windows"] = collect_activations(lm, windows, np.sort(heldout), int((windows.lengths[heldout] - 1).sum()),
                                          config.batch_windows)
    parts = [layer_activations(lm, torch.tensor([ids]), torch.tensor([len(ids)])) for ids in heldout_sequences(lm)]
    data["texts"] = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
    layers = [int(layer) for layer in args.layers.split(",")]
    rows = []
    for method, features, reach, skip in RECIPES:
        started, results = time.perf_counter(), {"windows": [], "texts": []}
        encoders = {}
        for target in layers:
            sources = list(range(max(0, target - reach), target + 1))
            for layer in sources:
                if layer not in encoders:
                    encoders[layer] = encoder(data["fit"][0][layer].float(), data["fit"][1][layer].float(), method,
                                              features, args.k, torch.Generator().manual_seed(layer))

            def design(split):
                columns = [encoders[layer](data[split][0][layer]) for layer in sources]
                return torch.cat(columns + ([data[split][0][target].float()] if skip else []), 1)

            weights, bias = least_squares(design("fit"), data["fit"][1][target].float(), config.ridge)
            for split in ("windows", "texts"):
                results[split].append(fvu(data[split][1][target].float(), design(split) @ weights + bias))
        label = f"{method}, F={features}, reach {reach}, {'skip' if skip else 'no skip'}"
        rows.append((label, results, time.perf_counter() - started))
        print(f"{label:<32} windows {np.mean(results['windows']):.3f}  texts {np.mean(results['texts']):.3f}  "
              f"per layer (texts) {[round(v, 2) for v in results['texts']]}", flush=True)
    out = Path(__file__).parent / "results" / "transcoder_recipes.md"
    lines = [f"# Transcoder recipes (`experiments/transcoder_recipes.py`, layers {args.layers}, "
             f"{args.fit_tokens:,} fit tokens, k = {args.k})", "",
             "FVU on the held-out corpus windows and on the held-out varied texts, mean over the layers.", "",
             "| recipe | FVU windows | FVU texts | FVU texts per layer | seconds |", "|---|---:|---:|---|---:|"]
    lines += [f"| {label} | {np.mean(r['windows']):.3f} | {np.mean(r['texts']):.3f} | "
              f"{', '.join(f'{v:.2f}' for v in r['texts'])} | {seconds:.0f} |" for label, r, seconds in rows]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
