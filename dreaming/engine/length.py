"""Prompt lengths: the length a feature's dream needs, and the data at a dream's own length.

Dataset maxima sit in 128-token windows; a feature whose max needs 40 tokens of context cannot be reached by a
12-token prompt. Both figures here read the feature's top dataset examples cut to a length: the last n tokens up to
and including the example's max token, measured alone after BOS (`cut_examples`).

- `choose_length`: the shortest of LENGTHS (up to the config's cap) at which the best cut example keeps KEEP of the
  best any length reaches. It reads how the examples' activation depends on length, never their tokens, so a
  dataset-free start stays free of the data's words. A feature without maxima gets FALLBACK_LENGTH.
- `length_matched_max`: the best cut example at a prompt's own length, the second yardstick beside the dataset max
  (a dream under 100% of the max but over 100% of this lost to the length, not to the data).
"""

from __future__ import annotations

from dreaming.activation import measure_token_ids
from dreaming.encoder import LazyEncoder
from dreaming.engine.results import LengthChoice
from dreaming.features import Feature
from dreaming.models import LanguageModel
from dreaming.objective import cross_entropy
from dreaming.transcoders import Transcoder

# The lengths the rule tries. None below 12: where the data fires within 8 tokens, a dream still needs room
# around the feature's few tokens (README, "Prompt length": 8 tokens against 12 on the same four features).
LENGTHS = (12, 16, 24, 32, 48, 64)
KEEP = 0.95  # the shortest length whose best cut example keeps this share of the best over all lengths wins
EXAMPLES = 10  # top dataset examples the rule and the yardstick read (a feature page shows as many)
FALLBACK_LENGTH = 16  # a feature without dataset maxima (a fresh bundle): no examples to measure
RULE = (f"the shortest of {', '.join(map(str, LENGTHS))} tokens at which the best of the feature's top {EXAMPLES} "
        f"dataset examples, cut to that many tokens up to its max token, keeps {KEEP:.0%} of what the best length "
        "gives")

Contexts = list[tuple[list[int], int]]  # a feature's top dataset examples: (window ids, BOS first; max position)


def cut(ids: list[int], position: int, length: int) -> list[int]:
    """The last `length` tokens of a window up to and including `position` (never the window's BOS)."""
    return ids[max(1, position + 1 - length) : position + 1]


def cut_examples(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature, contexts: Contexts,
                 length: int, dataset_max: float | None = None, with_cross_entropy: bool = False) -> list[dict]:
    """Each context cut to its last `length` tokens up to its max token, measured alone as `[BOS] + tokens`:
    {"tokens": n, "text", "activation" (max over the n tokens), "fraction_of_max"} and, `with_cross_entropy`, the
    mean next-token "cross_entropy" of the n tokens after the BOS (fp32)."""
    if length < 1:
        raise ValueError(f"length must be at least 1 token, got {length}")
    cuts = [cut(ids, position, length) for ids, position in contexts]
    sequences = [[lm.bos_token_id, *tokens] for tokens in cuts]
    measured = measure_token_ids(lm, transcoder, feature, sequences, dataset_max) if sequences else []
    ces = cross_entropy(lm, sequences, 1, [len(c) for c in cuts]) if with_cross_entropy else [None] * len(cuts)
    return [{"tokens": len(tokens), "text": m.text, "activation": m.activation, "fraction_of_max": m.fraction_of_max,
             **({"cross_entropy": ce} if with_cross_entropy else {})} for tokens, m, ce in zip(cuts, measured, ces)]


def length_matched_max(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature,
                       contexts: Contexts, length: int) -> float | None:
    """The best of the top EXAMPLES contexts cut to `length` tokens (None without contexts)."""
    found = cut_examples(lm, transcoder, feature, contexts[:EXAMPLES], length)
    return max((c["activation"] for c in found), default=None)


def choose_length(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature,
                  contexts: Contexts | None, cap: int) -> LengthChoice:
    """The prompt length for `feature` (RULE), at most `cap`; FALLBACK_LENGTH (or the cap) without contexts."""
    lengths = [n for n in LENGTHS if n <= cap] or [cap]
    if not contexts:
        chosen = min(FALLBACK_LENGTH, cap)
        return LengthChoice(rule=f"no dataset maxima: the default of {chosen} tokens", lengths=[], best=[], kept=[],
                            chosen=chosen)
    best = [length_matched_max(lm, transcoder, feature, contexts, n) for n in lengths]
    peak = max(best)
    kept = [b / peak if peak > 0 else 1.0 for b in best]
    chosen = next(n for n, k in zip(lengths, kept) if k >= KEEP)
    return LengthChoice(rule=RULE, lengths=lengths, best=best, kept=kept, chosen=chosen)
