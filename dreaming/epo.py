"""EPO, evolutionary prompt optimisation ("fluent dreaming", Thompson et al. 2024), for transcoder features.

One search ("task") is one (feature, seed). Its population has M slots with fluency weights λ_1..λ_M. Each
iteration:
  1. every T_restart iterations (and at iteration 0) all slots restart from the member that is best under a λ
     drawn uniformly from [restart_lambda_min, restart_lambda_max] (the drawn λ is the one used);
  2. the token gradient of every member's own L_λ = f − λ·CE (objective.py), in one backward pass;
  3. r children per member, each changing one token: position uniform, token uniform among the top-k of the
     gradient there (or among all allowed tokens for random search); children whose text does not re-tokenise
     to their ids are dropped;
  4. elitist selection with replacement: slot m keeps the argmax of L_{λ_m} over parents and children.
With the target "max over positions", f in steps 1, 2 and 4 is a smooth max (objective.py), since the exact max
is flat in every position but one: GCG with the exact max stalled at its start on a real feature.
f is the feature's pre-activation divided by its dataset max, so λ means the same for every feature. Many
tasks (features × seeds) run in lockstep and share every forward and backward pass (`dream_many`); each has
its own random generator, so its result does not depend on what it is batched with.

Every scored prompt may land on the Pareto frontier (activation vs. cross-entropy). The frontier found in the
search dtype, plus the most active near-fluent prompts, is re-measured in fp32 from the text with
dreaming.activation (the one measurement function) and the frontier recomputed on those figures.

GCG is the special case population = 1, λ = 0 (`gcg_config`); random single-token search replaces the
gradient's top-k by uniform tokens (`random_search_config`).

Defaults that differ from the paper (`paper_config`), and why (experiments/epo_quality.py measures them):
  - starting prompts sampled from the model after the template's prefix instead of random tokens: the search
    starts fluent (CE ≈ 3–4 inside the chat template) and only has to climb in activation, instead of spending
    its few CPU iterations getting CE down from ≈ 10 (on one feature, 30 iterations: 92% vs. 42% of the dataset
    max at CE <= 5);
  - λ grid 0.02–1 and restart λ in [0.05, 0.3] instead of 0.1–10 and [0.667, 6]: the target is in fractions of
    the dataset max (≈ 0–1.5), not the few units the paper's λ was tuned for;
  - target = max over the prompt (and the template text after it), which is what the measurement reports;
  - r = 16 children per member, k = 128, 60 iterations: what fits in ~3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dreaming.activation import measure_token_ids
from dreaming.features import Feature
from dreaming.models import LanguageModel, load_model
from dreaming.objective import Scorer, allowed_tokens, chat_template, cross_entropy, make_target, split_template
from dreaming.transcoders import Transcoder

FLUENT_CE = 5.0  # a prompt is "fluent" at cross-entropy <= 5 nats inside its template (reference.md)
KEEP_NEAR_FLUENT = 8  # besides the frontier, the most active prompts with CE <= FLUENT_CE + margin are re-measured
FLUENT_MARGIN = 0.3  # bf16 vs fp32 cross-entropy differences are well below this
PAPER = dict(lambda_min=0.1, lambda_max=10.0, restart_lambda_min=0.667, restart_lambda_max=6.0, init="random")

Progress = Callable[[int, int, "float | None"], None]


class DreamConfig(BaseModel):
    """EPO options, shared by the CLI (`--prompt-length` ...) and the HTTP request body."""

    model_config = ConfigDict(extra="forbid")

    prompt_length: int = Field(12, ge=1, le=64, description="optimised tokens per prompt")
    template: str | None = Field(None, description="text around the prompt with exactly one {prompt} slot, e.g. "
                                 "'\\n\\nHuman:{prompt}'; None = the model's chat template for one user turn")
    position: Literal["last", "max"] = Field("max", description="target: the feature at the last prompt token, or "
                                             "its max over the prompt and the template text after it")
    iterations: int = Field(60, ge=1, le=2000, description="EPO iterations")
    population: int = Field(8, ge=1, le=64, description="population slots M, one fluency weight λ each")
    children: int = Field(16, ge=1, le=512, description="children per member per iteration (r)")
    topk: int = Field(128, ge=1, le=1_000_000, description="candidate tokens per position from the gradient")
    restart_every: int = Field(30, ge=0, le=2000, description="restart period T_restart (0: only at the start)")
    lambda_min: float = Field(0.02, ge=0, le=1000, description="smallest fluency weight λ of the log-spaced grid")
    lambda_max: float = Field(1.0, ge=0, le=1000, description="largest fluency weight λ of the grid")
    restart_lambda_min: float = Field(0.05, ge=0, le=1000, description="restarts rank members under λ drawn "
                                      "uniformly from [restart_lambda_min, restart_lambda_max]")
    restart_lambda_max: float = Field(0.3, ge=0, le=1000, description="see restart_lambda_min")
    init: Literal["sample", "random"] = Field("sample", description="starting prompts: sampled from the model "
                                              "after the template's prefix, or uniform random tokens (the paper)")
    proposal: Literal["gradient", "random"] = Field("gradient", description="children's tokens: top-k of the "
                                                    "token gradient (EPO, GCG) or uniform (random search)")
    seeds: int = Field(1, ge=1, le=64, description="independent runs (seed, seed + 1, ...) merged into one frontier")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random seed of the first run")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="dtype of the search model")

    @field_validator("template")
    @classmethod
    def _template(cls, template):
        if template is not None:
            split_template(template)
        return template

    @model_validator(mode="after")
    def _ranges(self):
        if self.lambda_min > self.lambda_max:
            raise ValueError(f"lambda_min ({self.lambda_min}) must be <= lambda_max ({self.lambda_max})")
        if self.restart_lambda_min > self.restart_lambda_max:
            raise ValueError(f"restart_lambda_min ({self.restart_lambda_min}) must be <= restart_lambda_max "
                             f"({self.restart_lambda_max})")
        return self

    def lambdas(self) -> torch.Tensor:
        """[M] fluency weights: log-spaced from lambda_min to lambda_max (linear when lambda_min is 0)."""
        M = self.population
        if M == 1:
            return torch.tensor([self.lambda_min], dtype=torch.float64)
        if self.lambda_min == 0:
            return torch.linspace(0, self.lambda_max, M, dtype=torch.float64)
        return torch.exp(torch.linspace(math.log(self.lambda_min), math.log(self.lambda_max), M, dtype=torch.float64))


def paper_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """The paper's settings (λ grid 0.1–10, restarts under λ in [0.667, 6], k = 512, r = 32, random starting
    tokens, target at the last token, no template)."""
    base = (config or DreamConfig()).model_dump()
    return DreamConfig(**{**base, **PAPER, "topk": 512, "children": 32, "position": "last",
                          "template": "{prompt}", **changes})


def gcg_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """GCG inside EPO: one member, λ = 0 (no fluency term), no restarts."""
    base = (config or DreamConfig()).model_dump()
    return DreamConfig(**{**base, "population": 1, "lambda_min": 0.0, "lambda_max": 0.0, "restart_lambda_min": 0.0,
                          "restart_lambda_max": 0.0, "restart_every": 0, **changes})


def random_search_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """Random single-token search: GCG with uniform tokens instead of the gradient's top-k."""
    return gcg_config(config, proposal="random", **changes)


