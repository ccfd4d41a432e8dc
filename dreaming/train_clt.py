"""Training a cross-layer transcoder (CLT) by gradient, with a sparsity objective: the default bundle's transcoder.

Each of the F features of layer l reads that layer's normalised MLP input (`mlp.hook_in`) and writes to the MLP
output (`mlp.hook_out`) of layer l and of every later layer (circuit-tracer's `W_dec_{l}` [F, n_layers - l, d_model]).
With `skip` (the default), each layer's output also gets a linear map of its own input (`W_skip_{l}`, a skip
transcoder's, Paulo et al. 2025): the features then carry what a linear map cannot.

The recipe (`CLTConfig`; choices and figures in the README, "The default transcoder"):
1. Units: every layer's input is scaled to a mean squared norm of d_model and its output to a total variance of 1,
   so the loss is the mean FVU over layers and one learning rate suits every layer. The scales are folded into the
   weights on save.
2. Start: the closed-form per-layer fit (`train.fit_layer`, on `init_tokens` activations) gives every layer's
   encoders, its own-layer decoders and skip; the slots writing to later layers start at zero. Training so starts where
   the closed-form recipe ends, and only improves on it.
3. Train: BatchTopK (Bussmann et al. 2024): per layer, the k·B largest activations of a batch of B tokens fire, so
   the mean L0 is k while each feature's density is whatever training makes it. Adam, warm-up then linear decay.
   Activations stream from the corpus windows (held-out windows excluded) in a seeded order through a shuffle
   buffer, on the device the model runs on. Decoding is sparse (`embedding_bag` over the active features).
4. Save as JumpReLU, which circuit-tracer's `load_clt` reads: one threshold per layer, the running mean of the
   smallest activation BatchTopK kept, so each token is encoded alone and the mean L0 stays about k.

Massive activations. SmolLM2 writes MLP outputs of norm ~25,000 at BOS (layer 11) and up to ~280 on some first
tokens after it, against ~30 elsewhere. By design: (a) the BOS position is never trained on nor evaluated (no prompt
token sits there; circuit-tracer's attribution also zeroes position 0); (b) features read the *normalised* MLP
input, so a massive token's pre-activations are of ordinary size and it cannot take over a batch's BatchTopK slots;
(c) the closed-form start clusters output patterns, which gives the rare large first-token outputs features of
their own before any gradient step, and the loss weighs them by their true share of the variance (the FVU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dreaming.corpus import Windows
from dreaming.models import LanguageModel
from dreaming.train import TrainConfig, collect_activations, fit_layer, layer_activations, split_windows
from dreaming.transcoders import CLT, Transcoder, TranscoderConfig, save_transcoder


@dataclass
class CLTConfig:
    """Options of `train_clt`; the flags of `dreaming train-transcoder --recipe clt` use the same names."""

    features_per_layer: int = 1024
    k: int = 32  # BatchTopK: features firing per token and layer, on average over a batch
    tokens: int = 262_144  # training tokens streamed from the corpus (past its end, it is read again)
    batch_tokens: int = 4096
    lr: float = 5e-4  # Adam's peak learning rate
    warmup: float = 0.05  # share of the steps over which the learning rate rises to `lr`
    init_tokens: int = 32_768  # activations the closed-form start is fitted on (0: a random start)
    init_k: int = 24  # the closed-form start's mean L0 per layer (TrainConfig.k)
    buffer_tokens: int = 32_768  # the shuffle buffer: activations of this many tokens are mixed before batching
    threshold_decay: float = 0.9  # running mean of each layer's smallest kept activation (the saved threshold)
    batch_windows: int = 32  # windows per forward pass of the model
    heldout_windows: int = 64  # windows kept out of training for the report
    skip: bool = True  # a linear skip per layer (W_skip_{l}) beside the features
    seed: int = 0

    def __post_init__(self):
        for name in ("features_per_layer", "k", "tokens", "batch_tokens", "init_k", "buffer_tokens", "batch_windows",
                     "heldout_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.features_per_layer:
            raise ValueError(f"k ({self.k}) cannot exceed features_per_layer ({self.features_per_layer})")
        if self.init_tokens and self.init_tokens < 4 * self.features_per_layer:
            raise ValueError(f"init_tokens ({self.init_tokens}) must be 0 (random start) or at least "
                             f"4 × features_per_layer ({4 * self.features_per_layer})")
        if self.batch_tokens > self.buffer_tokens:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) cannot exceed buffer_tokens ({self.buffer_tokens})")
        if not 0 < self.lr < 1 or not 0 <= self.warmup < 1 or not 0 <= self.threshold_decay < 1:
            raise ValueError("lr must be in (0, 1), warmup and threshold_decay in [0, 1)")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_tokens)


@dataclass
class Units:
    """Per-layer scales from model units to training units: x̃ = x · x_scale, ỹ = y · y_scale ([n_layers] each)."""

    x_scale: torch.Tensor
    y_scale: torch.Tensor

    @classmethod
    def measure(cls, x: torch.Tensor, y: torch.Tensor) -> Units:
        """From activations x, y [n_layers, N, d_model]: mean ‖x̃‖² = d_model, total variance of ỹ = 1."""
        x, y = x.float(), y.float()
        x_scale = (x.shape[-1] / x.pow(2).sum(-1).mean(-1)).sqrt()
        y_scale = 1 / (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()
        return cls(x_scale, y_scale)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_scale, y_scale = self.x_scale.to(x.device), self.y_scale.to(y.device)
        return x.float() * x_scale[:, None, None], y.float() * y_scale[:, None, None]


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK per layer: pre [n_layers, B, F] -> activations (the k·B largest positive pre-activations of each
    layer kept, the rest 0) and each layer's smallest kept value [n_layers]."""
    flat = pre.relu().flatten(1)  # [n_layers, B·F]
    values, index = flat.topk(k * pre.shape[1], dim=1, sorted=False)
    return torch.zeros_like(flat).scatter(1, index, values).view_as(pre), values.min(1).values


