"""Evaluating a transcoder as the field reports it, whatever recipe made it (the closed-form set of
dreaming/build/train.py, a gradient-trained CLT): how well it reconstructs each MLP's output, how sparse its features are
and how spread their densities, and what standing in for the MLPs does to the model's next-token predictions.

Owns:
  evaluate_transcoder   the figures on one set of token sequences: FVU, L0, dead and dense fractions, the histogram
                        and percentiles of feature densities, and the cross-entropy and KL(model ‖ replacement) with
                        every MLP replaced, or one layer at a time (spliced)
  transcoder_report     that evaluation on the held-out varied texts and on the corpus windows held out of training
  heldout_sequences, window_sequences   those two sets as token-id lists (pad_sequences batches them)
Which windows are held out is `train.split_windows`'s rule; the activations come from `train.layer_activations`.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from dreaming.build.corpus import heldout_texts
from dreaming.build.train import layer_activations, measured_positions
from dreaming.maxima import DENSE_ABOVE
from dreaming.models import HOOK_MLP_IN, HOOK_MLP_OUT, LanguageModel
from dreaming.special_tokens import with_bos
from dreaming.transcoders import SET, Transcoder
from dreaming.windows import Windows

LOG10_DENSITY_EDGES = np.linspace(-6, 0, 13)  # histogram bins of log10(density): every half decade from 1e-6 to 1


def window_sequences(windows: Windows, indices: np.ndarray) -> list[list[int]]:
    """The given windows (in file order) as token-id lists, BOS first, padding dropped."""
    return [windows.tokens[i, : windows.lengths[i]].tolist() for i in np.sort(indices)]


def heldout_sequences(lm: LanguageModel) -> list[list[int]]:
    """The held-out varied texts (`corpus.heldout_texts`) as token-id lists, measured as every text is."""
    ids = lm.tokenizer([doc.text for doc in heldout_texts()], add_special_tokens=False)["input_ids"]
    return [with_bos(row, lm.bos_token_id) for row in ids]


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> tokens [batch, pos] (right-padded) and lengths [batch]."""
    lengths = torch.tensor([len(ids) for ids in sequences])
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens, lengths


