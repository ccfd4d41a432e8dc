"""Training a cross-layer transcoder (CLT) on activations streamed from the model, and evaluating one.

The recipe (each choice measured on the 2-core development CPU; figures in the README):
- activations (`mlp.hook_in` -> `mlp.hook_out`) come from bf16 forward passes over shuffled corpus windows
  into an in-memory buffer; each is trained on `reuse` times, since the forward pass costs as much as a step;
  nothing is written to disk;
- every layer's input and target are scaled to a mean squared norm of d_model, so each layer weighs the same
  in the loss; the scales are folded into the weights on save;
- BatchTopK sparsity (the k·batch largest activations of a layer over the whole batch), turned into a
  per-layer JumpReLU threshold on save;
- data-based initialisation: each feature's encoder starts as a random training token's input direction and
  the decoders as the least-squares fit, so training starts near FVU 0.4 instead of 1;
- decoders are kept per *target* layer as one [(sources) · F, d_model] matrix (one matmul per target layer);
  `reach` bounds how many later layers a feature writes to; fp32 master weights, bf16 compute;
- an auxiliary loss (AuxK) lets dead features reconstruct the residual error so they come back;
- Adam with warm-up and cosine decay, checkpoints;
- a final least-squares refit of the decoders on new windows, with the JumpReLU activations inference uses;
- `evaluate_clt`: per-layer FVU, L0 and dead fraction on held-out windows, and the replacement model's
  cross-entropy.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dreaming.corpus import Windows
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, LanguageModel
from dreaming.transcoders import CLT, Transcoder, TranscoderConfig, save_transcoder


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_clt`; the CLI flags of `dreaming train-clt` use the same names."""

    features_per_layer: int = 512
    k: int = 48  # mean active features per token and layer (BatchTopK)
    reach: int | None = 2  # later layers a feature writes to besides its own; None = all (see README)
    tokens: int = 300_000  # training tokens (steps × batch)
    batch_windows: int = 32  # windows per step (tokens per step ≈ batch_windows · (window_length - 1))
    reuse: int = 4  # times each model activation is trained on (model forwards are the costly part)
    buffer_windows: int = 256  # windows of activations held in memory and sampled from
    lr: float = 1e-4
    warmup_steps: int = 10
    aux_k: int = 128  # dead features used by the auxiliary loss per token
    aux_weight: float = 1 / 32
    dead_after_tokens: int = 100_000  # a feature that has not fired for this many tokens counts as dead
    heldout_windows: int = 64  # windows kept out of training for the report
    refit_tokens: int = 65_536  # new tokens for the final least-squares fit of the decoders (0: none)
    checkpoint_every: int = 25  # steps
    seed: int = 0

    def __post_init__(self):
        for name in ("features_per_layer", "k", "tokens", "batch_windows", "reuse", "buffer_windows",
                     "heldout_windows", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reach is not None and self.reach < 0:
            raise ValueError(f"reach must be >= 0 or None (every later layer), got {self.reach}")
        if self.refit_tokens < 0:
            raise ValueError(f"refit_tokens must be >= 0, got {self.refit_tokens}")
        if self.buffer_windows < self.batch_windows:
            raise ValueError(f"buffer_windows ({self.buffer_windows}) must be >= batch_windows ({self.batch_windows})")
        if self.k > self.features_per_layer:
            raise ValueError(f"k ({self.k}) cannot exceed features_per_layer ({self.features_per_layer})")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")


def layer_activations(lm: LanguageModel, tokens: torch.Tensor, lengths: torch.Tensor):
    """MLP inputs and outputs of every layer at the measured positions (BOS and padding dropped).

    tokens [batch, pos], lengths [batch] -> x, y [n_layers, n_tokens, d_model] in the model's dtype.
    """
    n_layers = lm.n_layers
    positions = torch.arange(tokens.shape[1])
    keep = (positions[None, :] >= 1) & (positions[None, :] < lengths[:, None])  # [batch, pos]
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    hooks = [(HOOK_MLP_IN, l) for l in range(n_layers)] + [(HOOK_MLP_OUT, l) for l in range(n_layers)]
    with torch.no_grad():
        values = lm.capture(tokens.to(lm.device), hooks, attention_mask=attention_mask.to(lm.device))
    keep = keep.to(lm.device)
    x = torch.stack([values[(HOOK_MLP_IN, l)][keep] for l in range(n_layers)])
    y = torch.stack([values[(HOOK_MLP_OUT, l)][keep] for l in range(n_layers)])
    return x, y


class CLTTrainer(torch.nn.Module):
    """The CLT in its training layout. Inputs and targets are in normalised units (see `input_scale`)."""

    def __init__(self, n_layers: int, d_model: int, config: TrainConfig):
        super().__init__()
        L, F, d = n_layers, config.features_per_layer, d_model
        self.n_layers, self.n_features, self.d_model, self.k = L, F, d, config.k
        reach = L - 1 if config.reach is None else min(config.reach, L - 1)
        self.first_source = [max(0, t - reach) for t in range(L)]  # target t reads sources first_source[t]..t
        self.W_enc = torch.nn.Parameter(torch.zeros(L, d, F))  # [layer, d_model, F]
        self.b_enc = torch.nn.Parameter(torch.zeros(L, 1, F))
        self.W_dec = torch.nn.ParameterList(  # [(sources of t) · F, d_model], source-major
            [torch.nn.Parameter(torch.zeros((t + 1 - self.first_source[t]) * F, d)) for t in range(L)]
        )
        self.b_dec = torch.nn.Parameter(torch.zeros(L, 1, d))
        self.register_buffer("input_scale", torch.ones(L, 1, 1))
        self.register_buffer("output_scale", torch.ones(L, 1, 1))
        self.register_buffer("threshold", torch.zeros(L))  # running BatchTopK threshold per layer
        self.register_buffer("tokens_since_fired", torch.zeros(L, F))

    def diagonal(self, t: int) -> torch.Tensor:
        """Decoder rows of layer t's own features into layer t: [F, d_model]."""
        return self.W_dec[t][(t - self.first_source[t]) * self.n_features :]

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        """Scales from the first batch; each feature's encoder starts as a random token's centred input,
        and the decoders as the least-squares fit to the batch."""
        L, F, d = self.n_layers, self.n_features, self.d_model
        x, y = x.float(), y.float()
        self.input_scale.copy_((d / x.pow(2).sum(-1).mean(-1)).sqrt().view(L, 1, 1))
        self.output_scale.copy_((d / y.pow(2).sum(-1).mean(-1)).sqrt().view(L, 1, 1))
        x, y = x * self.input_scale, y * self.output_scale
        x_mean = x.mean(1, keepdim=True)
        # different tokens for each layer: shared picks make features of neighbouring layers collinear, and
        # the cross-layer least-squares fit then cancels huge decoder rows against each other
        picks = torch.stack([torch.randperm(x.shape[1], generator=generator)[:F] for _ in range(L)]).to(x.device)
        directions = torch.gather(x, 1, picks[..., None].expand(L, F, d)) - x_mean  # [L, F, d]
        self.W_enc.copy_((directions / directions.norm(dim=-1, keepdim=True)).transpose(1, 2))
        # centre the encoder so about k of F features fire on a typical token
        pre = torch.bmm(x - x_mean, self.W_enc)  # [L, N, F]
        kth = pre.flatten(1).kthvalue(round((1 - self.k / F) * pre[0].numel()), dim=1).values  # [L]
        self.b_enc.copy_(-kth.view(L, 1, 1).expand(L, 1, F))
        self.refit_decoders([(x.to(torch.bfloat16), y)], batch_topk=True)

    @torch.no_grad()
    def refit_decoders(self, batches, batch_topk: bool, ridge: float = 1e-2):
        """Set every decoder and output bias to the least-squares fit of the targets from the current encoder's
        activations, accumulated over `batches` of normalised (x [L, N, d] bf16, y [L, N, d]).

        Streaming: memory holds one batch plus a Gram matrix per target layer, so the fit can use many tokens
        (a fit on few tokens over-fits rare features, whose decoder rows then blow up on new text). With
        batch_topk=False the activations are the saved model's JumpReLU ones, the ones inference will use.
        """
        L, F = self.n_layers, self.n_features
        sizes = [(t + 1 - self.first_source[t]) * F for t in range(L)]
        device = self.W_enc.device
        gram = [torch.zeros(n, n, device=device) for n in sizes]
        cross = [torch.zeros(n, self.d_model, device=device) for n in sizes]
        sum_a = [torch.zeros(n, device=device) for n in sizes]
        sum_y, count = torch.zeros(L, self.d_model, device=device), 0
        for x, y in batches:
            if batch_topk:
                acts = self.encode(x)[0].float()
            else:
                pre = torch.baddbmm(self.b_enc.to(x.dtype), x, self.W_enc.to(x.dtype)).float()
                acts = pre * (pre > self.threshold.view(L, 1, 1))  # [L, N, F]
            y = y.float()
            for t in range(L):
                a = acts[self.first_source[t] : t + 1].transpose(0, 1).flatten(1)  # [N, sources · F]
                gram[t] += a.T @ a
                cross[t] += a.T @ y[t]
                sum_a[t] += a.sum(0)
            sum_y += y.sum(1)
            count += y.shape[1]
        for t in range(L):
            a_mean, y_mean = sum_a[t] / count, sum_y[t] / count
            centred_gram = gram[t] - count * torch.outer(a_mean, a_mean)
            centred_gram.diagonal().add_(ridge * centred_gram.diagonal().mean() + 1e-6)
            weights = torch.linalg.solve(centred_gram, cross[t] - count * torch.outer(a_mean, y_mean))  # [sources·F, d]
            self.W_dec[t].copy_(weights)
            self.b_dec[t].copy_(y_mean - a_mean @ weights)

    def normalise(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model activations [L, N, d] -> normalised units: (x as bf16 for the encoder, y as fp32)."""
        return (x.float() * self.input_scale).bfloat16(), y.float() * self.output_scale

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [L, N, d] (normalised, bf16) -> BatchTopK activations [L, N, F] and pre-activations."""
        L, N, F = x.shape[0], x.shape[1], self.n_features
        pre = torch.baddbmm(self.b_enc.to(x.dtype), x, self.W_enc.to(x.dtype))  # [L, N, F]
        values, indices = pre.relu().flatten(1).topk(N * self.k, dim=1, sorted=False)  # [L, N·k]
        acts = torch.zeros_like(pre.flatten(1)).scatter(1, indices, values).view(L, N, F)
        if self.training:
            with torch.no_grad():
                batch_threshold = values.min(dim=1).values.float()
                self.threshold.lerp_(batch_threshold, 0.05 if self.threshold.any() else 1.0)
        return acts, pre

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [L, N, F] -> reconstructions of every target layer [L, N, d] (normalised units)."""
        L, N, F = acts.shape
        acts_by_token = acts.transpose(0, 1).reshape(N, L * F)  # [N, L·F], source-major
        return torch.stack([
            torch.addmm(self.b_dec[t].to(acts.dtype), acts_by_token[:, self.first_source[t] * F : (t + 1) * F],
                        self.W_dec[t].to(acts.dtype))
            for t in range(L)
        ])

    def aux_loss(self, pre: torch.Tensor, errors: torch.Tensor, aux_k: int, dead: torch.Tensor) -> torch.Tensor:
        """AuxK: the top dead features of each layer reconstruct that layer's residual error (diagonal decoder)."""
        L, N, F = pre.shape
        if not dead.any():
            return pre.new_zeros((), dtype=torch.float32)
        masked = pre.relu() * dead[:, None, :].to(pre.dtype)
        values, indices = masked.topk(min(aux_k, F), dim=-1)  # [L, N, aux_k]
        aux_acts = torch.zeros_like(masked).scatter(-1, indices, values)
        diagonal = torch.stack([self.diagonal(t) for t in range(L)]).to(pre.dtype)  # [L, F, d]
        reconstruction = torch.bmm(aux_acts, diagonal).float()
        per_layer = (reconstruction - errors).pow(2).sum(-1).mean(-1) / errors.pow(2).sum(-1).mean(-1).clamp_min(1e-6)
        return (per_layer * dead.any(dim=1)).sum()

    def to_transcoder(self, model_name: str | None) -> Transcoder:
        """Fold the normalisation into the weights: the circuit-tracer layout with JumpReLU thresholds."""
        L, F, d = self.n_layers, self.n_features, self.d_model
        config = TranscoderConfig(CLT, L, d, F, activation="jumprelu", model_name=model_name)
        transcoder = Transcoder(config)
        s_in, s_out = self.input_scale.view(L, 1, 1), self.output_scale.view(L, 1)
        with torch.no_grad():
            # pre = (x · s_in) @ W_enc + b_enc  =>  saved W_enc = s_in · W_enc^T
            transcoder.W_enc.copy_(self.W_enc.transpose(1, 2) * s_in)
            transcoder.b_enc.copy_(self.b_enc.view(L, F))
            transcoder.threshold.copy_(self.threshold.view(L, 1).expand(L, F))
            transcoder.b_dec.copy_(self.b_dec.view(L, d) / s_out)
            for target in range(L):
                for source in range(self.first_source[target], target + 1):
                    offset = (source - self.first_source[target]) * F
                    rows = self.W_dec[target][offset : offset + F]
                    transcoder.W_dec[source][:, target - source].copy_(rows / s_out[target])
        return transcoder


def _window_tensors(windows: Windows, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [batch, pos] and lengths [batch] of the given windows (read in file order)."""
    chosen = np.sort(indices)
    return torch.from_numpy(windows.tokens[chosen]).long(), torch.from_numpy(windows.lengths[chosen]).long()


def _batches(windows: Windows, indices: np.ndarray, batch_windows: int):
    for start in range(0, len(indices), batch_windows):
        yield _window_tensors(windows, indices[start : start + batch_windows])


def split_windows(windows: Windows, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Window indices for training and for the held-out report, shuffled under the seed."""
    order = np.random.default_rng(config.seed).permutation(len(windows.tokens))
    if len(order) < config.heldout_windows + config.buffer_windows:
        raise ValueError(
            f"the corpus has {len(order)} windows; training needs at least "
            f"{config.heldout_windows + config.buffer_windows} (heldout_windows + buffer_windows)"
        )
    return order[config.heldout_windows :], order[: config.heldout_windows]


class ActivationBuffer:
    """Model activations of many windows held in memory; each step trains on a random sample and refreshes
    a share 1/reuse of it with new windows, so every activation is used about `reuse` times."""

    def __init__(self, lm: LanguageModel, windows: Windows, order: np.ndarray, config: TrainConfig):
        self.lm, self.windows = lm, windows
        self.order, self.next_window = order, 0
        self.rng = torch.Generator().manual_seed(config.seed)
        self.x, self.y = self.read(config.buffer_windows)  # [L, B, d] each, model dtype

    def read(self, n_windows: int):
        chosen = self.order[np.arange(self.next_window, self.next_window + n_windows) % len(self.order)]
        self.next_window += n_windows
        return layer_activations(self.lm, *_window_tensors(self.windows, chosen))

    def sample(self, n_tokens: int):
        picks = torch.randperm(self.x.shape[1], generator=self.rng)[:n_tokens]
        return self.x[:, picks], self.y[:, picks]

    def refresh(self, n_windows: int):
        x, y = self.read(n_windows)
        slots = torch.randperm(self.x.shape[1], generator=self.rng)[: x.shape[1]]
        self.x[:, slots], self.y[:, slots] = x, y


def train_clt(
    lm: LanguageModel, windows: Windows, config: TrainConfig, out_dir: Path, progress: bool = True
) -> Transcoder:
    """Train a CLT for `lm` on `windows`; checkpoints go to `out_dir/checkpoint.pt` and a run resumes from one.

    Returns the transcoder, also saved in the circuit-tracer layout to `out_dir/clt`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    torch.manual_seed(config.seed)
    train_windows, _ = split_windows(windows, config)
    batch_tokens = config.batch_windows * (windows.tokens.shape[1] - 1)
    total_steps = max(1, math.ceil(config.tokens / batch_tokens))
    refresh_windows = max(1, round(config.batch_windows / config.reuse))

    trainer = CLTTrainer(lm.n_layers, lm.d_model, config).to(lm.device)
    optimizer = torch.optim.Adam(trainer.parameters(), lr=config.lr)

    def lr_at(step):  # linear warm-up, cosine decay to zero
        return config.lr * min(1.0, (step + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    step = 0
    buffer = ActivationBuffer(lm, windows, train_windows, config)
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint_path} was made with another configuration; delete it to start over")
        trainer.load_state_dict(state["trainer"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        buffer.next_window = state["next_window"]
    else:
        trainer.initialise(*buffer.sample(4 * batch_tokens), torch.Generator().manual_seed(config.seed))

    bar = tqdm(total=total_steps, initial=step, desc="train CLT", unit="step", disable=not progress)
    fvu_avg = l0_avg = None
    started, tokens_seen = time.perf_counter(), 0
    for step in range(step, total_steps):
        x, y = trainer.normalise(*buffer.sample(batch_tokens))  # [L, N, d]
        acts, pre = trainer.encode(x)
        errors = trainer.decode(acts).float() - y  # [L, N, d]
        variance = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)  # [L]
        fvu = errors.pow(2).sum(-1).mean(-1) / variance  # [L]
        dead = trainer.tokens_since_fired >= config.dead_after_tokens
        loss = fvu.sum() + config.aux_weight * trainer.aux_loss(pre, errors.detach(), config.aux_k, dead)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        buffer.refresh(refresh_windows)

        with torch.no_grad():
            fired = (acts > 0).any(dim=1)  # [L, F]
            trainer.tokens_since_fired.add_(x.shape[1]).masked_fill_(fired, 0)
            l0 = (acts > 0).float().sum(-1).mean().item()
        fvu_avg = fvu.mean().item() if fvu_avg is None else 0.9 * fvu_avg + 0.1 * fvu.mean().item()
        l0_avg = l0 if l0_avg is None else 0.9 * l0_avg + 0.1 * l0
        tokens_seen += x.shape[1]
        bar.set_postfix(fvu=f"{fvu_avg:.3f}", l0=f"{l0_avg:.1f}", dead=f"{dead.float().mean().item():.1%}",
                        tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
        bar.update(1)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
            partial = checkpoint_path.with_suffix(".partial")
            torch.save({"config": asdict(config), "trainer": trainer.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step + 1, "next_window": buffer.next_window}, partial)
            partial.replace(checkpoint_path)
    bar.close()
    if config.refit_tokens:
        # fit the decoders, on new windows, to the activations inference will produce (JumpReLU thresholds)
        n_batches = math.ceil(config.refit_tokens / batch_tokens)
        trainer.refit_decoders((trainer.normalise(*buffer.read(config.batch_windows)) for _ in
                                tqdm(range(n_batches), desc="refit decoders", disable=not progress)), batch_topk=False)
    transcoder = trainer.to_transcoder(lm.name)
    save_transcoder(transcoder, out_dir / "clt")
    checkpoint_path.unlink(missing_ok=True)
    return transcoder


@torch.no_grad()
def evaluate_clt(lm: LanguageModel, transcoder: Transcoder, windows: Windows, indices: np.ndarray,
                 batch_windows: int = 16, progress: bool = True) -> dict:
    """Per-layer FVU, L0 and dead fraction on the given windows, and the replacement model's cross-entropy.

    The replacement model swaps every MLP output for the CLT's reconstruction, computed from the replacement
    model's own MLP inputs as they flow (errors compound through the layers).
    """
    L, F = transcoder.config.n_layers, transcoder.config.d_transcoder
    device = lm.device
    squared_error, sum_y2, active = (torch.zeros(L, device=device) for _ in range(3))
    sum_y, n_tokens = torch.zeros(L, transcoder.config.d_model, device=device), 0
    fired = torch.zeros(L, F, dtype=torch.bool, device=device)
    ce_model, ce_replaced, n_predicted = 0.0, 0.0, 0
    transcoder = transcoder.float().to(device)
    for tokens, lengths in tqdm(list(_batches(windows, indices, batch_windows)), desc="evaluate CLT",
                                disable=not progress):
        x, y = layer_activations(lm, tokens, lengths)
        x, y = x.float(), y.float()
        acts, reconstruction = transcoder(x)
        squared_error += (reconstruction - y).pow(2).sum(-1).sum(-1)
        sum_y += y.sum(1)
        sum_y2 += y.pow(2).sum(-1).sum(-1)
        stacked = torch.stack(acts) > 0  # [L, N, F]
        active += stacked.float().sum(-1).sum(-1)
        fired |= stacked.any(dim=1)
        n_tokens += y.shape[1]
        base, replaced, count = _cross_entropies(lm, transcoder, tokens, lengths)
        ce_model, ce_replaced, n_predicted = ce_model + base, ce_replaced + replaced, n_predicted + count
    variance = sum_y2 - sum_y.pow(2).sum(-1) / n_tokens  # Σ||y - ȳ||² = Σ||y||² - ||Σy||²/n
    fvu = (squared_error / variance).tolist()
    return {
        "tokens": n_tokens,
        "fvu": fvu,
        "l0": (active / n_tokens).tolist(),
        "dead_fraction": (~fired).float().mean(1).tolist(),
        "mean_fvu": float(np.mean(fvu)),
        "mean_l0": float((active / n_tokens).mean()),
        "mean_dead_fraction": float((~fired).float().mean()),
        "cross_entropy": ce_model / n_predicted,
        "replacement_cross_entropy": ce_replaced / n_predicted,
    }


def _cross_entropies(lm: LanguageModel, transcoder: Transcoder, tokens: torch.Tensor, lengths: torch.Tensor):
    """Summed next-token cross-entropy of the model and of its CLT replacement over the valid positions."""
    positions = torch.arange(tokens.shape[1])
    mask = (positions[None, :] < lengths[:, None]).long().to(lm.device)
    tokens = tokens.to(lm.device)

    def summed_ce(logits):
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
        valid = mask[:, 1:].bool()
        return losses[valid].sum().item(), int(valid.sum())

    base, count = summed_ce(lm.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits)
    acts: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(transcoder.config.n_layers):
        norm, _ = lm.hook_module(HOOK_MLP_IN, layer)
        mlp, _ = lm.hook_module(HOOK_MLP_OUT, layer)

        def read_input(module, args, output, layer=layer):
            acts[layer] = transcoder.encode(output.float(), layer)

        def replace_output(module, args, output, layer=layer):
            out = transcoder.b_dec[layer].clone()
            for source in range(layer + 1):
                out = out + acts[source] @ transcoder.W_dec[source][:, layer - source]
            out[:, 0] = output[:, 0]  # the BOS position is never trained on (nor measured); keep the model's
            return out.to(output.dtype)

        handles += [norm.register_forward_hook(read_input), mlp.register_forward_hook(replace_output)]
    try:
        replaced, _ = summed_ce(lm.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits)
    finally:
        for handle in handles:
            handle.remove()
    return base, replaced, count