class DreamedPrompt(BaseModel):
    prompt: str  # the optimised part
    text: str  # the whole text as measured (template included)
    token_ids: list[int]  # the text's ids as measured, BOS first
    activation: float  # re-measured in fp32 from `text`
    fraction_of_max: float | None
    cross_entropy: float  # of the optimised tokens inside the template, fp32


class DreamResult(BaseModel):
    feature: str
    model: str
    config: DreamConfig
    seed: int  # the first seed
    seeds: list[int]
    seconds: float  # wall time of the run that produced it (a batch's total for dream_many)
    dataset_max: float | None
    scale_note: str | None  # how the target was scaled when no dataset max was known
    frontier: list[DreamedPrompt]  # Pareto frontier (activation up, cross-entropy down), sorted by cross-entropy
    best_fluent: DreamedPrompt | None  # highest activation with cross_entropy <= FLUENT_CE
    timings: dict[str, float]
    history: dict[str, list[float | None]]  # per iteration, search dtype: best target, best with CE <= 5 (or None)


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


def merge_results(results: list[DreamResult]) -> DreamResult:
    """Results of several seeds (same feature and model) as one: the frontier of all their prompts."""
    if not results or len({(r.feature, r.model) for r in results}) != 1:
        raise ValueError("merge_results needs results of one feature and model")
    prompts = {tuple(p.token_ids): p for r in results for p in r.frontier}.values()
    frontier = pareto_front(list(prompts))
    seeds = sorted({s for r in results for s in r.seeds})
    first = results[0]
    config = first.config.model_copy(update={"seeds": len(seeds), "seed": seeds[0]})
    return first.model_copy(update=dict(
        config=config, seed=seeds[0], seeds=seeds, seconds=sum(r.seconds for r in results), frontier=frontier,
        best_fluent=best_fluent(frontier), history={},
        timings={key: sum(r.timings.get(key, 0.0) for r in results) for key in first.timings}))


