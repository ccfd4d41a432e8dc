"""CLT training throughput on the default model, measured side by side in one run.

Prints tokens/s of: the bf16 forward pass that captures every layer's MLP input and output, and one CLT
training step (encode, decode, backward, Adam) for several decoder reaches, at the default batch shape.

    python benchmarks/bench_train.py [--repeats 3]
"""

import argparse
import time

import torch

from dreaming.models import load_model
from dreaming.train import CLTTrainer, TrainConfig, layer_activations


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TrainConfig()
    lm = load_model("default", dtype=torch.bfloat16)
    window_length = 128
    tokens = torch.randint(100, lm.vocab_size, (config.batch_windows, window_length))
    lengths = torch.full((config.batch_windows,), window_length)
    n_tokens = config.batch_windows * (window_length - 1)
    forward = seconds(lambda: layer_activations(lm, tokens, lengths), args.repeats)
    print(f"threads {torch.get_num_threads()}, batch {config.batch_windows} windows x {window_length} = {n_tokens} tokens")
    print(f"{'model forward (bf16, all hooks)':<36} {n_tokens / forward:8.0f} tokens/s")
    x, y = layer_activations(lm, tokens, lengths)
    for reach in (0, 2, 4, 8, None):
        trainer = CLTTrainer(lm.n_layers, lm.d_model, TrainConfig(reach=reach))
        trainer.initialise(x, y, torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam(trainer.parameters(), lr=1e-4)
        xn = (x.float() * trainer.input_scale).bfloat16()
        yn = y.float() * trainer.output_scale

        def step():
            acts, _ = trainer.encode(xn)
            loss = (trainer.decode(acts).float() - yn).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        took = seconds(step, args.repeats)
        label = f"CLT step, reach {'all' if reach is None else reach}"
        print(f"{label:<36} {n_tokens / took:8.0f} tokens/s  ({took / forward:.2f}x the forward)")


if __name__ == "__main__":
    main()
