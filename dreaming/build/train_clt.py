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

from dreaming.build.train import TrainConfig, collect_activations, fit_layer, layer_activations, split_windows
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.models import LanguageModel
from dreaming.transcoders import CLT, Transcoder, TranscoderConfig
from dreaming.windows import Windows


@dataclass
class CLTConfig:
    """Options of `train_clt`; the flags of `dreaming train-transcoder --recipe clt` use the same names."""

    features_per_layer: int = 1024
    k: int = 24  # BatchTopK: features firing per token and layer, on average over a batch
    tokens: int = 81_920  # training tokens streamed from the corpus (past its end, it is read again); 0: the start alone
    batch_tokens: int = 2048
    lr: float = 5e-5  # Adam's peak learning rate
    warmup: float = 0.1  # share of the steps over which the learning rate rises to `lr`
    init_tokens: int = 32_768  # activations the closed-form start is fitted on (0: a random start)
    init_k: int = 32  # the closed-form start's mean L0 per layer (TrainConfig.k); above k, so BatchTopK chooses
    buffer_tokens: int = 16_384  # the shuffle buffer: activations of this many tokens are mixed before batching
    threshold_decay: float = 0.9  # running mean of each layer's smallest kept activation (the saved threshold)
    batch_windows: int = 32  # windows per forward pass of the model
    heldout_windows: int = 64  # windows kept out of training for the report
    skip: bool = True  # a linear skip per layer (W_skip_{l}) beside the features
    seed: int = 0

    def __post_init__(self):
        for name in ("features_per_layer", "k", "batch_tokens", "init_k", "buffer_tokens", "batch_windows",
                     "heldout_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.features_per_layer:
            raise ValueError(f"k ({self.k}) cannot exceed features_per_layer ({self.features_per_layer})")
        if self.tokens < 0 or self.init_tokens < 0:
            raise ValueError("tokens and init_tokens cannot be negative")
        if not self.tokens and not self.init_tokens:
            raise ValueError("tokens 0 (no gradient step) needs the closed-form start (init_tokens > 0)")
        if self.init_tokens and self.init_tokens < 4 * self.features_per_layer:
            raise ValueError(f"init_tokens ({self.init_tokens}) must be 0 (random start) or at least "
                             f"4 × features_per_layer ({4 * self.features_per_layer})")
        if self.batch_tokens > self.buffer_tokens:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) cannot exceed buffer_tokens ({self.buffer_tokens})")
        if not 0 < self.lr < 1 or not 0 <= self.warmup < 1 or not 0 <= self.threshold_decay < 1:
            raise ValueError("lr must be in (0, 1), warmup and threshold_decay in [0, 1)")

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.batch_tokens)  # a last partial batch counts as a whole one


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