# ------------------------------------------------------------------------------------------------ search


@dataclass
class Candidates:
    """A task's prompts worth re-measuring: the running frontier plus the most active near-fluent ones."""

    ids: torch.Tensor  # [c, n]
    f: torch.Tensor  # [c]
    ce: torch.Tensor  # [c]

    def add(self, ids, f, ce) -> None:
        ids, f, ce = torch.cat([self.ids, ids]), torch.cat([self.f, f]), torch.cat([self.ce, ce])
        ids, first = _unique_rows(ids)
        ids, f, ce = ids, f[first], ce[first]
        order = torch.argsort(ce, stable=True)
        running = torch.cummax(f[order], 0).values
        on_front = torch.ones_like(f, dtype=torch.bool)  # a point is on the front if it beats every lower-CE one
        on_front[order[1:]] = f[order[1:]] > running[:-1]
        near = torch.where(ce <= FLUENT_CE + FLUENT_MARGIN, f, torch.full_like(f, -math.inf))
        top = torch.topk(near, min(KEEP_NEAR_FLUENT, len(f))).indices
        keep = on_front.clone()
        keep[top[near[top] > -math.inf]] = True
        self.ids, self.f, self.ce = ids[keep], f[keep], ce[keep]


def _unique_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows, index of each one's first occurrence), in first-occurrence order."""
    seen = {}
    for i, row in enumerate(map(tuple, ids.tolist())):
        seen.setdefault(row, i)
    first = torch.tensor(list(seen.values()), dtype=torch.long)
    return ids[first], first


_ALLOWED: dict[int, tuple[object, torch.Tensor]] = {}


def _allowed(lm: LanguageModel) -> torch.Tensor:
    key = id(lm.tokenizer)
    if key not in _ALLOWED:
        _ALLOWED[key] = (lm.tokenizer, allowed_tokens(lm))
    return _ALLOWED[key][1]


def initial_prompts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, generator) -> torch.Tensor:
    """[M, n] starting prompts (sampled from the model, or uniform) whose text round-trips."""
    allowed_ids = allowed.nonzero()[:, 0]
    rows, M = [], config.population
    for _ in range(100):
        if config.init == "sample":
            ids = scorer.sample(M, allowed, generator).cpu()
        else:
            ids = allowed_ids[torch.randint(len(allowed_ids), (M, scorer.prompt_length), generator=generator)]
        rows.extend(ids[scorer.round_trips(ids)])
        if len(rows) >= M:
            return torch.stack(rows[:M])
    raise ValueError("could not draw starting prompts whose text re-tokenises to the same ids in this template; with "
                     "a BPE tokenizer the text before {prompt} must not end with a space (the optimised tokens carry "
                     "their own): write '\\n\\nHuman:{prompt}', not '\\n\\nHuman: {prompt}'")


