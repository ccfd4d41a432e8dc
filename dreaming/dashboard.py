"""The feature page: a feature's dataset maxima (statistics, top and interval examples, each also cut to a dream's
length) beside its dreamed prompts (current ones, and stale ones scored against another dataset max), every token
shaded by its activation. `Explorer.compare`, the CLI's `compare` and the service's feature page all build it here.
"""

from __future__ import annotations

from dreaming.activation import measure_token_ids
from dreaming.dream_cache import same_yardstick
from dreaming.engine import ENGINE_VERSION, is_novel
from dreaming.engine.length import cut_examples
from dreaming.features import Feature
from dreaming.maxima import Maxima
from dreaming.models import LanguageModel
from dreaming.transcoders import Transcoder

PAGE_BEFORE, PAGE_AFTER = 32, 8  # tokens a feature page shows around an example's max token


def render_examples(lm: LanguageModel, transcoder: Transcoder, maxima: Maxima, feature: Feature,
                    top: int | None = None, context: int = 12, length: int | None = None,
                    examples: list[tuple[float, int, int]] | None = None, after: int | None = None) -> list[dict]:
    """The feature's top dataset examples (or the given (activation, window, position) `examples`), re-measured
    from their windows (in `lm`'s dtype, fp32 encoder): source tag, activation, % of max, per-token values, and
    the context around the example's token marked.

    With `length`, each example also has `length_matched` (engine.length.cut_examples, with its cross-entropy):
    the data at a dream's context length, to tell whether a dream beats the data at equal context and fluency.
    With `after`, only that many tokens after the example's are measured (causal: the values up to them do not
    change), which is all a page shows and much less work than whole windows."""
    dataset_max = maxima.dataset_max(feature)
    examples = maxima.top_examples(feature)[:top] if examples is None else examples
    if not examples:
        return []
    windows = maxima.windows
    contexts = maxima.contexts(examples)
    if after is not None:
        contexts = [(ids[: position + after + 1], position) for ids, position in contexts]
    measured = measure_token_ids(lm, transcoder, feature, [ids for ids, _ in contexts], dataset_max)
    matched = (cut_examples(lm, transcoder, feature, contexts, length, dataset_max, with_cross_entropy=True)
               if length is not None else None)
    rendered = []
    for i, ((stored, window, position), result) in enumerate(zip(examples, measured)):
        lo, hi = max(1, position - context), min(len(result.pieces), position + 4)
        pieces = result.pieces[lo:hi]
        pieces[position - lo] = f"[[{pieces[position - lo]}]]"
        rendered.append({
            "source": windows.sources[int(windows.source[window])],
            "window": window,
            "document": int(windows.document[window]),
            "position": position,
            "stored_activation": stored,
            "activation": result.token_activations[position],
            "fraction_of_max": result.token_activations[position] / dataset_max,
            "context": "".join(pieces),
            "token_ids": result.token_ids,
            "pieces": result.pieces,
            "token_activations": result.token_activations,
            **({"length_matched": matched[i]} if matched is not None else {}),
        })
    return rendered


def _dreamed(point: dict, result: dict, fraction_of_max: float | None) -> dict:
    return {"prompt": point["prompt"], "text": point["text"], "activation": point["activation"],
            "fraction_of_max": fraction_of_max, "prompt_tokens": point.get("prompt_tokens"),
            "length_matched_max": point.get("length_matched_max"),
            "fraction_of_length_matched": point.get("fraction_of_length_matched"),
            "cross_entropy": point["cross_entropy"],
            "origin": point.get("origin"), "longest_shared_run": point.get("longest_shared_run"),
            "novel": is_novel(point.get("longest_shared_run")), "seed": result.get("seed"),
            "engine_version": result.get("engine_version"),
            "yardstick": result.get("yardstick"), "token_ids": point["token_ids"],
            "counted_from": point["counted_from"]}


def one_per_prompt(dreamed: list[dict]) -> list[dict]:
    """Each token sequence once (`_dreamed` dicts), strongest first: a prompt found again by a newer engine, or by
    two seeds or configs, is listed once, as the newest engine found it (the first of equals)."""
    kept = {}
    for dream in dreamed:
        key = tuple(dream["token_ids"])
        if key not in kept or (dream["engine_version"] or 0) > (kept[key]["engine_version"] or 0):
            kept[key] = dream
    return sorted(kept.values(), key=lambda d: d["activation"], reverse=True)


def _best(results: list[dict], name: str, dataset_max: float) -> dict | None:
    """The most active of the results' `name` prompts ("best_fluent" or "best_novel"), as `_dreamed` gives it."""
    found = [(result[name], result) for result in results if result.get(name)]
    if not found:
        return None
    point, result = max(found, key=lambda found: found[0]["activation"])
    return _dreamed(point, result, point["activation"] / dataset_max if dataset_max > 0 else None)


