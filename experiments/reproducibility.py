"""Does a feature id mean the same thing on another machine? The default fit under perturbed numerics.

Another machine runs the same build on the same corpus bytes, but its matrix products round differently (another
CPU kind, another thread count, a GPU). This fits a few layers of the default transcoder three times from the
same fit tokens: activations from bf16 forward passes on 2 threads (as the build here), on 1 thread, and from an
fp32 forward pass (a larger perturbation than any CPU-to-CPU difference). For each perturbed fit it reports, per
feature index, the cosine between its encoder row and the reference's, and the correlation of the two features'
activations over the held-out varied texts; also whether the fits are bit-identical.

    python experiments/reproducibility.py [--layers 3,11,20] [--fit-tokens 16384]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from dreaming.build.evaluate import heldout_sequences
from dreaming.build.train import TrainConfig, collect_activations, fit_layer, layer_activations, split_windows
from dreaming.bundle import Bundle


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="3,11,20")
    parser.add_argument("--fit-tokens", type=int, default=16_384)
    parser.add_argument("--bundle", help="bundle directory (default: the default bundle, built if missing)")
    args = parser.parse_args()
    layers = [int(layer) for layer in args.layers.split(",")]
    bundle = Bundle.open(args.bundle)
    windows = bundle.windows()
    config = TrainConfig(fit_tokens=args.fit_tokens)
    fit_windows, _ = split_windows(windows, config.heldout_windows, config.seed)

    def fits(dtype, threads):
        torch.set_num_threads(threads)
        lm = bundle.load_model(dtype=dtype)
        x, y = collect_activations(lm, windows, fit_windows, config.fit_tokens, config.batch_windows, progress=False)
        torch.set_num_threads(2)
        generator = torch.Generator().manual_seed(config.seed)
        return {layer: fit_layer(x[layer], y[layer], config, generator) for layer in layers}

    runs = {"bf16, 2 threads": fits(torch.bfloat16, 2), "bf16, 2 threads again": fits(torch.bfloat16, 2),
            "bf16, 1 thread": fits(torch.bfloat16, 1), "fp32, 2 threads": fits(torch.float32, 2)}
    lm = bundle.load_model(dtype=torch.float32)
    parts = [layer_activations(lm, torch.tensor([ids]), torch.tensor([len(ids)])) for ids in heldout_sequences(lm)]
    texts = torch.cat([p[0] for p in parts], 1).float()  # [L, N, d]
    reference = runs["bf16, 2 threads"]
    lines = [f"# Reproducibility of the default fit (`experiments/reproducibility.py`, layers {args.layers}, "
             f"{args.fit_tokens:,} fit tokens)", "",
             "Per feature index, against the fit from bf16 activations on 2 threads: cosine of the encoder rows "
             "and correlation of the activations over the held-out varied texts (median, 10th percentile, share "
             "above 0.9).", "",
             "| fit | bit-identical | encoder cosine median / p10 / >0.9 | activation correlation median / p10 / >0.9 |",
             "|---|---|---|---|"]
    for name, run in runs.items():
        if run is reference:
            continue
        cosines, correlations, identical = [], [], True
        for layer in layers:
            a, b = reference[layer], run[layer]
            identical &= all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("W_enc", "b_enc", "W_dec"))
            cosines.append(torch.nn.functional.cosine_similarity(a.W_enc, b.W_enc, dim=1))
            acts_a = (texts[layer] @ a.W_enc.T + a.b_enc).relu()
            acts_b = (texts[layer] @ b.W_enc.T + b.b_enc).relu()
            centred_a, centred_b = acts_a - acts_a.mean(0), acts_b - acts_b.mean(0)
            correlation = (centred_a * centred_b).sum(0) / (centred_a.norm(dim=0) * centred_b.norm(dim=0)).clamp_min(1e-12)
            correlations.append(correlation[(acts_a > 0).any(0) | (acts_b > 0).any(0)])
        cosine, correlation = torch.cat(cosines).numpy(), torch.cat(correlations).numpy()

        def summary(values):
            return f"{np.median(values):.3f} / {np.percentile(values, 10):.3f} / {np.mean(values > 0.9):.0%}"

        lines.append(f"| {name} | {'yes' if identical else 'no'} | {summary(cosine)} | {summary(correlation)} |")
        print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / "reproducibility.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
