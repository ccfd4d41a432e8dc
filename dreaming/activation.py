"""The one measurement function: a feature's activation on a text, and everything built on it.

The activation of a feature on a text is the maximum over the text's counted tokens of the feature's
transcoder activation. A text is measured as `[BOS] + tokens(text)` (BOS added only when the text does not
already start with it), so a window of the corpus, a user's text and a dreamed prompt inside a chat template
are all measured the same way. Position 0 (the BOS) never counts. For a prompt inside a template only the
prompt and what follows it count (`counted_from` = the prompt's first position): the template's prefix cannot
be changed by the prompt, so its own activation is reported apart, as `template_activation`.
`fraction_of_max` = activation / the feature's dataset max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreaming.encoder import LazyEncoder
from dreaming.features import Feature, check_feature
from dreaming.models import LanguageModel
from dreaming.special_tokens import with_bos
from dreaming.templates import template_ids
from dreaming.transcoders import Transcoder

MAX_TEXT_TOKENS = 1024


@dataclass
class TextActivation:
    text: str
    token_ids: list[int]  # as measured, BOS first
    tokens: list[str]  # one string per token id
    pieces: list[str]  # each token as the text it stands for (for display: what a page shades)
    token_activations: list[float]  # per token; 0 at position 0
    activation: float  # max over positions >= counted_from
    fraction_of_max: float | None  # activation / dataset max (None without maxima)
    counted_from: int = 1  # first position that counts (a template's prefix comes before it)
    template_activation: float = 0.0  # max over the positions before counted_from (the template's own)


def token_pieces(lm: LanguageModel, tokens: list[str]) -> list[str]:
    """Each token as the text it stands for (a byte-level BPE token's own string), for display."""
    return [lm.tokenizer.convert_tokens_to_string([token]) for token in tokens]


def tokenize_text(lm: LanguageModel, text: str) -> list[int]:
    """The token ids a text is measured on: BOS, then the text tokenised without special tokens added."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty text: give at least one non-blank character")
    ids = with_bos(lm.tokenizer(text, add_special_tokens=False)["input_ids"], lm.bos_token_id)
    if len(ids) > MAX_TEXT_TOKENS:
        raise ValueError(f"text too long: {len(ids)} tokens, at most {MAX_TEXT_TOKENS}")
    return ids


def input_layers(features: list[Feature]) -> list[int]:
    return sorted({feature.layer for feature in features})


def measured_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[batch, pos] bool: the positions a measurement reads (not the BOS at 0, not padding)."""
    keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    keep[:, 0] = False
    return keep & attention_mask.bool() if attention_mask is not None else keep


def layer_activations(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, layers: list[int] | None = None,
                      ) -> dict[int, torch.Tensor]:
    """Every feature of each layer in `layers` (default all): {layer: [batch, pos, F] fp32}.

    Position 0 and padding (attention_mask == 0) are zero. The encoder runs in the transcoder's dtype (fp32 for
    every reported measurement; `maxima build` runs it in the model's bf16).
    """
    layers = transcoder.config.layer_ids if layers is None else layers
    hook = transcoder.config.feature_input_hook
    keep = measured_positions(input_ids, attention_mask)
    out = {}
    with torch.no_grad():
        captured = lm.capture(input_ids, [(hook, layer) for layer in layers], attention_mask=attention_mask)
        for layer in layers:
            acts = transcoder.encode(captured[(hook, layer)], layer).float()  # [batch, pos, F], in its own dtype
            out[layer] = acts * keep.unsqueeze(-1)
    return out


def feature_activations(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, input_ids: torch.Tensor,
                        features: list[Feature], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, pos, n_features] fp32 activations of the chosen features (position 0 and padding zero). Only
    their encoder rows are used, so a LazyEncoder (which reads just those rows from disk) serves as well."""
    for feature in features:
        check_feature(feature, transcoder.config.layer_ids, transcoder.config.d_transcoder)
    keep = measured_positions(input_ids, attention_mask)
    hook = transcoder.config.feature_input_hook
    layers = input_layers(features)
    with torch.no_grad():
        captured = lm.capture(input_ids, [(hook, layer) for layer in layers], attention_mask=attention_mask)
        columns = {}
        for layer in layers:
            indices = [f.index for f in features if f.layer == layer]
            acts = transcoder.encode(captured[(hook, layer)], layer, indices).float()  # [batch, pos, n]
            for i, index in enumerate(indices):
                columns[Feature(layer, index)] = acts[..., i]
    # + 0.0 turns the -0.0 of a negative pre-activation times 0 into 0.0, which prints and compares as 0
    return torch.stack([columns[f] for f in features], dim=-1) * keep.unsqueeze(-1) + 0.0


def _pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids.to(device), mask.to(device)


def measure_token_ids(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature,
                      sequences: list[list[int]], dataset_max: float | None = None, texts: list[str] | None = None,
                      counted_from: list[int] | None = None, batch_size: int = 16) -> list[TextActivation]:
    """Measure token sequences (each BOS first); `texts` only labels them (default: the decoded ids);
    `counted_from` is each sequence's first counted position (default 1: all but the BOS)."""
    check_feature(feature, transcoder.config.layer_ids, transcoder.config.d_transcoder)
    counted_from = counted_from or [1] * len(sequences)
    if len(counted_from) != len(sequences) or any(not 1 <= c < len(s) for c, s in zip(counted_from, sequences)):
        raise ValueError("counted_from must give, per sequence, a position in 1..len - 1")
    pad_id = lm.pad_token_id
    results = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids, mask = _pad(chunk, pad_id, lm.device)
        acts = feature_activations(lm, transcoder, input_ids, [feature], mask)[..., 0].cpu()  # [batch, pos]
        for row, ids in enumerate(chunk):
            values = acts[row, : len(ids)].tolist()
            first = counted_from[start + row]
            activation = max(values[first:])
            text = texts[start + row] if texts else lm.tokenizer.decode(ids[1:])
            tokens = lm.tokenizer.convert_ids_to_tokens(list(ids))
            results.append(TextActivation(
                text=text, token_ids=list(ids), tokens=tokens, pieces=token_pieces(lm, tokens),
                token_activations=values, activation=activation,
                fraction_of_max=activation / dataset_max if dataset_max else None,
                counted_from=first, template_activation=max(values[1:first], default=0.0)))
    return results


def measure_texts(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature, texts: list[str],
                  dataset_max: float | None = None) -> list[TextActivation]:
    """The activation of `feature` on each text, per token and at its max, as a fraction of the dataset max."""
    if not texts:
        raise ValueError("no texts given")
    sequences = [tokenize_text(lm, text) for text in texts]
    return measure_token_ids(lm, transcoder, feature, sequences, dataset_max, texts=list(texts))


def measure_in_template(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature, prompts: list[str],
                        template: str, dataset_max: float | None = None) -> list[TextActivation]:
    """Each prompt measured inside `template` (one `{prompt}` slot) as a dream is: the text `prefix + prompt +
    suffix`, tokenised like any text; only the prompt and what follows it count (`counted_from` = the length of
    the prefix's own ids with BOS), and the prefix's own activation is `template_activation`. Reproduces a
    DreamedPrompt's figures from its `prompt` and its result's template."""
    if not prompts:
        raise ValueError("no prompts given")
    prefix, suffix, prefix_ids, _ = template_ids(lm, template)
    sequences, texts = [], []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("empty prompt: give the text that goes in the template's {prompt} slot")
        text = prefix + prompt + suffix
        ids = tokenize_text(lm, text)
        if ids[: len(prefix_ids)] != prefix_ids:
            raise ValueError(f"the prompt {prompt!r} merges with the template's text before {{prompt}} "
                             f"({prefix[-20:]!r}): its tokens would change the template's own, so it cannot be "
                             "measured in this template (with a BPE tokenizer the text before {prompt} should not "
                             "end with a space)")
        if len(ids) <= len(prefix_ids):
            raise ValueError(f"the prompt {prompt!r} adds no token after the template's prefix")
        sequences.append(ids)
        texts.append(text)
    return measure_token_ids(lm, transcoder, feature, sequences, dataset_max, texts=texts,
                             counted_from=[len(prefix_ids)] * len(sequences))
