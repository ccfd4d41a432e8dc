"""Training the default transcoder, a per-layer skip transcoder set, in closed form.

The recipe (no gradient steps; each choice measured on the 2-core development CPU, figures in the README):
1. Activations: every layer's MLP input x and output y at `fit_tokens` positions of corpus windows, from bf16
   forward passes (BOS and padding dropped).
2. Per layer, with x scaled to a mean squared norm of d_model and centred:
   a. skip: the least-squares linear map from x to y;
   b. features: spherical k-means of what the skip leaves unexplained (y − skip(x)) into F clusters, so features
      are kinds of output the MLP writes; each feature's encoder is the least-squares regression of its cluster's
      membership on x (one solve for all F);
   c. bias: each feature fires (ReLU) on its share k/F of the fit tokens, so on that data none is dead or dense
      and the mean L0 is k;
   d. decoders, skip and output bias: one least-squares fit of y on [features, x], with a small ridge.
3. Saved in circuit-tracer's transcoder_set layout (`layer_{l}.safetensors` with `W_skip`), unnormalised.

Also the activation collection every recipe and the evaluation (dreaming/build/evaluate.py) share: `layer_activations`,
`collect_activations`, and `split_windows`, the one rule for which corpus windows are held out of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, LanguageModel, fast_dtype
from dreaming.transcoders import SET, Transcoder, TranscoderConfig
from dreaming.windows import Windows


@dataclass
class TrainConfig:
    """Options of `train_transcoder`; the flags of `dreaming train-transcoder` use the same names."""

    features_per_layer: int = 2048
    k: int = 24  # mean active features per token and layer on the fit tokens (more on unseen kinds of text)
    fit_tokens: int = 65_536  # positions whose activations place the features and fit the decoders
    kmeans_iterations: int = 8
    ridge: float = 1e-2  # of the final least-squares fit, relative to the mean diagonal of its Gram matrix
    batch_windows: int = 32  # windows per forward pass
    heldout_windows: int = 64  # windows kept out of fitting for the report
    seed: int = 0

    def __post_init__(self):
        for name in ("features_per_layer", "k", "fit_tokens", "kmeans_iterations", "batch_windows", "heldout_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.features_per_layer:
            raise ValueError(f"k ({self.k}) cannot exceed features_per_layer ({self.features_per_layer})")
        if self.fit_tokens < 4 * self.features_per_layer:
            raise ValueError(f"fit_tokens ({self.fit_tokens}) must be at least 4 × features_per_layer "
                             f"({4 * self.features_per_layer}) to place every feature")
        if not 0 <= self.ridge < 1:
            raise ValueError(f"ridge must be in [0, 1), got {self.ridge}")


def measured_positions(n_positions: int, lengths: torch.Tensor) -> torch.Tensor:
    """[batch, pos] bool: the positions every transcoder is fitted and measured on (BOS and padding dropped)."""
    positions = torch.arange(n_positions)[None, :]
    return (positions >= 1) & (positions < lengths[:, None])


def layer_activations(lm: LanguageModel, tokens: torch.Tensor, lengths: torch.Tensor, return_logits: bool = False):
    """MLP inputs and outputs of every layer at the measured positions (BOS and padding dropped); with
    `return_logits` also the model's logits from the same forward pass (which then runs to the end).

    tokens [batch, pos], lengths [batch] -> x, y [n_layers, n_tokens, d_model] in the model's dtype
    (and logits [batch, pos, vocab]).
    """
    n_layers = lm.n_layers
    positions = torch.arange(tokens.shape[1])
    keep = measured_positions(tokens.shape[1], lengths).to(lm.device)  # [batch, pos]
    attention_mask = (positions[None, :] < lengths[:, None]).long().to(lm.device)
    tokens = tokens.to(lm.device)
    hooks = [(HOOK_MLP_IN, l) for l in range(n_layers)] + [(HOOK_MLP_OUT, l) for l in range(n_layers)]
    with torch.no_grad():
        if return_logits:
            with lm.hooked(hooks) as values:
                logits = lm.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False).logits
        else:
            values = lm.capture(tokens, hooks, attention_mask=attention_mask)
    x = torch.stack([values[(HOOK_MLP_IN, l)][keep] for l in range(n_layers)])
    y = torch.stack([values[(HOOK_MLP_OUT, l)][keep] for l in range(n_layers)])
    return (x, y, logits) if return_logits else (x, y)


def split_windows(windows: Windows, heldout_windows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Window indices for fitting and the `heldout_windows` held out for the report, shuffled under `seed`."""
    order = np.random.default_rng(seed).permutation(len(windows.tokens))
    if len(order) <= heldout_windows:
        raise ValueError(f"the corpus has {len(order)} windows; it needs more than heldout_windows "
                         f"({heldout_windows})")
    return order[heldout_windows:], order[:heldout_windows]


