"""The dream entry point: EPO for K features at once (`dream_many`; `dream` for one), every task sharing each
forward and backward pass, and the result of each feature re-measured in fp32 from its text.

One call: the targets (each feature's encoder row, divided by its dataset max so λ means the same for every
feature), each feature's prompt length (the config's, or chosen by engine/length.py), the tasks (features × seeds;
fresh, or restored from the results a longer run continues), the search (search.py), and per feature the prompts
worth keeping re-measured with dreaming.activation (the one measurement function) beside both yardsticks: the
dataset max and the best dataset excerpt of the prompt's own length.
"""

from __future__ import annotations

import math
import time

import torch

from dreaming.activation import measure_token_ids
from dreaming.encoder import LazyEncoder
from dreaming.engine.config import DreamConfig, same_search
from dreaming.engine.length import Contexts, choose_length, length_matched_max
from dreaming.engine.results import (ENGINE_VERSION, DreamedPrompt, DreamResult, best_fluent, best_novel,
                                     diverse_set, longest_shared_run, pareto_front)
from dreaming.engine.search import Progress, Search
from dreaming.engine.starts import seed_prompts
from dreaming.engine.state import Pool, TaskState, context_ngrams, origin_name, task_generator
from dreaming.features import Feature
from dreaming.models import LanguageModel, load_model
from dreaming.objective import Scorer, cross_entropy, make_target
from dreaming.templates import default_template
from dreaming.transcoders import Transcoder