@torch.no_grad()
def evaluate_transcoder(lm: LanguageModel, transcoder: Transcoder, sequences: list[list[int]], batch_size: int = 16,
                        splice_each_layer: bool = False, progress: bool = True) -> dict:
    """How well the transcoder stands in for the MLPs on `sequences` (token-id lists, each BOS first).

    Over every position but the BOS, per layer: FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖², L0, the fraction of features never
    active (dead) and active on more than DENSE_ABOVE of the tokens (dense); over the live features of all layers,
    the histogram of log10(density) and its 1st / 50th / 99th percentiles. Over the predicted positions: the
    cross-entropy of the model, and the cross-entropy and KL(model ‖ replacement) of the next-token distributions of
    the replacement model, in which every MLP output is the transcoder's (computed from the replacement's own MLP
    inputs as they flow, so errors compound), and, with splice_each_layer, of the model with one layer at a time
    replaced. Each batch runs the model once, and once more per replacement. A layer spliced alone reads the
    model's own MLP inputs (nothing before it is replaced), so its output is the clean pass's reconstruction, and
    the layers before it replay the clean pass's outputs (`LanguageModel.replaying`): splicing every layer costs
    about half the passes it names.
    """
    L, F = transcoder.config.n_layers, transcoder.config.d_transcoder
    device = lm.device
    squared_error, sum_y2 = torch.zeros(L, device=device), torch.zeros(L, device=device)
    sum_y, n_tokens = torch.zeros(L, transcoder.config.d_model, device=device), 0
    active_tokens = torch.zeros(L, F, dtype=torch.long, device=device)  # per feature, the tokens it is active on
    replacements = [list(range(L))] + ([[layer] for layer in range(L)] if splice_each_layer else [])
    ce_model, n_predicted = 0.0, 0
    ce_replaced, kl_replaced = np.zeros(len(replacements)), np.zeros(len(replacements))  # summed, per replacement
    transcoder = transcoder.float().to(device)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths together: less padding
    batches = [[sequences[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="evaluate transcoder", disable=not progress):
        tokens, lengths = pad_sequences(batch, lm.pad_token_id)
        with lm.layer_outputs() as layer_outputs:
            x, y, logits = layer_activations(lm, tokens, lengths, return_logits=True)
        x, y = x.float(), y.float()
        acts, reconstruction = transcoder(x)
        squared_error += (reconstruction - y).pow(2).sum(-1).sum(-1)
        sum_y += y.sum(1)
        sum_y2 += y.pow(2).sum(-1).sum(-1)
        active_tokens += (torch.stack(acts) > 0).sum(1)  # [L, F]
        n_tokens += y.shape[1]
        predicting = (torch.arange(tokens.shape[1] - 1)[None, :] < lengths[:, None] - 1).to(device)  # [batch, pos - 1]
        targets = tokens[:, 1:].to(device)[predicting]  # [n_predicted]
        model_log_probs = _log_probs(logits, predicting)  # [n_predicted, vocab]
        model_probs = model_log_probs.exp().flatten()
        ce_model += _cross_entropy(model_log_probs, targets)
        n_predicted += len(targets)
        clean = reconstruction.new_zeros(L, *tokens.shape, reconstruction.shape[-1])  # [L, batch, pos, d_model]
        clean[:, measured_positions(tokens.shape[1], lengths).to(device)] = reconstruction
        for i, replaced in enumerate(replacements):
            alone = len(replaced) == 1  # the layers before it are the clean pass's: replayed, not recomputed
            with lm.replaying({layer: layer_outputs[layer] for layer in range(replaced[0])} if alone else {}):
                logits = _replacement_logits(lm, transcoder, tokens, lengths, replaced,
                                             {replaced[0]: clean[replaced[0]]} if alone else None)
            log_probs = _log_probs(logits, predicting)
            ce_replaced[i] += _cross_entropy(log_probs, targets)
            # KL = Σ p_model (log p_model − log p), as one dot product (torch's kl_div is several times slower here)
            kl_replaced[i] += torch.dot(model_probs, log_probs.neg_().add_(model_log_probs).flatten()).item()
    variance = sum_y2 - sum_y.pow(2).sum(-1) / n_tokens  # Σ||y - ȳ||² = Σ||y||² - ||Σy||²/n
    fvu = (squared_error / variance).tolist()
    density = (active_tokens.double() / n_tokens).cpu().numpy()  # [L, F]: the share of tokens each feature is active on
    l0 = density.sum(-1)  # [L]
    report = {
        "sequences": len(sequences),
        "tokens": n_tokens,
        "fvu": fvu,
        "mean_fvu": float(np.mean(fvu)),
        "max_fvu": float(np.max(fvu)),
        "l0": l0.tolist(),
        "mean_l0": float(l0.mean()),
        "dead_fraction": (density == 0).mean(1).tolist(),
        "mean_dead_fraction": float((density == 0).mean()),
        "dense_fraction": (density > DENSE_ABOVE).mean(1).tolist(),
        "mean_dense_fraction": float((density > DENSE_ABOVE).mean()),
        "dense_above": DENSE_ABOVE,
        **density_summary(density[density > 0]),
        "cross_entropy": ce_model / n_predicted,
        "replacement_cross_entropy": float(ce_replaced[0] / n_predicted),
        "replacement_kl": float(kl_replaced[0] / n_predicted),
    }
    if splice_each_layer:
        report["spliced_cross_entropy"] = (ce_replaced[1:] / n_predicted).tolist()
        report["spliced_kl"] = (kl_replaced[1:] / n_predicted).tolist()
    return report


def density_summary(live: np.ndarray) -> dict:
    """Of the densities of live features (each > 0): the counts of log10(density) in the bins LOG10_DENSITY_EDGES
    (densities below 1e-6 count in the first), the 1st, 50th and 99th percentiles, and the decades they span,
    log10(p99 / p1); the percentiles are None when no feature is live."""
    counts, _ = np.histogram(np.log10(live).clip(LOG10_DENSITY_EDGES[0], 0), LOG10_DENSITY_EDGES)
    p1, p50, p99 = np.percentile(live, [1, 50, 99]).tolist() if len(live) else (None, None, None)
    return {"log10_density_edges": LOG10_DENSITY_EDGES.tolist(), "log10_density_counts": counts.tolist(),
            "density_p1": p1, "density_p50": p50, "density_p99": p99,
            "density_decades": float(np.log10(p99 / p1)) if p1 else None}


def _log_probs(logits: torch.Tensor, predicting: torch.Tensor) -> torch.Tensor:
    """fp32 next-token log-probabilities [n_predicted, vocab] at the positions that predict a token of their
    sequence (`predicting` [batch, pos - 1]), from logits [batch, pos, vocab]."""
    return torch.log_softmax(logits[:, :-1][predicting], -1, dtype=torch.float32)


def _cross_entropy(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of the next tokens `targets` [n] under log_probs [n, vocab]."""
    return -log_probs.gather(1, targets[:, None]).sum().item()


def _replacement_logits(lm: LanguageModel, transcoder: Transcoder, tokens: torch.Tensor, lengths: torch.Tensor,
                        replaced: list[int], outputs: dict | None = None) -> torch.Tensor:
    """The model's logits [batch, pos, vocab] with the MLP outputs of the `replaced` layers swapped for the
    transcoder's reconstruction, computed from the MLP inputs as they flow (a CLT's from every layer that writes to
    a replaced one), or, given `outputs` ({layer: [batch, pos, d_model]}), those; the BOS position keeps the
    model's outputs."""
    positions = torch.arange(tokens.shape[1])
    mask = (positions[None, :] < lengths[:, None]).long().to(lm.device)
    acts: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    sources = [] if outputs else range(max(replaced, default=-1) + 1) if transcoder.config.kind != SET else replaced
    for layer in sources:  # every layer whose features a replaced output reads
        norm, _ = lm.hook_module(HOOK_MLP_IN, layer)

        def read_input(module, args, output, layer=layer):
            inputs[layer] = output.float()
            acts[layer] = transcoder.encode(inputs[layer], layer)

        handles.append(norm.register_forward_hook(read_input))
    for layer in replaced:
        mlp, _ = lm.hook_module(HOOK_MLP_OUT, layer)

        def replace_output(module, args, output, layer=layer):
            out = outputs[layer].clone() if outputs else transcoder.decode_layer(acts, layer, inputs[layer])
            out[:, 0] = output[:, 0]  # the BOS position is never fitted (nor measured); keep the model's
            return out.to(output.dtype)

        handles.append(mlp.register_forward_hook(replace_output))
    try:
        return lm.model(input_ids=tokens.to(lm.device), attention_mask=mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def transcoder_report(lm: LanguageModel, transcoder: Transcoder, windows: Windows, heldout: np.ndarray,
                      progress: bool = True) -> dict:
    """The transcoder's evaluation, each layer also spliced in alone: on the held-out varied texts (never in any
    corpus) and on the corpus windows `heldout` (indices; `train.split_windows` says which were held out of
    training)."""
    return {
        "varied_texts": evaluate_transcoder(lm, transcoder, heldout_sequences(lm), splice_each_layer=True,
                                            progress=progress),
        "heldout_windows": evaluate_transcoder(lm, transcoder, window_sequences(windows, heldout),
                                               splice_each_layer=True, progress=progress),
    }