def sparse_decode(transcoder: Transcoder, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Every layer's reconstruction [n_layers, B, d_model] from activations [n_layers, B, F] that are mostly zero
    (and, with a skip, the inputs x [n_layers, B, d_model]): each source layer's active features gather their
    decoder rows [n_layers - l, d_model] (embedding_bag), which costs the active count, not F."""
    n, B, _ = acts.shape
    d = transcoder.config.d_model
    out = transcoder.b_dec[:, None, :].expand(n, B, d).clone()  # [n_layers, B, d_model]
    if transcoder.W_skip is not None:
        out = out + torch.bmm(x, transcoder.W_skip.transpose(1, 2))
    for layer in range(n):
        rows, features = acts[layer].nonzero(as_tuple=True)  # sorted by row: one bag per token
        offsets = torch.cumsum(torch.bincount(rows, minlength=B), 0) - torch.bincount(rows, minlength=B)
        written = F.embedding_bag(features, transcoder.W_dec[layer].flatten(1), offsets, mode="sum",
                                  per_sample_weights=acts[layer][rows, features])  # [B, (n - layer)·d]
        out[layer:] += written.view(B, n - layer, d).transpose(0, 1)
    return out


def training_loss(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, k: int):
    """x, y [n_layers, B, d_model] in training units -> (the mean over layers of the batch's FVU, each layer's FVU
    [n_layers] (detached), each layer's smallest kept activation [n_layers])."""
    pre = torch.baddbmm(transcoder.b_enc[:, None, :], x, transcoder.W_enc.transpose(1, 2))  # [n_layers, B, F]
    acts, smallest = batch_topk(pre, k)
    error = (sparse_decode(transcoder, acts, x) - y).pow(2).sum(-1)  # [n_layers, B]
    fvu = error.sum(1) / (y - y.mean(1, keepdim=True)).pow(2).sum(-1).sum(1)
    return fvu.mean(), fvu.detach(), smallest.detach()


def activation_batches(lm: LanguageModel, windows: Windows, indices: np.ndarray, config: CLTConfig, units: Units,
                       generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) batches [n_layers, batch_tokens, d_model] in training units: windows in a seeded order (again
    from the start when all are read), their tokens mixed in a shuffle buffer of `buffer_tokens`."""
    order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    position, xs, ys, held = 0, [], [], 0
    while True:
        while held < config.buffer_tokens:
            chosen = order[position : position + config.batch_windows]
            position = position + config.batch_windows if position + config.batch_windows < len(order) else 0
            x, y = layer_activations(lm, torch.from_numpy(windows.tokens[chosen]).long(),
                                     torch.from_numpy(windows.lengths[chosen]).long())
            xs.append(x), ys.append(y)
            held += x.shape[1]
        x, y = torch.cat(xs, 1), torch.cat(ys, 1)
        mixed = torch.randperm(held, generator=generator).to(x.device)
        x, y = x[:, mixed], y[:, mixed]
        used = held - held % config.batch_tokens if held % config.batch_tokens else held
        used = min(used, config.buffer_tokens // config.batch_tokens * config.batch_tokens)
        for start in range(0, used, config.batch_tokens):
            yield units.apply(x[:, start : start + config.batch_tokens], y[:, start : start + config.batch_tokens])
        xs, ys, held = [x[:, used:]], [y[:, used:]], held - used


def closed_form_start(transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor, config: CLTConfig,
                      generator: torch.Generator, progress: bool) -> None:
    """Step 2: each layer's encoder and own-layer decoder from the closed-form fit on x, y [n_layers, N, d_model]
    (training units); the later-layer slots stay zero."""
    fit_config = TrainConfig(features_per_layer=config.features_per_layer, k=config.init_k, fit_tokens=x.shape[1])
    for layer in tqdm(range(transcoder.config.n_layers), desc="closed-form start", disable=not progress):
        fit = fit_layer(x[layer], y[layer], fit_config, generator, skip=config.skip)
        if config.skip:
            transcoder.W_skip.data[layer] = fit.W_skip
        transcoder.W_enc.data[layer] = fit.W_enc
        transcoder.b_enc.data[layer] = fit.b_enc
        transcoder.W_dec[layer].data[:, 0] = fit.W_dec
        transcoder.b_dec.data[layer] = fit.b_dec


def random_start(transcoder: Transcoder, generator: torch.Generator) -> None:
    """A start with no data: decoders random with rows of norm 0.1, encoders their transpose (Gao et al. 2024)."""
    d = transcoder.config.d_model
    for layer in range(transcoder.config.n_layers):
        rows = torch.randn(transcoder.W_dec[layer].shape, generator=generator)
        rows = 0.1 * rows / rows.norm(dim=-1, keepdim=True)
        transcoder.W_dec[layer].data.copy_(rows)
        transcoder.W_enc.data[layer] = rows[:, 0] * d**-0.5 * 10


def to_model_units(trained: Transcoder, units: Units, thresholds: torch.Tensor, model_name: str | None) -> Transcoder:
    """The trained CLT with the scales folded into its weights and BatchTopK turned into JumpReLU (step 4)."""
    c = trained.config
    n, F_, d = c.n_layers, c.d_transcoder, c.d_model
    out = Transcoder(TranscoderConfig(CLT, n, d, F_, activation="jumprelu", model_name=model_name,
                                      skip_connection=c.skip_connection))
    x_scale, y_scale = units.x_scale.cpu(), units.y_scale.cpu()
    with torch.no_grad():
        out.W_enc.copy_(trained.W_enc.cpu() * x_scale[:, None, None])  # W̃ x̃ = (W̃ · x_scale) x
        out.b_enc.copy_(trained.b_enc.cpu())
        out.threshold.copy_(thresholds.cpu()[:, None].expand(n, F_))
        out.b_dec.copy_(trained.b_dec.cpu() / y_scale[:, None])
        for layer in range(n):
            out.W_dec[layer].copy_(trained.W_dec[layer].cpu() / y_scale[layer:, None])
        if c.skip_connection:  # ỹ = W̃ x̃  =>  y = (W̃ · x_scale / y_scale) x
            out.W_skip.copy_(trained.W_skip.cpu() * (x_scale / y_scale)[:, None, None])
    return out


def train_clt(lm: LanguageModel, windows: Windows, config: CLTConfig, out_dir: Path, progress: bool = True,
              log: list | None = None) -> Transcoder:
    """Train a CLT for `lm` on `windows` (held-out windows excluded), save it to `out_dir` in circuit-tracer's CLT
    layout, and return it (model units, JumpReLU). `log`, if given, receives one dict per step (step, seconds since
    the first step began, lr, the batch's mean FVU and FVU per layer)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    fit_windows, _ = split_windows(windows, config)
    n, d, device = lm.n_layers, lm.d_model, lm.device
    start_tokens = config.init_tokens or config.buffer_tokens
    x, y = collect_activations(lm, windows, fit_windows, start_tokens, config.batch_windows, progress)
    units = Units.measure(x, y)
    transcoder = Transcoder(TranscoderConfig(CLT, n, d, config.features_per_layer, activation="relu",
                                             model_name=lm.name, skip_connection=config.skip))
    with torch.no_grad():
        if config.init_tokens:
            closed_form_start(transcoder, *units.apply(x, y), config, generator, progress)
        else:
            random_start(transcoder, generator)
            transcoder.b_dec.copy_(units.apply(x, y)[1].mean(1))
    del x, y
    transcoder = transcoder.to(device)
    optimizer = torch.optim.Adam(transcoder.parameters(), lr=config.lr)
    warmup = max(1, round(config.warmup * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (config.steps - step) / max(1, config.steps - warmup)))
    thresholds = None
    batches = activation_batches(lm, windows, fit_windows, config, units, generator)
    bar = tqdm(range(config.steps), desc="train CLT", disable=not progress)
    started = time.perf_counter()
    for step in bar:
        x, y = next(batches)
        loss, fvu, smallest = training_loss(transcoder, x, y, config.k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = config.threshold_decay
        thresholds = smallest if thresholds is None else decay * thresholds + (1 - decay) * smallest
        bar.set_postfix(fvu=f"{loss.item():.3f}")
        if log is not None:
            log.append({"step": step, "seconds": time.perf_counter() - started, "lr": schedule.get_last_lr()[0],
                        "fvu": loss.item(), "fvu_per_layer": fvu.tolist()})
    trained = to_model_units(transcoder, units, thresholds, lm.name)
    save_transcoder(trained, out_dir)
    return trained