def dream_many(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, features: list[Feature], config: DreamConfig,
               dataset_maxes: list[float | None], progress: Progress | None = None,
               measure_lm: LanguageModel | None = None, contexts: list[Contexts | None] | None = None,
               continue_from: list[DreamResult | None] | None = None) -> list[DreamResult]:
    """EPO for K features (× config.seeds) at once, every task sharing each forward/backward pass, searched with
    `lm` (any dtype) and re-measured with `measure_lm` (fp32; loaded when not given and `lm` is not fp32).
    `transcoder` may be a LazyEncoder: dreaming reads only the encoder rows of its features.

    `contexts` (per feature, from Maxima.top_contexts) seed init "dataset", choose an automatic prompt length
    (prompt_length None), give the length-matched yardstick and measure novelty. `continue_from` (per feature, a
    result of the same search by this engine) continues those runs to `config.iterations` in all: the result equals
    one run of that length (`results.continuation` makes such a config)."""
    if len(features) != len(dataset_maxes):
        raise ValueError(f"{len(features)} features but {len(dataset_maxes)} dataset maxima")
    if not features:
        raise ValueError("no features given")
    contexts = contexts or [None] * len(features)
    continue_from = continue_from or [None] * len(features)
    started = time.perf_counter()
    measure_lm = _measure_lm(lm, measure_lm)
    scales = [_scale(transcoder, feature, m) for feature, m in zip(features, dataset_maxes)]
    targets = [make_target(transcoder, feature, scale) for feature, (scale, _) in zip(features, scales)]
    template, template_origin = (config.template, "given") if config.template is not None else default_template(lm)
    scorer = Scorer(lm, transcoder.config.feature_input_hook, template, targets, config.position)
    seeds = [config.seed + j for j in range(config.seeds)]
    task_targets = [i for i in range(len(features)) for _ in seeds]
    shared = [[ids[1:] for ids, _ in c] if c else None for c in contexts]  # top contexts, BOS left out
    ngrams = [context_ngrams(shared[i]) for i in task_targets]
    chosen_at = time.perf_counter()
    if any(continue_from):
        choices = [previous.length_choice for previous in continue_from]
        lengths = [previous.prompt_length for previous in continue_from]
        tasks, members, iterations = _restored(config, features, ngrams, continue_from)
    else:
        choices = [None if config.prompt_length is not None else
                   choose_length(measure_lm, transcoder, feature, context, config.max_prompt_length)
                   for feature, context in zip(features, contexts)]
        lengths = [config.prompt_length if choice is None else choice.chosen for choice in choices]
        tasks = [TaskState(task_generator(seeds[t % len(seeds)], features[i]), lengths[i], ngrams[t])
                 for t, i in enumerate(task_targets)]
        members, iterations = None, config.iterations
    length_seconds = time.perf_counter() - chosen_at  # what the length rule took
    before = tasks[0].iteration
    dataset_seeds = [seed_prompts(scorer, contexts[i] or [], lengths[i]) if config.init == "dataset" else []
                     for i in task_targets]
    reported = [scales[i][1] is None for i in task_targets]  # progress shows fractions of the dataset max only
    search = Search(scorer, config, task_targets, tasks, members)
    stopped = search.run(iterations, dataset_seeds, progress, reported)
    search_seconds = time.perf_counter() - started  # since the call began: the length rule and the starts too
    results = []
    M = config.population
    for i, (feature, dataset_max) in enumerate(zip(features, dataset_maxes)):
        measured = time.perf_counter()
        mine = [t for t, target in enumerate(task_targets) if target == i]
        origins = {}  # prompt ids -> origin code (the first seed's, when seeds share a prompt)
        for pool in (tasks[t].kept.pool for t in mine):
            for row, code in zip(pool.rows(), pool.origin.tolist()):
                origins.setdefault(row, code)
        yardstick = dataset_max if scales[i][1] is None else None
        prompts = remeasure(scorer, measure_lm, transcoder, feature, list(origins.items()), yardstick, shared[i],
                            contexts[i])
        done, steps = tasks[mine[0]].iteration, tasks[mine[0]].iteration - before
        results.append(DreamResult(
            feature=str(feature), model=lm.name, config=config, engine_version=ENGINE_VERSION,
            prompt_length=lengths[i], length_choice=choices[i], search_dtype=str(lm.dtype).removeprefix("torch."),
            template=template, template_origin=template_origin, seed=config.seed, seeds=seeds, seconds=0.0,
            dataset_max=yardstick, scale_note=scales[i][1],
            frontier=pareto_front(prompts), best_fluent=best_fluent(prompts), best_novel=best_novel(prompts),
            diverse=diverse_set(prompts, len(scorer.suffix_ids)), iterations=done, stopped=stopped,
            timings={"length_seconds": length_seconds, "start_seconds": search.start_seconds,
                     "search_seconds": search_seconds, "measure_seconds": time.perf_counter() - measured,
                     "seconds_per_iteration": search.iteration_seconds / max(1, steps),
                     "batch_tasks": len(task_targets)},
            history={"best": [_best(tasks[t].best[it] for t in mine) for it in range(done)],
                     "best_fluent": [_best(tasks[t].best_fluent[it] for t in mine) for it in range(done)]},
            state={"tasks": [tasks[t].to_json(search.members[t * M : (t + 1) * M]) for t in mine]}))
    seconds = time.perf_counter() - started
    return [result.model_copy(update={"seconds": seconds}) for result in results]


def dream(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature, config: DreamConfig,
          dataset_max: float | None, progress: Progress | None = None, measure_lm: LanguageModel | None = None,
          contexts: Contexts | None = None, continue_from: DreamResult | None = None) -> DreamResult:
    """EPO for one feature (config.seeds runs merged into one result)."""
    return dream_many(lm, transcoder, [feature], config, [dataset_max], progress, measure_lm, [contexts],
                      [continue_from])[0]


def _restored(config: DreamConfig, features: list[Feature], ngrams: list[set | None],
              continue_from: list[DreamResult | None]) -> tuple[list[TaskState], Pool, int]:
    """Every task's state and the members as the results to continue left them, and the iterations still to run so
    that the run is `config.iterations` long in all."""
    if not all(continue_from):
        raise ValueError("continue either every feature of a call or none")
    done = {previous.config.iterations for previous in continue_from}
    if len(done) != 1:
        raise ValueError(f"the runs continued together must have the same length, got {sorted(done)}")
    iterations = config.iterations - done.pop()
    if iterations < 1:
        raise ValueError(f"a continued run must be longer than the run it continues: {config.iterations} iterations "
                         f"asked for, {config.iterations - iterations} run already")
    for feature, previous in zip(features, continue_from):
        if previous.feature != str(feature) or previous.state is None:
            raise ValueError(f"cannot continue {feature} from a result of {previous.feature} or without its state")
        if previous.engine_version != ENGINE_VERSION:
            raise ValueError(f"{feature}: the run to continue was made by engine version {previous.engine_version}, "
                             f"this is {ENGINE_VERSION}: dream it again")
        if not same_search(previous.config, config):
            raise ValueError(f"{feature}: a dream continues under its own config (only iterations, seconds and "
                             "plateau may change)")
    states = [state for previous in continue_from for state in previous.state["tasks"]]
    W = max(config.length_range(state["prompt_length"])[1] for state in states)
    restored = [TaskState.from_json(state, W, ngrams[t]) for t, state in enumerate(states)]
    members = restored[0][1]
    for _, pool in restored[1:]:
        members = members.cat(pool)
    return [task for task, _ in restored], members, iterations