def token_span(tokens: list[str], activations: list[float], start: int, stop: int) -> dict:
    """Tokens [start, stop) of a measured text with their activations, as a page shades them."""
    return {"tokens": tokens[start:stop], "activations": activations[start:stop]}


def shade_dreams(lm: LanguageModel, transcoder: Transcoder, feature: Feature, dreams: list[dict]) -> None:
    """Give each dreamed prompt (a `_dreamed` dict) the tokens from its prompt on, with their activations:
    its token ids re-measured as recorded (one forward for all), so the shading reproduces its figures."""
    unique = list({tuple(d["token_ids"]): d for d in dreams}.values())
    if not unique:
        return
    measured = measure_token_ids(lm, transcoder, feature, [d["token_ids"] for d in unique],
                                 counted_from=[d["counted_from"] for d in unique])
    spans = {tuple(dream["token_ids"]): token_span(m.pieces, m.token_activations, m.counted_from, len(m.pieces))
             for dream, m in zip(unique, measured)}
    for dream in dreams:
        dream.update(spans[tuple(dream["token_ids"])])
        del dream["token_ids"]


def page_examples(rendered: list[dict]) -> list[dict]:
    """Rendered examples as a page shows them: the tokens around the example's token, not the whole window."""
    for example in rendered:
        del example["token_ids"]
        pieces, start = example.pop("pieces"), max(1, example["position"] - PAGE_BEFORE)
        stop = min(len(pieces), example["position"] + PAGE_AFTER + 1)
        example.update(token_span(pieces, example.pop("token_activations"), start, stop),
                       max_index=example["position"] - start)
    return rendered


def feature_page(lm: LanguageModel, transcoder: Transcoder, maxima: Maxima, feature: Feature,
                 dreams: list[dict], top: int = 10, length: int | None = None) -> dict:
    """The comparison: the feature's statistics and top dataset examples beside its dreamed prompts.

    `dreams` are dream results as JSON dicts (see dreaming.engine.DreamResult). Those scored against the feature's
    dataset max now are current: their frontier prompts are listed in `dreams` (activation, % of the dataset
    max, cross-entropy, origin, longest run shared with the top dataset contexts, the yardstick of a positional
    feature's dream), strongest first, the union of their `diverse` sets in `diverse` (each list has one entry per
    token sequence, see `one_per_prompt`), and the most active of their best fluent and best novel prompts in
    `best_fluent`, `best_novel`.
    Results scored against another dataset max (an earlier maxima build) are never shown as current: their
    prompts are in `stale_dreams`, with the max they were scored against (`scored_against`) and their own
    recorded fraction of it. With `length`, each example has `length_matched` (see `render_examples`).
    `intervals`: a few examples from each activation range (`Maxima.interval_examples`), rendered like the top
    ones.
    """
    summary = maxima.summary(feature)
    dataset_max = summary["dataset_max"]
    current = [result for result in dreams if same_yardstick(result.get("dataset_max"), dataset_max)]
    stale = [result for result in dreams if not same_yardstick(result.get("dataset_max"), dataset_max)]

    def current_points(field: str) -> list[dict]:
        return one_per_prompt([_dreamed(point, result, point["activation"] / dataset_max if dataset_max > 0 else None)
                               for result in current for point in result.get(field) or []])

    dreamed, diverse = current_points("frontier"), current_points("diverse")
    stale_dreamed = one_per_prompt([{**_dreamed(point, result, point.get("fraction_of_max")),
                                     "scored_against": result.get("dataset_max")}
                                    for result in stale for point in result.get("frontier", [])])
    best = {name: _best(current, name, dataset_max) for name in ("best_fluent", "best_novel")}
    shade_dreams(lm, transcoder, feature, dreamed + diverse + stale_dreamed
                 + [dream for dream in best.values() if dream is not None])
    examples = page_examples(render_examples(lm, transcoder, maxima, feature, top=top, length=length,
                                             after=PAGE_AFTER))
    intervals = maxima.interval_examples(feature)  # rendered in one batch, then put back in their ranges
    rendered = iter(page_examples(render_examples(lm, transcoder, maxima, feature, after=PAGE_AFTER,
                                                  examples=[e for r in intervals for e in r["examples"]])))
    intervals = [{**r, "examples": [next(rendered) for _ in r["examples"]]} for r in intervals]
    return {**summary, "examples": examples, "intervals": intervals, "length": length,
            "engine_version": ENGINE_VERSION, "dreams": dreamed,
            "diverse": diverse, **best,
            "stale_dreams": stale_dreamed}