def collect_activations(lm: LanguageModel, windows: Windows, indices: np.ndarray, n_tokens: int,
                        batch_windows: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [n_layers, n_tokens, d_model] (model dtype) from the windows in `indices`, in that order."""
    xs, ys, have = [], [], 0
    bar = tqdm(total=n_tokens, desc="activations", unit="tok", disable=not progress)
    for start in range(0, len(indices), batch_windows):
        chosen = indices[start : start + batch_windows]
        x, y = layer_activations(lm, torch.from_numpy(windows.tokens[chosen]).long(),
                                 torch.from_numpy(windows.lengths[chosen]).long())
        xs.append(x[:, : n_tokens - have])
        ys.append(y[:, : n_tokens - have])
        have += xs[-1].shape[1]
        bar.update(xs[-1].shape[1])
        if have >= n_tokens:
            break
    bar.close()
    if have < n_tokens:
        raise ValueError(f"the corpus has only {have} tokens to fit on; fit_tokens is {n_tokens}")
    return torch.cat(xs, 1), torch.cat(ys, 1)


def least_squares(a: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ||a W + b − y||² + ridge · mean(diag) · ||W||², for a [N, n], y [N, m] (fp32)."""
    a_mean, y_mean = a.mean(0), y.mean(0)
    gram = a.T @ a - len(a) * torch.outer(a_mean, a_mean)
    gram.diagonal().add_(ridge * gram.diagonal().mean() + 1e-6)
    weights = torch.linalg.solve(gram, a.T @ y - len(a) * torch.outer(a_mean, y_mean))
    return weights, y_mean - a_mean @ weights


def spherical_kmeans(z: torch.Tensor, n_clusters: int, iterations: int, generator: torch.Generator,
                     chunk: int = 16_384) -> torch.Tensor:
    """Cluster the rows of z [N, d] by cosine similarity; returns each row's cluster [N]. Starts from random rows;
    a cluster left empty restarts at a random row. Similarities in the device's fast dtype (only their argmax is
    used)."""
    unit = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    centres = unit[torch.randperm(len(z), generator=generator)[:n_clusters]].clone()  # [F, d]

    def assign():
        dtype = fast_dtype(unit.device)
        return torch.cat([(rows.to(dtype) @ centres.to(dtype).T).argmax(-1) for rows in unit.split(chunk)])

    for _ in range(iterations):
        cluster = assign()
        sums = torch.zeros_like(centres).index_add_(0, cluster, unit)
        empty = torch.bincount(cluster, minlength=n_clusters) == 0
        sums[empty] = unit[torch.randperm(len(z), generator=generator)[: int(empty.sum())]]
        centres = sums / sums.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return assign()


@dataclass
class LayerFit:
    """One layer of the transcoder set, in the model's units: acts = relu(x @ W_enc.T + b_enc),
    y ≈ acts @ W_dec + x @ W_skip.T + b_dec."""

    W_enc: torch.Tensor  # [F, d_model]
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, d_model]
    W_skip: torch.Tensor  # [d_out, d_in]
    b_dec: torch.Tensor  # [d_model]


