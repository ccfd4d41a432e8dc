"""What a dream returns: its prompts re-measured (`DreamedPrompt`) and the result of a run (`DreamResult`), with
the rules that pick from them (Pareto frontier, best fluent, best novel, the diverse set) and the one rule of a
continued run (`continuation`)."""

from __future__ import annotations

import math

from pydantic import BaseModel

from dreaming.engine.config import DreamConfig, same_search

# The version of the search: a change that makes the same config give other results bumps it, so services keyed
# on it (dream_cache.dream_key, the service's job key) do not serve results an earlier engine computed as current.
ENGINE_VERSION = 7  # 7: the length rule's shortest length is 12 tokens (6 tried 8); 6: Gemma's scaled embedding
# rows in the search (5 searched Gemma models on unscaled rows)
FLUENT_CE = 5.0  # a prompt is "fluent" at cross-entropy <= 5 nats inside its template (reference.md)
NOVEL_BELOW = 4  # a prompt is novel when it shares no run of this many tokens with the top dataset contexts
DIVERSE = 8  # prompts in a result's diverse set
MAX_JACCARD = 0.5  # two prompts differ when the Jaccard similarity of their token sets is at most this


def is_novel(longest_shared_run: int | None) -> bool:
    """Shares no run of NOVEL_BELOW tokens with the feature's top dataset contexts (False when not measured)."""
    return longest_shared_run is not None and longest_shared_run < NOVEL_BELOW


class DreamedPrompt(BaseModel):
    prompt: str  # the optimised part
    text: str  # the whole text as measured (template included)
    token_ids: list[int]  # the text's ids as measured, BOS first
    counted_from: int  # first position of token_ids that counts: the prompt's first token (the prefix is before)
    activation: float  # re-measured in fp32 from `text`: max over the prompt and the template text after it
    fraction_of_max: float | None  # activation / the dataset max (the max over whole 128-token windows)
    prompt_tokens: int | None = None  # the prompt's own token count (None in results of engines before 5)
    # the second yardstick: the best of the feature's top dataset examples cut to the prompt's token count (ending
    # at its max token, measured alone after BOS: engine/length.py), and activation / that; None without maxima. A
    # dream under 100% of the max but over 100% here lost to the length, not to the data.
    length_matched_max: float | None = None
    fraction_of_length_matched: float | None = None
    template_activation: float  # max over the template's prefix alone, which no prompt can change
    cross_entropy: float  # of the optimised tokens inside the template, fp32
    origin: str  # where its search began: "sampled #j", "beam #j", "random" or "dataset #i" (the feature's i-th
    # top example)
    longest_shared_run: int | None  # novelty: longest run of tokens shared with the feature's top dataset contexts
    # (None when no maxima were given); a prompt is novel when this is < NOVEL_BELOW


class LengthChoice(BaseModel):
    """How an automatic prompt length was chosen (engine/length.py): the lengths tried, the best of the feature's
    top dataset examples cut to each (its activation, and that ÷ the best over the lengths), the length taken."""

    rule: str
    lengths: list[int]
    best: list[float]  # per length: the activation of the best top example cut to it
    kept: list[float]  # per length: best ÷ the largest best
    chosen: int


class DreamResult(BaseModel):
    feature: str
    model: str
    config: DreamConfig  # as asked for (prompt_length None: chosen per feature, see prompt_length below)
    engine_version: int | None = None  # the search that produced it (None: an engine before 5, which kept none)
    prompt_length: int | None = None  # the starting prompts' length the search ran at: the config's, or the one
    # chosen for the feature (None in results of engines before 5: config.prompt_length)
    length_choice: LengthChoice | None = None  # how prompt_length was chosen, when the config left it to the engine
    template: str | None = None  # the template the prompts were dreamed in (None: made before it was recorded)
    template_origin: str | None = None  # "given" (config.template), "chat" (the model's) or "bare" (a base model)
    search_dtype: str | None = None  # the search model's dtype ("bfloat16", "float32"; None before engine 5)
    seed: int  # the first seed
    seeds: list[int]
    seconds: float  # wall time of the run that produced it (a batch's total for dream_many)
    dataset_max: float | None  # the yardstick every fraction_of_max was computed against
    scale_note: str | None  # how the target was scaled when no dataset max was known
    # what the fractions of max compare with, when it is not a prompt inside the requested template: e.g. a feature
    # whose dataset max is at a text's first token, dreamed with the prompt first (set by the explorer)
    yardstick: str | None = None
    frontier: list[DreamedPrompt]  # Pareto frontier (activation up, cross-entropy down), sorted by cross-entropy
    best_fluent: DreamedPrompt | None  # highest activation with cross_entropy <= FLUENT_CE
    # the most active fluent prompt that is novel (shares no run of NOVEL_BELOW tokens with the feature's top
    # dataset contexts); None when there is none or no contexts were given
    best_novel: DreamedPrompt | None = None
    diverse: list[DreamedPrompt]  # up to DIVERSE fluent prompts, pairwise token Jaccard <= 0.5, most active first
    iterations: int  # iterations run in all (a continued dream counts those before it)
    stopped: str  # why the search stopped: "iterations", "seconds", "plateau", or the reason its progress
    # callback gave (the service: "cancelled", "deadline")
    timings: dict[str, float]
    history: dict[str, list[float | None]]  # per iteration, search dtype: best target, best with CE <= 5 (or None)
    state: dict | None = None  # the search's population and random state, for `dream --more` (TaskState)