def select(f: torch.Tensor, ce: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """[len(lambdas)] index of the best of the pool (f, ce [P]) under each λ: argmax of f − λ·CE."""
    return torch.argmax(f[None] - lambdas[:, None].to(f.dtype) * ce[None], dim=1)


def restart(f: torch.Tensor, ce: torch.Tensor, lam: float) -> torch.Tensor:
    """The index of the member that every slot restarts from: the best under the drawn λ (f, ce [M])."""
    return select(f, ce, torch.tensor([lam], dtype=torch.float64))[0]


def search(scorer: Scorer, config: DreamConfig, task_targets: list[int], task_seeds: list[int],
           progress: Progress | None = None, reported: list[bool] | None = None) -> tuple[list[Candidates], list[dict]]:
    """Run EPO for every task (target index, seed) in lockstep; return each task's candidates and history.

    `progress` gets the best fluent target so far over the tasks marked in `reported` (default: all)."""
    lm, device = scorer.lm, scorer.lm.device
    M, n, r, T = config.population, config.prompt_length, config.children, len(task_targets)
    allowed = _allowed(lm).to(device)
    allowed_ids = allowed.nonzero()[:, 0]
    k = min(config.topk, len(allowed_ids))
    lambdas = config.lambdas().to(device)  # [M]
    row_lambdas = lambdas.repeat(T)  # [T * M]
    rows = torch.tensor(task_targets, device=device).repeat_interleave(M)  # [T * M] target of each member
    generators = [torch.Generator().manual_seed(seed) for seed in task_seeds]
    ids = torch.cat([initial_prompts(scorer, config, allowed.cpu(), g) for g in generators]).to(device)  # [T*M, n]
    f, ce, fs = scorer.score(ids, rows)  # exact f (reported), CE, smooth f (selected on)
    candidates = [Candidates(ids[t * M : (t + 1) * M], f[t * M : (t + 1) * M], ce[t * M : (t + 1) * M])
                  for t in range(T)]
    for c in candidates:
        c.add(c.ids[:0], c.f[:0], c.ce[:0])
    histories = [{"best": [], "best_fluent": []} for _ in range(T)]
    total = config.iterations * T
    for it in range(config.iterations):
        if it == 0 or (config.restart_every and it % config.restart_every == 0):
            for t, g in enumerate(generators):
                lo, hi = config.restart_lambda_min, config.restart_lambda_max
                lam = lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()
                s = slice(t * M, (t + 1) * M)
                best = t * M + restart(fs[s], ce[s], lam)
                ids[s], f[s], ce[s], fs[s] = ids[best], f[best], ce[best], fs[best]
        if config.proposal == "gradient":
            top = []
            for start in range(0, T * M, scorer.batch_size):
                part = slice(start, start + scorer.batch_size)
                grad = scorer.gradient(ids[part], rows[part], row_lambdas[part])[2]  # [b, n, vocab]
                grad[..., ~allowed] = -math.inf
                top.append(grad.topk(k, dim=-1).indices)  # [b, n, k]
            top = torch.cat(top)  # [T * M, n, k]
        children = []
        for t, g in enumerate(generators):
            for m in range(M):
                member = t * M + m
                position = torch.randint(n, (r,), generator=g)
                if config.proposal == "gradient":
                    token = top[member][position, torch.randint(k, (r,), generator=g)]
                else:
                    token = allowed_ids.cpu()[torch.randint(len(allowed_ids), (r,), generator=g)]
                child = ids[member].expand(r, n).clone()  # [r, n]
                child[torch.arange(r), position.to(device)] = token.to(device)
                children.append(child)
        children = torch.cat(children)  # [T * M * r, n]
        child_rows = rows.repeat_interleave(r)
        ok = scorer.round_trips(children).to(device)
        children, child_rows = children[ok], child_rows[ok]
        child_f, child_ce, child_fs = scorer.score(children, child_rows)
        child_task = torch.arange(T, device=device).repeat_interleave(M * r)[ok]
        for t in range(T):
            s, mine = slice(t * M, (t + 1) * M), child_task == t
            pool = [torch.cat([x[s], y[mine]]) for x, y in ((ids, children), (f, child_f), (ce, child_ce), (fs, child_fs))]
            chosen = select(pool[3], pool[2], lambdas)  # [M] with replacement
            ids[s], f[s], ce[s], fs[s] = (x[chosen] for x in pool)
            candidates[t].add(children[mine], child_f[mine], child_ce[mine])
            fluent = candidates[t].f[candidates[t].ce <= FLUENT_CE]
            histories[t]["best"].append(float(candidates[t].f.max()))
            histories[t]["best_fluent"].append(float(fluent.max()) if len(fluent) else float("nan"))
        if progress is not None:
            fluent = [h["best_fluent"][-1] for t, h in enumerate(histories)
                      if (reported is None or reported[t]) and not math.isnan(h["best_fluent"][-1])]
            progress((it + 1) * T, total, max(fluent) if fluent else None)
    return candidates, histories


# ------------------------------------------------------------------------------------------------ dream


def _scale(transcoder: Transcoder, feature: Feature, dataset_max: float | None) -> tuple[float, str | None]:
    if dataset_max is not None and dataset_max > 0:
        return float(dataset_max), None
    threshold = transcoder.threshold[feature.layer, feature.index].item() if transcoder.threshold is not None else 0
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


def dream_many(lm: LanguageModel, transcoder: Transcoder, features: list[Feature], config: DreamConfig,
               dataset_maxes: list[float | None], progress: Progress | None = None,
               measure_lm: LanguageModel | None = None) -> list[DreamResult]:
    """EPO for K features (× config.seeds) at once, every task sharing each forward/backward pass."""
    if len(features) != len(dataset_maxes):
        raise ValueError(f"{len(features)} features but {len(dataset_maxes)} dataset maxima")
    if not features:
        raise ValueError("no features given")
    started = time.perf_counter()
    measure_lm = _measure_lm(lm, measure_lm)
    scales = [_scale(transcoder, feature, m) for feature, m in zip(features, dataset_maxes)]
    targets = [make_target(transcoder, feature, scale) for feature, (scale, _) in zip(features, scales)]
    template = config.template if config.template is not None else chat_template(lm)
    scorer = Scorer(lm, transcoder.config.feature_input_hook, template, config.prompt_length, targets,
                    config.position)
    seeds = [config.seed + j for j in range(config.seeds)]
    task_targets = [i for i in range(len(features)) for _ in seeds]
    reported = [scales[i][1] is None for i in task_targets]  # progress shows fractions of the dataset max only
    candidates, histories = search(scorer, config, task_targets, seeds * len(features), progress, reported)
    search_seconds = time.perf_counter() - started
    results = []
    for i, (feature, dataset_max) in enumerate(zip(features, dataset_maxes)):
        measured = time.perf_counter()
        tasks = [t for t, target in enumerate(task_targets) if target == i]
        ids, _ = _unique_rows(torch.cat([candidates[t].ids for t in tasks]).cpu())
        prompts = remeasure(scorer, measure_lm, transcoder, feature, ids.tolist(),
                            dataset_max if scales[i][1] is None else None)
        frontier = pareto_front(prompts)
        results.append(DreamResult(
            feature=str(feature), model=lm.name, config=config, seed=config.seed, seeds=seeds, seconds=0.0,
            dataset_max=dataset_max if scales[i][1] is None else None, scale_note=scales[i][1], frontier=frontier,
            best_fluent=best_fluent(prompts),
            timings={"search_seconds": search_seconds, "measure_seconds": time.perf_counter() - measured,
                     "seconds_per_iteration": search_seconds / config.iterations, "batch_tasks": len(task_targets)},
            history={key: [_best(histories[t][key][it] for t in tasks) for it in range(config.iterations)]
                     for key in ("best", "best_fluent")}))
    seconds = time.perf_counter() - started
    return [result.model_copy(update={"seconds": seconds}) for result in results]


def _best(values) -> float | None:
    """The max of values, NaN (nothing yet) left out; None when there is none (JSON has no NaN)."""
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else None


def dream(lm: LanguageModel, transcoder: Transcoder, feature: Feature, config: DreamConfig,
          dataset_max: float | None, progress: Progress | None = None,
          measure_lm: LanguageModel | None = None) -> DreamResult:
    """EPO for one feature (config.seeds runs merged into one frontier)."""
    return dream_many(lm, transcoder, [feature], config, [dataset_max], progress, measure_lm)[0]


def remeasure(scorer: Scorer, measure_lm: LanguageModel, transcoder: Transcoder, feature: Feature,
              prompts: list[list[int]], dataset_max: float | None) -> list[DreamedPrompt]:
    """Prompts' activation (dreaming.activation, fp32, from the text) and cross-entropy (fp32)."""
    sequences = [scorer.full_ids(ids) for ids in prompts]
    texts = [scorer.text(ids) for ids in prompts]
    measured = measure_token_ids(measure_lm, transcoder, feature, sequences, dataset_max,
                                 texts=[text for _, text in texts])
    ces = []
    for start in range(0, len(sequences), 32):
        ces += cross_entropy(measure_lm, sequences[start : start + 32], len(scorer.prefix_ids), scorer.prompt_length)
    return [DreamedPrompt(prompt=prompt, text=m.text, token_ids=m.token_ids, activation=m.activation,
                          fraction_of_max=m.fraction_of_max, cross_entropy=ce)
            for (prompt, _), m, ce in zip(texts, measured, ces)]
