"""Where the time of training the default transcoder goes, on the default model, measured in one run.

Prints tokens/s of the bf16 forward pass that captures every layer's MLP input and output, the seconds of one
layer's closed-form fit (skip, k-means, encoders, thresholds, least squares) for several features per layer, on
the same activations (random token ids), and the tokens/s of the CLT's gradient steps (dreaming/build/train_clt.py:
encode, BatchTopK, sparse decode into every later layer, backward, Adam) for each width, with each step's parts.

    python benchmarks/bench_train.py [--tokens 16384] [--features 1024,2048,4096] [--clt-features 512,1024,2048]
                                     [--k 32] [--batch-tokens 2048] [--device cpu|cuda]
"""

import argparse
import time

import torch

from dreaming.build.train import TrainConfig, fit_layer, layer_activations
from dreaming.build.train_clt import TrainingCLT, batch_topk
from dreaming.models import best_device, load_model


def clt_step_seconds(x: torch.Tensor, y: torch.Tensor, features: int, k: int, steps: int = 3) -> dict:
    """Seconds of each part of one CLT training step on x, y [n_layers, B, d_model] (the median of `steps`, after
    one step that warms up)."""
    n, B, d = x.shape
    clt = TrainingCLT(n, d, features, skip=True).to(x.device)
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.normal_(0, d**-0.5)
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-5)
    times = {name: [] for name in ("encode", "batch_topk", "decode", "backward", "adam")}

    def timed(name, work):
        if x.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = work()
        if x.is_cuda:
            torch.cuda.synchronize()
        times[name].append(time.perf_counter() - started)
        return result

    for _ in range(steps + 1):
        pre = timed("encode", lambda: torch.baddbmm(clt.b_enc[:, None, :], x, clt.W_enc.transpose(1, 2)))
        acts, _ = timed("batch_topk", lambda: batch_topk(pre, k))
        loss = timed("decode", lambda: (clt.decode(acts, x) - y).pow(2).sum() / B)
        timed("backward", loss.backward)
        timed("adam", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {name: sorted(values[1:])[len(values[1:]) // 2] for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16_384, help="fit tokens per layer")
    parser.add_argument("--features", default="1024,2048,4096")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--clt-features", default="512,1024,2048", help="CLT features per layer ('' to skip)")
    parser.add_argument("--k", type=int, default=32, help="CLT BatchTopK k")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per CLT training step")
    parser.add_argument("--device", default=best_device())
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model("default", dtype=torch.bfloat16, device=args.device)
    window_length, batch = 128, TrainConfig().batch_windows
    n_windows = -(-args.tokens // (window_length - 1))
    tokens = torch.randint(100, lm.vocab_size, (n_windows, window_length))
    lengths = torch.full((n_windows,), window_length)
    started = time.perf_counter()
    parts = [layer_activations(lm, tokens[i : i + batch], lengths[i : i + batch]) for i in range(0, n_windows, batch)]
    forward = time.perf_counter() - started
    x_all, y_all = torch.cat([p[0] for p in parts], 1).float(), torch.cat([p[1] for p in parts], 1).float()
    x, y = x_all[args.layer, : args.tokens], y_all[args.layer, : args.tokens]
    print(f"{args.device}, threads {torch.get_num_threads()}; {args.tokens} tokens (random ids), layer {args.layer}")
    print(f"{'model forward (bf16, all hooks)':<34} {n_windows * (window_length - 1) / forward:8.0f} tokens/s")
    for features in [int(f) for f in args.features.split(",")]:
        config = TrainConfig(features_per_layer=features, fit_tokens=max(args.tokens, 4 * features))
        started = time.perf_counter()
        fit_layer(x, y, config, torch.Generator().manual_seed(0))
        took = time.perf_counter() - started
        forward_same_tokens = forward * args.tokens / (n_windows * (window_length - 1))
        print(f"fit one layer, {features:>5} features  {took:8.1f} s  (all {lm.n_layers} layers: "
              f"{took * lm.n_layers / forward_same_tokens:.1f}x the forward pass over the same tokens)")
    batch = args.batch_tokens
    x, y = x_all[:, :batch], y_all[:, :batch]
    x, y = x * (x.shape[-1] / x.pow(2).sum(-1).mean(-1))[:, None, None].sqrt(), y / y.std()  # about training units
    for features in [int(f) for f in args.clt_features.split(",") if f]:
        parts = clt_step_seconds(x, y, features, args.k)
        step = sum(parts.values())
        print(f"CLT step, {features:>5} features, k {args.k}, {batch} tokens  {step:6.2f} s  {batch / step:7.0f} tokens/s  "
              "(" + ", ".join(f"{name} {seconds:.2f}" for name, seconds in parts.items()) + ")", flush=True)


if __name__ == "__main__":
    main()
