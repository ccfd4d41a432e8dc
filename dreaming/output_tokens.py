"""A feature's output tokens: the tokens its decoder promotes and suppresses most directly.

A feature's direct effect on the logits is its decoder, summed over the layers it writes to (each output is added
to the residual stream, which runs on to the unembedding), times the unembedding matrix: `logits = W_U @
sum_j W_dec[f, j]`. The final norm is left out: its per-channel scale would re-weight the ranking a little, and
its normalisation depends on the whole residual, so it has no fixed effect. Dashboards show this ranking as a
feature's top and bottom logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreaming.activation import token_pieces
from dreaming.features import Feature, check_feature
from dreaming.formats import open_transcoder
from dreaming.formats.files import TranscoderFiles
from dreaming.models import LanguageModel


def output_directions(transcoder: str | Path | TranscoderFiles, features: list[Feature]) -> torch.Tensor:
    """[n, d_model] fp32: each feature's decoder summed over the layers it writes to (read row by row);
    `transcoder`: any reference `open_transcoder` takes, or open files."""
    files = transcoder if isinstance(transcoder, TranscoderFiles) else open_transcoder(transcoder)
    for feature in features:
        check_feature(feature, files.config.layer_ids, files.config.d_transcoder)
    rows = [files.decoder_rows(f.layer, f.index, f.index + 1)[0].sum(0) for f in features]
    return torch.stack(rows)


def output_tokens(lm: LanguageModel, transcoder: str | Path | TranscoderFiles, features: list[Feature], k: int = 10
                  ) -> list[dict]:
    """Per feature {"top": [(token, logit effect)], "bottom": [...]}: the k tokens its decoder promotes most and the
    k it suppresses most, strongest first, through `lm`'s unembedding."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    unembedding = lm.model.get_output_embeddings().weight  # [vocab, d_model]
    directions = output_directions(transcoder, features).to(unembedding.device, unembedding.dtype)
    with torch.no_grad():
        logits = (directions @ unembedding.T).float().cpu()  # [n, vocab]
    k = min(k, logits.shape[-1])
    found = []
    for row in logits:
        top, bottom = row.topk(k), row.topk(k, largest=False)
        found.append({name: list(zip(token_pieces(lm, lm.tokenizer.convert_ids_to_tokens(ids.tolist())),
                                     values.tolist()))
                      for name, (values, ids) in (("top", top), ("bottom", bottom))})
    return found