class TrainingCLT(torch.nn.Module):
    """The CLT as it is trained: in training units, with the decoders kept per *target* layer, one matrix
    decoders[t] [(t + 1)·F, d_model] whose rows l·F .. (l + 1)·F - 1 are what layer l's features write to layer t.
    A target layer's reconstruction is then one gather over the active features of layers <= t, and its gradient
    one matrix; kept per source layer (circuit-tracer's layout), the slice-adds of every source into every later
    target dominated the backward pass."""

    def __init__(self, n_layers: int, d_model: int, features: int, skip: bool):
        super().__init__()
        self.n_layers, self.d_model, self.features = n_layers, d_model, features
        self.W_enc = torch.nn.Parameter(torch.zeros(n_layers, features, d_model))  # [n_layers, F, d_model]
        self.b_enc = torch.nn.Parameter(torch.zeros(n_layers, features))
        self.b_dec = torch.nn.Parameter(torch.zeros(n_layers, d_model))
        self.W_skip = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if skip else None  # [l, out, in]
        self.decoders = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros((t + 1) * features, d_model)) for t in range(n_layers)])

    def written(self, source: int, target: int) -> torch.Tensor:
        """What layer `source`'s features write to layer `target`: [F, d_model] (a view)."""
        return self.decoders[target][source * self.features : (source + 1) * self.features]

    def decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Every layer's reconstruction [n_layers, B, d_model] from activations [n_layers, B, F] that are mostly
        zero and the inputs x [n_layers, B, d_model]: per target layer one embedding_bag over the active features
        of the layers that write to it, which costs the active count, not F."""
        n, B, _ = acts.shape
        token, layer, feature = acts.transpose(0, 1).nonzero(as_tuple=True)  # sorted by token: one bag per token
        values = acts[layer, token, feature]  # [active]
        rows = layer * self.features + feature  # row in decoders[t], for every t >= layer
        out = []
        for target in range(n):
            keep = layer <= target
            sizes = torch.bincount(token[keep], minlength=B)
            out.append(F.embedding_bag(rows[keep], self.decoders[target], sizes.cumsum(0) - sizes, mode="sum",
                                       per_sample_weights=values[keep]))  # [B, d_model]
        out = torch.stack(out) + self.b_dec[:, None, :]
        return out + torch.bmm(x, self.W_skip.transpose(1, 2)) if self.W_skip is not None else out

    def loss(self, x: torch.Tensor, y: torch.Tensor, k: int):
        """x, y [n_layers, B, d_model] in training units -> (the mean over layers of the batch's FVU, each layer's
        FVU [n_layers] (detached), each layer's smallest kept activation [n_layers])."""
        pre = torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc.transpose(1, 2))  # [n_layers, B, F]
        acts, smallest = batch_topk(pre, k)
        error = (self.decode(acts, x) - y).pow(2).sum(-1)  # [n_layers, B]
        fvu = error.sum(1) / (y - y.mean(1, keepdim=True)).pow(2).sum(-1).sum(1)
        return fvu.mean(), fvu.detach(), smallest.detach()

    def to_transcoder(self, units: Units, thresholds: torch.Tensor, model_name: str | None) -> Transcoder:
        """Step 4: in circuit-tracer's layout and model units (the scales folded into the weights), BatchTopK turned
        into JumpReLU with one threshold per layer."""
        n, F_, d = self.n_layers, self.features, self.d_model
        out = Transcoder(TranscoderConfig(CLT, n, d, F_, activation="jumprelu", model_name=model_name,
                                          skip_connection=self.W_skip is not None))
        x_scale, y_scale = units.x_scale.cpu(), units.y_scale.cpu()
        with torch.no_grad():
            out.W_enc.copy_(self.W_enc.cpu() * x_scale[:, None, None])  # W̃ x̃ = (W̃ · x_scale) x
            out.b_enc.copy_(self.b_enc.cpu())
            out.threshold.copy_(thresholds.cpu()[:, None].expand(n, F_))
            out.b_dec.copy_(self.b_dec.cpu() / y_scale[:, None])
            for source in range(n):
                for target in range(source, n):
                    out.W_dec[source][:, target - source] = self.written(source, target).cpu() / y_scale[target]
            if self.W_skip is not None:  # ỹ = W̃ x̃  =>  y = (W̃ · x_scale / y_scale) x
                out.W_skip.copy_(self.W_skip.cpu() * (x_scale / y_scale)[:, None, None])
        return out


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
            xs.append(x)
            ys.append(y)
            held += x.shape[1]
        x, y = torch.cat(xs, 1), torch.cat(ys, 1)
        mixed = torch.randperm(held, generator=generator).to(x.device)
        x, y = x[:, mixed], y[:, mixed]
        used = min(held, config.buffer_tokens) // config.batch_tokens * config.batch_tokens  # the rest waits
        for start in range(0, used, config.batch_tokens):
            yield units.apply(x[:, start : start + config.batch_tokens], y[:, start : start + config.batch_tokens])
        xs, ys, held = [x[:, used:]], [y[:, used:]], held - used


