"""Where the time of fitting the default transcoder goes, on the default model, measured in one run.

Prints tokens/s of the bf16 forward pass that captures every layer's MLP input and output, and the seconds
of one layer's fit (skip, k-means, encoders, thresholds, least squares) for several features per layer, on
the same activations (real corpus text when the default bundle exists, else random tokens).

    python benchmarks/bench_train.py [--tokens 16384] [--features 1024,2048,4096]
"""

import argparse
import time

import torch

from dreaming.models import load_model
from dreaming.train import TrainConfig, fit_layer, layer_activations


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16_384, help="fit tokens per layer")
    parser.add_argument("--features", default="1024,2048,4096")
    parser.add_argument("--layer", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model("default", dtype=torch.bfloat16)
    window_length, batch = 128, TrainConfig().batch_windows
    n_windows = -(-args.tokens // (window_length - 1))
    tokens = torch.randint(100, lm.vocab_size, (n_windows, window_length))
    lengths = torch.full((n_windows,), window_length)
    started = time.perf_counter()
    parts = [layer_activations(lm, tokens[i : i + batch], lengths[i : i + batch]) for i in range(0, n_windows, batch)]
    forward = time.perf_counter() - started
    x = torch.cat([p[0][args.layer] for p in parts])[: args.tokens]
    y = torch.cat([p[1][args.layer] for p in parts])[: args.tokens]
    print(f"threads {torch.get_num_threads()}; {args.tokens} tokens (random ids), layer {args.layer}")
    print(f"{'model forward (bf16, all hooks)':<34} {n_windows * (window_length - 1) / forward:8.0f} tokens/s")
    for features in [int(f) for f in args.features.split(",")]:
        config = TrainConfig(features_per_layer=features, fit_tokens=max(args.tokens, 4 * features))
        started = time.perf_counter()
        fit_layer(x, y, config, torch.Generator().manual_seed(0))
        took = time.perf_counter() - started
        forward_same_tokens = forward * args.tokens / (n_windows * (window_length - 1))
        print(f"fit one layer, {features:>5} features  {took:8.1f} s  (all {lm.n_layers} layers: "
              f"{took * lm.n_layers / forward_same_tokens:.1f}x the forward pass over the same tokens)")


if __name__ == "__main__":
    main()