def output_cluster_directions(centred: torch.Tensor, y: torch.Tensor, n_features: int, iterations: int,
                              generator: torch.Generator, skip: bool = True) -> torch.Tensor:
    """Steps 2a–2b: unit encoder directions [d, F] for centred inputs [N, d] and outputs y [N, d]: the membership
    regressions, normalised."""
    directions = membership_regressions(centred, y, n_features, iterations, generator, skip)
    return directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-12)


def membership_regressions(centred: torch.Tensor, y: torch.Tensor, n_features: int, iterations: int,
                           generator: torch.Generator, skip: bool = True) -> torch.Tensor:
    """[d, F]: the outputs a linear skip leaves unexplained (with no skip, the centred outputs) are clustered; each
    column is the regression of one cluster's membership on the input, (XᵀX + ridge)⁻¹ Xᵀ onehot, where Xᵀ onehot
    is the per-cluster sum of inputs. Its norm grows with the cluster's size."""
    if skip:
        weights, bias = least_squares(centred, y, 1e-3)
        unexplained = y - centred @ weights - bias
    else:
        unexplained = y - y.mean(0)
    cluster = spherical_kmeans(unexplained, n_features, iterations, generator)  # [N]
    gram = centred.T @ centred
    gram.diagonal().add_(1e-3 * gram.diagonal().mean())
    sums = centred.new_zeros(n_features, centred.shape[1]).index_add_(0, cluster, centred)  # [F, d]
    return torch.linalg.solve(gram, sums.T)


def firing_thresholds(pre: torch.Tensor, share: float) -> torch.Tensor:
    """Step 2c: per feature, the pre-activation [N, F] value it exceeds on `share` of the tokens: [F]."""
    return pre.kthvalue(len(pre) - max(1, round(len(pre) * share)), dim=0).values


def fit_layer(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, generator: torch.Generator,
              skip: bool = True) -> LayerFit:
    """Steps 2a–2d of the recipe for one layer: x, y [N, d_model]. With skip=False (a CLT's start) the features
    alone reconstruct y, and W_skip is zero."""
    x, y = x.float(), y.float()
    F = config.features_per_layer
    scale = (x.shape[1] / x.pow(2).sum(-1).mean()).sqrt()
    mean = (x * scale).mean(0)
    centred = x * scale - mean  # [N, d]
    directions = output_cluster_directions(centred, y, F, config.kmeans_iterations, generator, skip)  # [d, F]
    pre = centred @ directions  # [N, F]
    threshold = firing_thresholds(pre, config.k / F)  # [F]
    acts = (pre - threshold).relu()
    del pre
    weights, bias = least_squares(torch.cat([acts, centred], 1) if skip else acts, y, config.ridge)  # [F (+ d), d]
    W_dec, W_x = weights[:F], weights[F:] if skip else centred.new_zeros(x.shape[1], y.shape[1])
    return LayerFit(W_enc=(directions * scale).T.contiguous(), b_enc=-(mean @ directions) - threshold,
                    W_dec=W_dec.contiguous(), W_skip=(W_x * scale).T.contiguous(), b_dec=bias - mean @ W_x)


def train_transcoder(lm: LanguageModel, windows: Windows, config: TrainConfig, out_dir: Path,
                     progress: bool = True) -> Transcoder:
    """Fit a skip transcoder set for `lm` on `windows` (held-out windows excluded); saved to `out_dir`."""
    fit_windows, _ = split_windows(windows, config.heldout_windows, config.seed)
    x, y = collect_activations(lm, windows, fit_windows, config.fit_tokens, config.batch_windows, progress)
    L, d, F = lm.n_layers, lm.d_model, config.features_per_layer
    transcoder = Transcoder(TranscoderConfig(SET, L, d, F, activation="relu", model_name=lm.name,
                                             skip_connection=True))
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for layer in tqdm(range(L), desc="fit layers", disable=not progress):
            fit = fit_layer(x[layer].to(lm.device), y[layer].to(lm.device), config, generator)
            for name in ("W_enc", "b_enc", "W_dec", "W_skip", "b_dec"):
                getattr(transcoder, name)[layer].copy_(getattr(fit, name))
    save_transcoder(transcoder, out_dir)
    return transcoder
