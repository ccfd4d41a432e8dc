"""What spreading the densities costs the closed-form start: its per-feature firing rule against one threshold
per layer, on a few layers of a bundle.

The CLT's start (dreaming/build/train.py, `fit_layer`) sets each feature's bias so that it fires on k/F of the fit tokens,
which makes the densities uniform; 40 gradient steps barely move them. Here each layer is fitted on the same
`--tokens` corpus activations as the start (k = 32 of `--features`; one k-means clustering per layer, shared by
the rules), with each firing rule, and measured on the held-out varied texts: FVU of the closed-form decoders, L0,
and how many decades the live features' densities span between the 1st and 99th percentiles (on the varied texts
and on the fit tokens):
  per feature      the start's rule: each unit-norm encoder's own threshold, at share k/F
  one threshold    the same unit-norm encoders, one threshold per layer (L0 k on the fit tokens)
  norm^a           each unit encoder scaled by the norm of its membership regression to the power a (0.25, 0.5,
                   0.75), one threshold
  membership       the membership regressions unnormalised (a feature fires about as often as its cluster is
                   large), one threshold

    python experiments/start_densities.py [--bundle DIR] [--layers 3,11,20,26] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dreaming.build.evaluate import density_summary, heldout_sequences, pad_sequences
from dreaming.build.train import (
    TrainConfig,
    collect_activations,
    firing_thresholds,
    layer_activations,
    least_squares,
    membership_regressions,
    split_windows,
)
from dreaming.build.train_clt import CLTConfig
from dreaming.bundle import Bundle, default_bundle_dir
from dreaming.models import fast_dtype

K = CLTConfig().init_k  # the CLT start's k
KMEANS_ITERATIONS, RIDGE = TrainConfig().kmeans_iterations, TrainConfig().ridge  # the closed-form fit's


def varied_text_activations(lm) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [n_layers, tokens, d_model] on the held-out varied texts."""
    tokens, lengths = pad_sequences(heldout_sequences(lm), lm.pad_token_id)
    xs, ys = zip(*(layer_activations(lm, tokens[s : s + 16], lengths[s : s + 16]) for s in range(0, len(tokens), 16)))
    return torch.cat(xs, 1), torch.cat(ys, 1)


def one_threshold(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The value the k·N largest of pre [N, F] exceed: one threshold for the layer, L0 k on these tokens."""
    flat = pre.flatten()
    return flat.kthvalue(len(flat) - k * len(pre)).values


def decades(density: np.ndarray) -> float:
    return density_summary(density[density > 0])["density_decades"]


def study_layer(x, y, x_test, y_test, features: int, seed: int) -> dict:
    """Each firing rule on one layer: fitted on x, y [N, d], measured on x_test, y_test."""
    x, y, x_test, y_test = x.float(), y.float(), x_test.float(), y_test.float()
    scale = (x.shape[1] / x.pow(2).sum(-1).mean()).sqrt()
    mean = (x * scale).mean(0)
    centred, centred_test = x * scale - mean, x_test * scale - mean
    membership = membership_regressions(centred, y, features, KMEANS_ITERATIONS, torch.Generator().manual_seed(seed))
    norms = membership.norm(dim=0)  # [F]
    unit = membership / norms
    rules = {"per feature": (unit, firing_thresholds(centred @ unit, K / features))}
    for name, power in (("one threshold", 0.0), ("norm^0.25", 0.25), ("norm^0.5", 0.5), ("norm^0.75", 0.75),
                        ("membership", 1.0)):
        encoders = unit * norms**power
        rules[name] = (encoders, one_threshold(centred @ encoders, K).expand(features))
    out = {}
    for name, (encoders, threshold) in rules.items():
        acts = (centred @ encoders - threshold).relu()
        decoder, decoder_bias = least_squares(torch.cat([acts, centred], 1), y, RIDGE)
        acts_test = (centred_test @ encoders - threshold).relu()
        error = torch.cat([acts_test, centred_test], 1) @ decoder + decoder_bias - y_test
        density_test = (acts_test > 0).float().mean(0).numpy()
        out[name] = {"fvu": float(error.pow(2).sum() / (y_test - y_test.mean(0)).pow(2).sum()),
                     "l0": float(density_test.sum()), "dead": float((density_test == 0).mean()),
                     "decades_varied_texts": decades(density_test),
                     "decades_fit_tokens": decades((acts > 0).float().mean(0).numpy())}
    return out


def markdown(report: dict, command: str) -> str:
    lines = ["# Spreading the closed-form start's densities", "", f"    {command}", "",
             f"Fitted on {report['tokens']:,} corpus tokens (k = {K} of {report['features']:,}), measured on the held-out "
             "varied texts: FVU, L0, and the decades between the 1st and 99th percentiles of the live features' "
             "densities (varied texts; fit tokens).", "",
             "| layer | rule | FVU | L0 | dead | decades, varied texts | decades, fit tokens |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for layer, rules in report["layers"].items():
        for name, r in rules.items():
            lines.append(f"| {layer} | {name} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead']:.1%} | "
                         f"{r['decades_varied_texts']:.2f} | {r['decades_fit_tokens']:.2f} |")
    return "\n".join(lines) + f"\n\nThe script took {report['seconds']} s.\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--layers", default="3,11,20,26")
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = Bundle.open(args.bundle or default_bundle_dir())
    lm = bundle.load_model(dtype=fast_dtype())  # as the build
    windows = bundle.windows()
    fit_windows, _ = split_windows(windows, 64, args.seed)
    x, y = collect_activations(lm, windows, fit_windows, args.tokens, 32, progress=False)
    x_test, y_test = varied_text_activations(lm)
    layers = [int(layer) for layer in args.layers.split(",")]
    report = {"tokens": args.tokens, "features": args.features,
              "layers": {layer: study_layer(x[layer], y[layer], x_test[layer], y_test[layer], args.features, args.seed)
                         for layer in layers}}
    report["seconds"] = round(time.perf_counter() - started)
    command = ("python experiments/start_densities.py" + (f" --layers {args.layers}" if args.layers != "3,11,20,26"
                                                           else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "start_densities.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, command)
    (out / "start_densities.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