def longest_run(results: list[DreamResult], config: DreamConfig, below: int | None = None) -> DreamResult | None:
    """Of `results` (one feature's, scored against the current max), the search of `config` that ran the most
    iterations (fewer than `below`, when given), by this engine: the one a longer run continues; None when there is
    none."""
    runs = [r for r in results if r.state is not None and r.engine_version == ENGINE_VERSION
            and same_search(r.config, config) and (below is None or r.config.iterations < below)]
    return max(runs, key=lambda r: r.iterations, default=None)


def continuation(base: DreamResult, more: int) -> DreamConfig:
    """The config of `base`'s run continued for `more` iterations: the same search, `iterations` its whole length.
    `dream --more` and the service's `more` ask for this; the engine continues `base` for the difference."""
    if more < 1:
        raise ValueError(f"continue for at least 1 iteration, got {more}")
    return base.config.model_copy(update={"iterations": base.config.iterations + more})


def pareto_front(prompts: list[DreamedPrompt]) -> list[DreamedPrompt]:
    """The prompts no other prompt beats on both activation (higher) and cross-entropy (lower), by CE."""
    front, best = [], -math.inf
    for p in sorted(prompts, key=lambda p: (p.cross_entropy, -p.activation)):
        if p.activation > best:
            front.append(p)
            best = p.activation
    return front


def best_fluent(prompts: list[DreamedPrompt]) -> DreamedPrompt | None:
    fluent = [p for p in prompts if p.cross_entropy <= FLUENT_CE]
    return max(fluent, key=lambda p: p.activation) if fluent else None


def best_novel(prompts: list[DreamedPrompt]) -> DreamedPrompt | None:
    """The most active fluent prompt that shares no run of NOVEL_BELOW tokens with the top dataset contexts."""
    return best_fluent([p for p in prompts if is_novel(p.longest_shared_run)])


def jaccard(a: list[int], b: list[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a or b else 1.0


def differing(rows: list[list[int]], limit: int) -> list[int]:
    """Indices of up to `limit` rows, taken in order, each with token Jaccard <= MAX_JACCARD to every one taken."""
    taken = []
    for i, row in enumerate(rows):
        if all(jaccard(row, rows[j]) <= MAX_JACCARD for j in taken):
            taken.append(i)
            if len(taken) == limit:
                break
    return taken


def diverse_set(prompts: list[DreamedPrompt], suffix_length: int) -> list[DreamedPrompt]:
    """Up to DIVERSE fluent prompts, most active first, pairwise different (token Jaccard <= MAX_JACCARD of their
    prompt tokens: token_ids past counted_from, less the template's `suffix_length` last ones) and spread over
    basins (the starts their searches grew from, `origin`): at most DIVERSE // 2
    from one start while prompts of other starts qualify, so the set is not paraphrases of one sentence when the
    search found more."""
    fluent = sorted((p for p in prompts if p.cross_entropy <= FLUENT_CE), key=lambda p: -p.activation)
    tokens = [p.token_ids[p.counted_from : len(p.token_ids) - suffix_length] for p in fluent]
    taken: list[int] = []
    for per_basin in (DIVERSE // 2, DIVERSE):
        for i, prompt in enumerate(fluent):
            if (len(taken) < DIVERSE and i not in taken
                    and sum(fluent[j].origin == prompt.origin for j in taken) < per_basin
                    and all(jaccard(tokens[i], tokens[j]) <= MAX_JACCARD for j in taken)):
                taken.append(i)
    return [fluent[i] for i in sorted(taken)]


def basins(prompts: list[DreamedPrompt]) -> int:
    """How many different starts (origins) the prompts grew from."""
    return len({p.origin for p in prompts})


def longest_shared_run(prompt: list[int], contexts: list[list[int]]) -> int:
    """The longest run of consecutive tokens of `prompt` that also occurs in one of `contexts`."""
    best = 0
    for context in contexts:
        previous = [0] * (len(context) + 1)  # longest common suffix ending at (prompt[i - 1], context[j - 1])
        for token in prompt:
            current = [0] * (len(context) + 1)
            for j, other in enumerate(context, 1):
                if token == other:
                    current[j] = previous[j - 1] + 1
            best = max(best, max(current))
            previous = current
    return best