def closed_form_start(clt: TrainingCLT, x: torch.Tensor, y: torch.Tensor, config: CLTConfig,
                      generator: torch.Generator, progress: bool) -> None:
    """Step 2: each layer's encoder, own-layer decoder and skip from the closed-form fit on x, y [n_layers, N,
    d_model] (training units); the later-layer writes stay zero."""
    fit_config = TrainConfig(features_per_layer=config.features_per_layer, k=config.init_k, fit_tokens=x.shape[1])
    for layer in tqdm(range(clt.n_layers), desc="closed-form start", disable=not progress):
        fit = fit_layer(x[layer], y[layer], fit_config, generator, skip=config.skip)
        clt.W_enc.data[layer] = fit.W_enc
        clt.b_enc.data[layer] = fit.b_enc
        clt.written(layer, layer).copy_(fit.W_dec)
        clt.b_dec.data[layer] = fit.b_dec
        if config.skip:
            clt.W_skip.data[layer] = fit.W_skip


def random_start(clt: TrainingCLT, generator: torch.Generator) -> None:
    """A start with no data: decoder rows random with norm 0.1 per target, each encoder the transpose of its own
    layer's decoder (Gao et al. 2024)."""
    for target, decoder in enumerate(clt.decoders):
        rows = torch.randn(decoder.shape, generator=generator)
        decoder.data.copy_(0.1 * rows / rows.norm(dim=-1, keepdim=True))
        clt.W_enc.data[target] = clt.written(target, target) * 10 * clt.d_model**-0.5


def train_clt(lm: LanguageModel, windows: Windows, config: CLTConfig, out_dir: Path, progress: bool = True,
              log: list | None = None) -> Transcoder:
    """Train a CLT for `lm` on `windows` (held-out windows excluded), save it to `out_dir` in circuit-tracer's CLT
    layout, and return it (model units, JumpReLU). `log`, if given, receives one dict per step (step, seconds since
    the first step began, lr, the batch's mean FVU and FVU per layer)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    fit_windows, _ = split_windows(windows, config.heldout_windows, config.seed)
    n, d, device = lm.n_layers, lm.d_model, lm.device
    start_tokens = config.init_tokens or config.buffer_tokens
    x, y = collect_activations(lm, windows, fit_windows, start_tokens, config.batch_windows, progress)
    units = Units.measure(x, y)
    clt = TrainingCLT(n, d, config.features_per_layer, config.skip).to(device)
    with torch.no_grad():
        if config.init_tokens:
            closed_form_start(clt, *units.apply(x, y), config, generator, progress)
        else:
            random_start(clt, generator)
            clt.b_dec.copy_(units.apply(x, y)[1].mean(1))
    del x, y
    optimizer = torch.optim.Adam(clt.parameters(), lr=config.lr)
    warmup = max(1, round(config.warmup * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (config.steps - step) / max(1, config.steps - warmup)))
    thresholds = torch.zeros(n, device=device)  # with no step: JumpReLU at 0 is the start's ReLU
    batches = activation_batches(lm, windows, fit_windows, config, units, generator)
    bar = tqdm(range(config.steps), desc="train CLT", disable=not progress)
    started = time.perf_counter()
    for step in bar:
        x, y = next(batches)
        loss, fvu, smallest = clt.loss(x, y, config.k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = config.threshold_decay
        thresholds = smallest if step == 0 else decay * thresholds + (1 - decay) * smallest
        bar.set_postfix(fvu=f"{loss.item():.3f}")
        if log is not None:
            log.append({"step": step, "seconds": time.perf_counter() - started, "lr": schedule.get_last_lr()[0],
                        "fvu": loss.item(), "fvu_per_layer": fvu.tolist()})
    trained = clt.to_transcoder(units, thresholds, lm.name)
    save_transcoder(trained, out_dir)
    return trained