def remeasure(scorer: Scorer, measure_lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature,
              prompts: list[tuple[tuple[int, ...], int]], dataset_max: float | None,
              shared: list[list[int]] | None, contexts: Contexts | None) -> list[DreamedPrompt]:
    """Prompts (ids, origin code) re-measured from their text in fp32 (dreaming.activation): activation over the
    prompt and suffix, the template's own, cross-entropy, the longest run shared with the top contexts (`shared`,
    BOS left out), and (with a dataset max) the length-matched yardstick of each prompt's own token count."""
    sequences = [scorer.full_ids(list(ids)) for ids, _ in prompts]
    texts = [scorer.text(list(ids)) for ids, _ in prompts]
    start = len(scorer.prefix_ids)
    measured = measure_token_ids(measure_lm, transcoder, feature, sequences, dataset_max,
                                 texts=[text for _, text in texts], counted_from=[start] * len(sequences))
    ces = cross_entropy(measure_lm, sequences, start, [len(ids) for ids, _ in prompts])
    matched = {n: length_matched_max(measure_lm, transcoder, feature, contexts, n)
               for n in sorted({len(ids) for ids, _ in prompts})} if contexts and dataset_max else {}
    prompts_out = []
    for (ids, code), (prompt, _), m, ce in zip(prompts, texts, measured, ces):
        excerpt = matched.get(len(ids))
        prompts_out.append(DreamedPrompt(
            prompt=prompt, text=m.text, token_ids=m.token_ids, counted_from=m.counted_from, activation=m.activation,
            fraction_of_max=m.fraction_of_max, prompt_tokens=len(ids), length_matched_max=excerpt,
            fraction_of_length_matched=m.activation / excerpt if excerpt and excerpt > 0 else None,
            template_activation=m.template_activation, cross_entropy=ce, origin=origin_name(code),
            longest_shared_run=None if shared is None else longest_shared_run(list(ids), shared)))
    return prompts_out


def _scale(transcoder: Transcoder | LazyEncoder, feature: Feature, dataset_max: float | None
           ) -> tuple[float, str | None]:
    """What the feature's pre-activation is divided by (its dataset max, else its threshold, else 1), and a note
    saying so when it is not the dataset max."""
    if dataset_max is not None and dataset_max > 0:
        return float(dataset_max), None
    _, _, thresholds = transcoder.rows(feature.layer, [feature.index])
    threshold = float(thresholds[0]) if thresholds is not None else 0.0
    if threshold > 0:
        return threshold, (f"no dataset max for {feature}: the target is the pre-activation divided by the feature's "
                           f"JumpReLU threshold ({threshold:.4g}), so 1.0 = just firing; λ is on that scale. "
                           "Build the maxima (dreaming maxima build) for figures as % of the dataset max.")
    return 1.0, (f"no dataset max for {feature}: the target is the raw pre-activation (scale 1.0); λ's meaning "
                 "depends on the feature's scale. Build the maxima (dreaming maxima build).")


def _measure_lm(lm: LanguageModel, measure_lm: LanguageModel | None) -> LanguageModel:
    if measure_lm is not None:
        return measure_lm
    if lm.dtype in (torch.float32, torch.float64):
        return lm
    return load_model(lm.model.config.name_or_path, dtype=torch.float32, device=lm.device)


def _best(values) -> float | None:
    """The max of values, NaN (nothing yet) left out; None when there is none (JSON has no NaN)."""
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else None
