"""EPO, evolutionary prompt optimisation ("fluent dreaming", Thompson et al. 2024), for transcoder features.

One search ("task") is one (feature, seed). Its population has M slots with fluency weights λ_1..λ_M. Each
iteration:
  1. every `restart_every` iterations (not at iteration 0: the starting prompts would collapse into one) every
     slot restarts from the member that is best under a λ drawn uniformly from [restart_lambda_min,
     restart_lambda_max];
  2. expand the members that changed: the token gradient of each one's own L_λ = f − λ·CE (objective.py), the
     model's own top tokens at every position, and the KV cache its children start from (an unchanged member
     keeps what it had);
  3. r children per member, each one move: swap one token or (insert_delete, off by default) insert one or
     delete one, the length within prompt_length ± length_slack; a new token is drawn from the gradient's top-k
     there or, with probability model_proposals (off by default), from the model's own top tokens there (or
     uniformly for random search); children whose text does not re-tokenise to their ids are dropped;
  4. score the children from their parents' KV cache (objective.Scorer.score_children);
  5. select: slot m takes the argmax of L_{λ_m} over members and children, distinct prompts per slot (`distinct`),
     so the population is a buffer of the best different prompts, not M copies of one.
Selection and restarts use the exact max over positions (what is reported); only the gradient uses the smooth
max. f is the feature's pre-activation divided by its dataset max, so λ means the same for every feature. Many
tasks (features × seeds) run in lockstep and share every forward and backward pass (`dream_many`); each has its
own random generator, so its result does not depend on what it is batched with.

Starting prompts (`init`): sampled from the model after the template's prefix, uniform random tokens, or a mix;
"dataset" (the default) also seeds a quarter of the slots with the tokens leading to the feature's top dataset
examples. Every prompt keeps its origin. The defaults are what won experiments/results/epo_ablation.md. The search keeps, per task, its Pareto frontier (activation vs. cross-entropy), its most active
near-fluent prompts and a diverse set of them; these are re-measured in fp32 from the text with
dreaming.activation (the one measurement function), and the result holds the frontier, the best fluent prompt and
up to DIVERSE fluent prompts that differ pairwise (token Jaccard <= MAX_JACCARD), each with its origin and its
longest run of tokens shared with the feature's top dataset contexts (novelty).

A search stops after `iterations`, when `seconds` are spent, or when the best fluent target has not improved for
`plateau` iterations; its state is kept in the result, so `dream --more` continues it exactly.

GCG is the special case population = 1, λ = 0 (`gcg_config`); random single-token search replaces the
gradient's top-k by uniform tokens (`random_search_config`); `paper_config` and `previous_config` are the paper's
settings and this engine's defaults before the changes above (experiments/epo_quality.py compares them).
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dreaming.activation import measure_token_ids
from dreaming.features import Feature
from dreaming.models import LanguageModel, load_model
from dreaming.objective import (
    Expansion,
    Scorer,
    allowed_tokens,
    cross_entropy,
    make_target,
)
from dreaming.templates import chat_template, split_template
from dreaming.transcoders import Transcoder
from dreaming.transcoder_files import LazyEncoder

FLUENT_CE = 5.0  # a prompt is "fluent" at cross-entropy <= 5 nats inside its template (reference.md)
FLUENT_MARGIN = 0.3  # bf16 vs fp32 cross-entropy differences are well below this
KEEP_ACTIVE = 8  # the most active near-fluent prompts of a task kept for re-measurement (besides its frontier)
KEEP_DIVERSE = 16  # and the most active near-fluent prompts that differ pairwise
DIVERSE = 8  # prompts in a result's diverse set
MAX_JACCARD = 0.5  # two prompts differ when the Jaccard similarity of their token sets is at most this
# The version of the search: a change that makes the same config give other results bumps it, so services keyed
# on it (service/store.py's job key) do not serve results an earlier engine computed as if they were current.
ENGINE_VERSION = 3
NOVEL_BELOW = 4  # a prompt is novel when it shares no run of this many tokens with the top dataset contexts
PLATEAU_GAIN = 0.005  # an improvement of the best fluent target smaller than this (of max) is no improvement
MODEL_TOPK = 32  # tokens proposed from the model are drawn uniformly among its top MODEL_TOPK at the position
PAPER = dict(lambda_min=0.1, lambda_max=10.0, restart_lambda_min=0.667, restart_lambda_max=6.0, init="random")
# the engine's defaults before restarts stopped collapsing the start, selection used the exact max and the
# moves, model proposals, distinct slots and mixed starts came in: the ablation's baseline
PREVIOUS = dict(restart_at_start=True, selection="smooth", length_slack=0, insert_delete=0.0, model_proposals=0.0,
                distinct="none", init="sample")

# progress(done, total, best fluent fraction of max so far) after every iteration; a string it returns stops the
# search after that iteration and becomes the result's `stopped` (e.g. "cancelled", "deadline": the caller's reason)
Progress = Callable[[int, int, "float | None"], "str | None"]


class DreamConfig(BaseModel):
    """EPO options, shared by the CLI (`--prompt-length` ...) and the HTTP request body."""

    model_config = ConfigDict(extra="forbid")

    prompt_length: int = Field(12, ge=1, le=64, description="tokens of the starting prompts")
    length_slack: int = Field(4, ge=0, le=32, description="insertions and deletions keep a prompt's length within "
                              "prompt_length ± length_slack (at least 1, at most 64); 0: fixed length")
    template: str | None = Field(None, description="text around the prompt with exactly one {prompt} slot, e.g. "
                                 "'\\n\\nHuman:{prompt}'; None = the model's chat template for one user turn")
    position: Literal["last", "max"] = Field("max", description="target: the feature at the last prompt token, or "
                                             "its max over the prompt and the template text after it")
    iterations: int = Field(100, ge=1, le=5000, description="EPO iterations (at most; see seconds and plateau)")
    seconds: float | None = Field(None, gt=0, le=86400, description="wall-clock budget of the search: it stops "
                                  "after the iteration that spends it (None: no budget)")
    plateau: int = Field(0, ge=0, le=5000, description="stop when no task's best fluent target has improved for "
                         "this many iterations (0: never)")
    population: int = Field(8, ge=1, le=64, description="population slots M, one fluency weight λ each")
    children: int = Field(16, ge=1, le=512, description="children per member per iteration (r)")
    topk: int = Field(128, ge=1, le=1_000_000, description="candidate tokens per position from the gradient")
    insert_delete: float = Field(0.0, ge=0, le=1, description="share of children made by inserting or deleting "
                                 "a token (half each) instead of swapping one")
    model_proposals: float = Field(0.0, ge=0, le=1, description="share of new tokens drawn from the model's own "
                                   f"top {MODEL_TOPK} at the position instead of the gradient's top-k")
    distinct: Literal["none", "exact", "jaccard"] = Field(
        "exact", description="slots select in turn, each the best prompt that differs from those the earlier "
        "slots took: 'exact' (not the same ids) or 'jaccard' (token Jaccard <= 0.5: a buffer of the best different "
        "prompts); 'none': selection with replacement (the paper)")
    selection: Literal["exact", "smooth"] = Field("exact", description="select on the exact max over positions "
                                                  "(reported), or on the smooth max the gradient uses")
    restart_every: int = Field(30, ge=0, le=5000, description="restart period T_restart (0: never)")
    restart_at_start: bool = Field(False, description="also restart at iteration 0, before any child is scored "
                                   "(the earlier engine's collapse of the starting prompts into one)")
    lambda_min: float = Field(0.02, ge=0, le=1000, description="smallest fluency weight λ of the log-spaced grid")
    lambda_max: float = Field(1.0, ge=0, le=1000, description="largest fluency weight λ of the grid")
    restart_lambda_min: float = Field(0.05, ge=0, le=1000, description="restarts rank members under λ drawn "
                                      "uniformly from [restart_lambda_min, restart_lambda_max]")
    restart_lambda_max: float = Field(0.3, ge=0, le=1000, description="see restart_lambda_min")
    init: Literal["sample", "random", "mixed", "dataset"] = Field(
        "dataset", description="starting prompts: sampled from the model after the template's prefix, uniform random "
        "tokens (the paper), a mix (3 sampled : 1 random), or the mix with a quarter of the slots seeded by the "
        "tokens leading to the feature's top dataset examples")
    proposal: Literal["gradient", "random"] = Field("gradient", description="children's tokens: top-k of the "
                                                    "token gradient (EPO, GCG) or uniform (random search)")
    seeds: int = Field(1, ge=1, le=64, description="independent runs (seed, seed + 1, ...) merged into one result")
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

    @property
    def length_range(self) -> tuple[int, int]:
        return max(1, self.prompt_length - self.length_slack), min(64, self.prompt_length + self.length_slack)

    def cost(self) -> int:
        """The search work this config asks for, in prompt tokens scored: iterations × population × children ×
        seeds × the longest prompt it allows. The service caps it per job and per batch."""
        return self.iterations * self.population * self.children * self.seeds * self.length_range[1]

    def lambdas(self) -> torch.Tensor:
        """[M] fluency weights: log-spaced from lambda_min to lambda_max (linear when lambda_min is 0)."""
        M = self.population
        if M == 1:
            return torch.tensor([self.lambda_min], dtype=torch.float64)
        if self.lambda_min == 0:
            return torch.linspace(0, self.lambda_max, M, dtype=torch.float64)
        return torch.exp(torch.linspace(math.log(self.lambda_min), math.log(self.lambda_max), M, dtype=torch.float64))


def _preset(config: DreamConfig | None, preset: dict, changes: dict) -> DreamConfig:
    return DreamConfig(**{**(config or DreamConfig()).model_dump(), **preset, **changes})


def paper_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """The paper's settings (λ grid 0.1–10, restarts under λ in [0.667, 6], k = 512, r = 32, random starting
    tokens, target at the last token, no template) in the earlier engine's search (PREVIOUS)."""
    return _preset(config, {**PREVIOUS, **PAPER, "topk": 512, "children": 32, "position": "last",
                            "template": "{prompt}"}, changes)


def previous_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """This engine's defaults before this version: the baseline every change is measured against."""
    return _preset(config, {**PREVIOUS, "iterations": 60}, changes)


def gcg_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """GCG inside EPO: one member, λ = 0 (no fluency term), no restarts, single-token swaps from the gradient."""
    return _preset(config, dict(population=1, lambda_min=0.0, lambda_max=0.0, restart_lambda_min=0.0,
                                restart_lambda_max=0.0, restart_every=0, restart_at_start=False, length_slack=0,
                                insert_delete=0.0, model_proposals=0.0), changes)


def random_search_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """Random single-token search: GCG with uniform tokens instead of the gradient's top-k."""
    return gcg_config(config, proposal="random", **changes)


# ------------------------------------------------------------------------------------------------ results


def is_novel(longest_shared_run: int | None) -> bool:
    """Shares no run of NOVEL_BELOW tokens with the feature's top dataset contexts (False when not measured)."""
    return longest_shared_run is not None and longest_shared_run < NOVEL_BELOW



class DreamedPrompt(BaseModel):
    prompt: str  # the optimised part
    text: str  # the whole text as measured (template included)
    token_ids: list[int]  # the text's ids as measured, BOS first
    counted_from: int  # first position of token_ids that counts: the prompt's first token (the prefix is before)
    activation: float  # re-measured in fp32 from `text`: max over the prompt and the template text after it
    fraction_of_max: float | None
    template_activation: float  # max over the template's prefix alone, which no prompt can change
    cross_entropy: float  # of the optimised tokens inside the template, fp32
    origin: str  # where its search began: "sampled", "random" or "dataset #i" (the feature's i-th top example)
    longest_shared_run: int | None  # novelty: longest run of tokens shared with the feature's top dataset contexts
    # (None when no maxima were given); a prompt is novel when this is < NOVEL_BELOW


class DreamResult(BaseModel):
    feature: str
    model: str
    config: DreamConfig
    seed: int  # the first seed
    seeds: list[int]
    seconds: float  # wall time of the run that produced it (a batch's total for dream_many)
    dataset_max: float | None  # the yardstick every fraction_of_max was computed against
    scale_note: str | None  # how the target was scaled when no dataset max was known
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


BUDGET = {"iterations", "seconds", "plateau"}  # the fields a continued dream may change


def same_search(previous: DreamConfig, config: DreamConfig) -> bool:
    """Do the two configs describe the same search, but for how long it runs?"""
    return previous.model_dump(exclude=BUDGET) == config.model_dump(exclude=BUDGET)


def longest_run(results: list[DreamResult], config: DreamConfig, below: int | None = None) -> DreamResult | None:
    """Of `results` (one feature's, scored against the current max), the search of `config` that ran the most
    iterations (fewer than `below`, when given): the one `dream --more` continues; None when there is none."""
    runs = [r for r in results if r.state is not None and same_search(r.config, config)
            and (below is None or r.config.iterations < below)]
    return max(runs, key=lambda r: r.iterations, default=None)


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
    prompt tokens: token_ids past counted_from, less the template's `suffix_length` last ones)."""
    fluent = sorted((p for p in prompts if p.cross_entropy <= FLUENT_CE), key=lambda p: -p.activation)
    tokens = [p.token_ids[p.counted_from : len(p.token_ids) - suffix_length] for p in fluent]
    return [fluent[i] for i in differing(tokens, DIVERSE)]


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


# ------------------------------------------------------------------------------------------------ search state

SAMPLED, RANDOM = -1, -2  # origin codes; i >= 0 is "seeded from dataset example #i"


def origin_name(code: int) -> str:
    return {SAMPLED: "sampled", RANDOM: "random"}.get(code, f"dataset #{code}")


@dataclass
class Pool:
    """Prompts of one or more tasks, as rows: ids [N, W] right-padded, lengths [N], exact f, CE, smooth f [N]
    (search dtype) and origin codes [N]."""

    ids: torch.Tensor
    lengths: torch.Tensor
    f: torch.Tensor
    ce: torch.Tensor
    smooth: torch.Tensor
    origin: torch.Tensor

    def __getitem__(self, index) -> "Pool":
        return Pool(self.ids[index], self.lengths[index], self.f[index], self.ce[index], self.smooth[index],
                    self.origin[index])

    def __len__(self) -> int:
        return len(self.ids)

    def cat(self, other: "Pool") -> "Pool":
        return Pool(*(torch.cat([getattr(self, n), getattr(other, n)]) for n in Pool.__dataclass_fields__))

    def put(self, index, other: "Pool") -> None:
        for name in Pool.__dataclass_fields__:
            getattr(self, name)[index] = getattr(other, name)

    def rows(self) -> list[tuple[int, ...]]:
        return [tuple(row[:n]) for row, n in zip(self.ids.tolist(), self.lengths.tolist())]

    def to_json(self) -> dict:
        return {"ids": [list(row) for row in self.rows()], "f": self.f.tolist(), "ce": self.ce.tolist(), "smooth": self.smooth.tolist(),
                "origin": self.origin.tolist()}

    @staticmethod
    def from_json(state: dict, width: int, dtype, device) -> "Pool":
        ids = torch.zeros(len(state["ids"]), width, dtype=torch.long)
        for i, row in enumerate(state["ids"]):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        number = lambda key: torch.tensor(state[key], dtype=dtype, device=device)  # noqa: E731
        return Pool(ids.to(device), torch.tensor([len(r) for r in state["ids"]], device=device), number("f"),
                    number("ce"), number("smooth"), torch.tensor(state["origin"], device=device))


@dataclass
class Kept:
    """A task's prompts worth re-measuring: its running frontier, its KEEP_ACTIVE most active near-fluent prompts
    and up to KEEP_DIVERSE most active near-fluent ones that differ pairwise."""

    pool: Pool

    def add(self, new: Pool) -> None:
        pool = self.pool.cat(new)
        first = list({row: i for i, row in reversed(list(enumerate(pool.rows())))}.values())
        pool = pool[torch.tensor(sorted(first), dtype=torch.long, device=pool.ids.device)]
        order = torch.argsort(pool.ce, stable=True)
        running = torch.cummax(pool.f[order], 0).values
        keep = torch.zeros(len(pool), dtype=torch.bool, device=pool.ids.device)
        keep[order[0]] = True  # a point is on the front if it beats every lower-CE one
        keep[order[1:]] = pool.f[order[1:]] > running[:-1]
        near = (pool.ce <= FLUENT_CE + FLUENT_MARGIN).nonzero()[:, 0]
        near = near[torch.argsort(pool.f[near], descending=True, stable=True)]
        keep[near[:KEEP_ACTIVE]] = True
        rows = pool.rows()
        keep[near[differing([rows[i] for i in near.tolist()], KEEP_DIVERSE)]] = True
        self.pool = pool[keep]


@dataclass
class TaskState:
    """What one task carries from iteration to iteration, and what `dream --more` restores."""

    generator: torch.Generator
    iteration: int = 0  # iterations done
    kept: Kept | None = None
    best: list[float] = field(default_factory=list)  # per iteration: best target so far
    best_fluent: list[float] = field(default_factory=list)  # per iteration: best with CE <= FLUENT_CE (NaN: none)
    since_gain: int = 0  # iterations since the best fluent target last improved by PLATEAU_GAIN

    def to_json(self, members: Pool) -> dict:
        state = self.generator.get_state().numpy().tobytes()
        return {"iteration": self.iteration, "generator": base64.b64encode(state).decode(),
                "members": members.to_json(), "kept": self.kept.pool.to_json(), "best": self.best,
                "best_fluent": [None if math.isnan(v) else v for v in self.best_fluent], "since_gain": self.since_gain}

    @staticmethod
    def from_json(state: dict, width: int, dtype, device) -> tuple["TaskState", Pool]:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8))
        task = TaskState(generator, state["iteration"], Kept(Pool.from_json(state["kept"], width, dtype, device)),
                         list(state["best"]), [math.nan if v is None else v for v in state["best_fluent"]],
                         state["since_gain"])
        return task, Pool.from_json(state["members"], width, dtype, device)


# ------------------------------------------------------------------------------------------------ search


_ALLOWED: dict[int, tuple[object, torch.Tensor]] = {}


def _allowed(lm: LanguageModel) -> torch.Tensor:
    key = id(lm.tokenizer)
    if key not in _ALLOWED:
        _ALLOWED[key] = (lm.tokenizer, allowed_tokens(lm))
    return _ALLOWED[key][1]


def seed_prompts(scorer: Scorer, contexts: list[tuple[list[int], int]], length: int) -> list[tuple[list[int], int]]:
    """[(prompt ids, example #i)]: the `length` tokens leading to (and including) each top example's max token,
    shortened from the front until the text round-trips in the template; examples that never do are left out."""
    seeds = []
    for i, (ids, position) in enumerate(contexts):
        tokens = ids[max(1, position + 1 - length) : position + 1]
        while tokens:
            row = torch.tensor([tokens])
            if scorer.round_trips(row, torch.tensor([len(tokens)]))[0]:
                seeds.append((tokens, i))
                break
            tokens = tokens[1:]
    return seeds


def initial_prompts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, generator: torch.Generator,
                    seeds: list[tuple[list[int], int]]) -> tuple[list[list[int]], list[int]]:
    """M starting prompts whose text round-trips, and their origin codes: dataset seeds (init "dataset": a quarter
    of the slots, strongest example first), then sampled and random ones (init "mixed" and "dataset": 3 : 1)."""
    M, n = config.population, config.prompt_length
    allowed_ids = allowed.nonzero()[:, 0]
    prompts, origins = [], []
    if config.init == "dataset":
        for tokens, i in seeds[: max(1, M // 4)]:
            prompts.append(tokens)
            origins.append(i)
    rest = M - len(prompts)
    random_count = {"sample": 0, "random": rest}.get(config.init, rest // 4)
    for kind, count in ((SAMPLED, rest - random_count), (RANDOM, random_count)):
        drawn = []
        for _ in range(100):
            if len(drawn) >= count:
                break
            if kind == SAMPLED:
                ids = scorer.sample(count, n, allowed, generator).cpu()
            else:
                ids = allowed_ids[torch.randint(len(allowed_ids), (count, n), generator=generator)]
            drawn.extend(ids[scorer.round_trips(ids, torch.full((len(ids),), n))].tolist())
        if len(drawn) < count:
            raise ValueError("could not draw starting prompts whose text re-tokenises to the same ids in this "
                             "template; with a BPE tokenizer the text before {prompt} must not end with a space (the "
                             "optimised tokens carry their own): write '\\n\\nHuman:{prompt}', not "
                             "'\\n\\nHuman: {prompt}'")
        prompts += drawn[:count]
        origins += [kind] * count
    return prompts, origins


def select(pool: Pool, lambdas: torch.Tensor, config: DreamConfig) -> torch.Tensor:
    """[M] index into `pool` of each slot's new member: the argmax of f − λ_m·CE, or (config.distinct) the best
    prompt that differs from the ones earlier slots took; a slot finding none that differs enough ("jaccard")
    takes the best one not taken, and finding none at all, its argmax."""
    f = pool.f if config.selection == "exact" else pool.smooth
    objective = f[None] - lambdas[:, None].to(f.dtype) * pool.ce[None]  # [M, P]
    if config.distinct == "none":
        return objective.argmax(dim=1)
    rows = pool.rows()
    sets = [set(row) for row in rows]
    chosen: list[int] = []

    def differs(candidate: int) -> bool:
        return all(len(sets[candidate] & sets[j]) <= MAX_JACCARD * len(sets[candidate] | sets[j]) for j in chosen)

    for m in range(len(lambdas)):
        order = torch.argsort(objective[m], descending=True, stable=True).tolist()
        new = [i for i in order if all(rows[i] != rows[j] for j in chosen)]
        different = (next((i for i in new if differs(i)), None) if config.distinct == "jaccard" else None)
        chosen.append(different if different is not None else new[0] if new else order[0])
    return torch.tensor(chosen, device=pool.ids.device)


def restart_index(members: Pool, lam: float, config: DreamConfig) -> int:
    """The member every slot restarts from: the best under the drawn λ."""
    f = members.f if config.selection == "exact" else members.smooth
    return int(torch.argmax(f - lam * members.ce))


def make_children(members: Pool, expansion: Expansion, config: DreamConfig, tasks: list[TaskState],
                  allowed_ids: torch.Tensor) -> tuple[Pool, torch.Tensor, torch.Tensor]:
    """(children, index of each one's parent among the members, first prompt position where it differs from its
    parent): r per member, one move each, drawn from the member's task's generator."""
    M, r, W = config.population, config.children, members.ids.shape[1]
    lo, hi = config.length_range
    k = min(config.topk, len(allowed_ids))
    ids, lengths, parents, changed = [], [], [], []
    members_ids, members_lengths = members.ids.tolist(), members.lengths.tolist()
    gradient_top, model_top = expansion.gradient_top.cpu(), expansion.model_top.cpu()
    for member in range(len(members)):
        g = tasks[member // M].generator
        move, where, pick, source = (torch.rand(r, generator=g), torch.rand(r, generator=g),
                                     torch.randint(k, (r,), generator=g), torch.rand(r, generator=g))
        uniform = torch.randint(len(allowed_ids), (r,), generator=g)
        from_model = torch.randint(MODEL_TOPK, (r,), generator=g)
        row, n = members_ids[member][: members_lengths[member]], members_lengths[member]
        for c in range(r):
            insert = move[c] < config.insert_delete / 2 and n < hi
            delete = not insert and move[c] < config.insert_delete and n > lo
            p = min(int(where[c] * (n + 1 if insert else n)), n if insert else n - 1)
            if config.proposal == "random":
                token = int(allowed_ids[uniform[c]])
            elif source[c] < config.model_proposals or p == n:
                token = int(model_top[member, p, from_model[c] % model_top.shape[-1]])
            else:
                token = int(gradient_top[member, p, pick[c]])
            if insert:
                child = row[:p] + [token] + row[p:]
            elif delete:
                child = row[:p] + row[p + 1 :]
            else:
                child = row[:p] + [token] + row[p + 1 :]
            ids.append(child + [0] * (W - len(child)))
            lengths.append(len(child))
            parents.append(member)
            changed.append(p)
    device = members.ids.device
    parents = torch.tensor(parents, device=device)
    pool = Pool(torch.tensor(ids, device=device), torch.tensor(lengths, device=device), members.f[parents],
                members.ce[parents], members.smooth[parents], members.origin[parents])
    return pool, parents, torch.tensor(changed, device=device)


def search(scorer: Scorer, config: DreamConfig, task_targets: list[int], tasks: list[TaskState],
           members: Pool | None, dataset_seeds: list[list[tuple[list[int], int]]],
           progress: Progress | None = None, reported: list[bool] | None = None) -> tuple[Pool, str]:
    """Run EPO for every task (target index, TaskState) in lockstep, from `members` (a continued search) or from
    starting prompts; return the final members and why the search stopped. `progress` gets the best fluent
    target so far over the tasks marked in `reported` (default: all)."""
    started = time.perf_counter()
    lm, device = scorer.lm, scorer.lm.device
    M, T, W = config.population, len(task_targets), config.length_range[1]
    allowed = _allowed(lm).to(device)
    allowed_ids = allowed.nonzero()[:, 0].cpu()
    lambdas = config.lambdas().to(device)  # [M]
    rows = torch.tensor(task_targets, device=device).repeat_interleave(M)  # [T * M] target of each member
    if members is None:
        ids = torch.zeros(T * M, W, dtype=torch.long)
        lengths, origins = [], []
        for t, task in enumerate(tasks):
            prompts, codes = initial_prompts(scorer, config, allowed.cpu(), task.generator, dataset_seeds[t])
            for m, prompt in enumerate(prompts):
                ids[t * M + m, : len(prompt)] = torch.tensor(prompt)
            lengths += [len(p) for p in prompts]
            origins += codes
        ids, lengths = ids.to(device), torch.tensor(lengths, device=device)
        scores = scorer.score(ids, lengths, rows)
        members = Pool(ids, lengths, scores.f, scores.ce, scores.smooth, torch.tensor(origins, device=device))
        for t, task in enumerate(tasks):
            task.kept = Kept(members[t * M : (t + 1) * M][:0])
            task.kept.add(members[t * M : (t + 1) * M])
    fresh = torch.ones(T * M, dtype=torch.bool, device=device)
    expansion: Expansion | None = None
    total, stopped = config.iterations * T, "iterations"
    for step in range(config.iterations):
        # 1. restarts
        for t, task in enumerate(tasks):
            if (task.iteration == 0 and config.restart_at_start) or (
                    task.iteration > 0 and config.restart_every and task.iteration % config.restart_every == 0):
                lo, hi = config.restart_lambda_min, config.restart_lambda_max
                lam = lo + (hi - lo) * torch.rand((), generator=task.generator, dtype=torch.float64).item()
                mine = slice(t * M, (t + 1) * M)
                best = t * M + restart_index(members[mine], lam, config)
                members.put(mine, members[[best] * M])
                fresh[mine] = True
                fresh[best] = False
        # 2. expand the members that changed
        if expansion is None:
            fresh[:] = True
        if fresh.any():
            index = fresh.nonzero()[:, 0]
            new = scorer.expand(members.ids[index], members.lengths[index], rows[index], lambdas.repeat(T)[index],
                                allowed, min(config.topk, len(allowed_ids)) if config.proposal == "gradient" else 0,
                                min(MODEL_TOPK, len(allowed_ids)))
            expansion = new if expansion is None or len(index) == T * M else expansion.put(index, new)
            fresh[:] = False
        # 3. children, 4. scored from their parents' KV cache
        children, parent, changed = make_children(members, expansion, config, tasks, allowed_ids)
        ok = scorer.round_trips(children.ids, children.lengths).to(device)
        children, parent, changed = children[ok], parent[ok], changed[ok]
        scores = scorer.score_children(children.ids, children.lengths, rows[parent], parent, changed,
                                       expansion.parents)
        children.f, children.ce, children.smooth = scores.f, scores.ce, scores.smooth
        # 5. select, per task
        child_task = parent // M
        for t, task in enumerate(tasks):
            mine = slice(t * M, (t + 1) * M)
            pool = members[mine].cat(children[child_task == t])
            chosen = select(pool, lambdas, config)
            fresh[mine] = chosen != torch.arange(M, device=device)  # a slot that kept its member keeps its expansion
            members.put(mine, pool[chosen])
            task.kept.add(children[child_task == t])
            kept = task.kept.pool
            fluent = kept.f[kept.ce <= FLUENT_CE]
            task.best.append(float(kept.f.max()))
            task.best_fluent.append(float(fluent.max()) if len(fluent) else math.nan)
            before = [v for v in task.best_fluent[:-1] if not math.isnan(v)]
            gained = not math.isnan(task.best_fluent[-1]) and (not before or task.best_fluent[-1] >= max(before)
                                                                + PLATEAU_GAIN)
            task.since_gain = 0 if gained else task.since_gain + 1
            task.iteration += 1
        if progress is not None:
            fluent = [task.best_fluent[-1] for t, task in enumerate(tasks)
                      if (reported is None or reported[t]) and not math.isnan(task.best_fluent[-1])]
            stop = progress((step + 1) * T, total, max(fluent) if fluent else None)
            if stop:
                stopped = stop
                break
        if config.plateau and all(task.since_gain >= config.plateau for task in tasks):
            stopped = "plateau"
            break
        if config.seconds is not None and time.perf_counter() - started >= config.seconds:
            stopped = "seconds"
            break
    return members, stopped


# ------------------------------------------------------------------------------------------------ dream


def _scale(transcoder: Transcoder | LazyEncoder, feature: Feature, dataset_max: float | None) -> tuple[float, str | None]:
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


Contexts = list[tuple[list[int], int]]  # a feature's top dataset examples: (window ids, BOS first; max position)


def dream_many(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, features: list[Feature], config: DreamConfig,
               dataset_maxes: list[float | None], progress: Progress | None = None,
               measure_lm: LanguageModel | None = None, contexts: list[Contexts | None] | None = None,
               continue_from: list[DreamResult | None] | None = None) -> list[DreamResult]:
    """EPO for K features (× config.seeds) at once, every task sharing each forward/backward pass. `transcoder`
    may be a LazyEncoder: dreaming reads only the encoder rows of its features.

    `contexts` (per feature, from Maxima.top_contexts) seed init "dataset" and measure novelty. `continue_from`
    (per feature, a result of the same config but its iterations, seconds and plateau) continues those searches
    for `config.iterations` more iterations: the result equals one run of the summed length."""
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
    template = config.template if config.template is not None else chat_template(lm)
    scorer = Scorer(lm, transcoder.config.feature_input_hook, template, targets, config.position)
    seeds = [config.seed + j for j in range(config.seeds)]
    task_targets = [i for i in range(len(features)) for _ in seeds]
    tasks, members = _tasks(scorer, config, features, task_targets, seeds, continue_from)
    before = tasks[0].iteration
    dataset_seeds = [seed_prompts(scorer, contexts[i] or [], config.prompt_length) if config.init == "dataset"
                     else [] for i in task_targets]
    reported = [scales[i][1] is None for i in task_targets]  # progress shows fractions of the dataset max only
    members, stopped = search(scorer, config, task_targets, tasks, members, dataset_seeds, progress, reported)
    search_seconds = time.perf_counter() - started
    results = []
    M = config.population
    for i, (feature, dataset_max) in enumerate(zip(features, dataset_maxes)):
        measured = time.perf_counter()
        mine = [t for t, target in enumerate(task_targets) if target == i]
        origins = {}  # prompt ids -> origin code (the first seed's, when seeds share a prompt)
        for pool in (tasks[t].kept.pool for t in mine):
            for row, code in zip(pool.rows(), pool.origin.tolist()):
                origins.setdefault(row, code)
        shared = [ids[1:] for ids, _ in contexts[i]] if contexts[i] else None
        prompts = remeasure(scorer, measure_lm, transcoder, feature, list(origins.items()),
                            dataset_max if scales[i][1] is None else None, shared)
        done, steps = tasks[mine[0]].iteration, tasks[mine[0]].iteration - before
        previous = continue_from[i]
        # a continued dream is the run of the summed length, and is cached as that
        length = config.iterations + (previous.config.iterations if previous else 0)
        results.append(DreamResult(
            feature=str(feature), model=lm.name, config=config.model_copy(update={"iterations": length}),
            seed=config.seed, seeds=seeds, seconds=0.0, dataset_max=dataset_max if scales[i][1] is None else None,
            scale_note=scales[i][1], frontier=pareto_front(prompts), best_fluent=best_fluent(prompts),
            best_novel=best_novel(prompts),
            diverse=diverse_set(prompts, len(scorer.suffix_ids)), iterations=done, stopped=stopped,
            timings={"search_seconds": search_seconds, "measure_seconds": time.perf_counter() - measured,
                     "seconds_per_iteration": search_seconds / max(1, steps), "batch_tasks": len(task_targets)},
            history={"best": [_best(tasks[t].best[it] for t in mine) for it in range(done)],
                     "best_fluent": [_best(tasks[t].best_fluent[it] for t in mine) for it in range(done)]},
            state={"tasks": [tasks[t].to_json(members[t * M : (t + 1) * M]) for t in mine]}))
    seconds = time.perf_counter() - started
    return [result.model_copy(update={"seconds": seconds}) for result in results]


def _tasks(scorer: Scorer, config: DreamConfig, features: list[Feature], task_targets: list[int], seeds: list[int],
           continue_from: list[DreamResult | None]) -> tuple[list[TaskState], Pool | None]:
    """Every task's state: fresh (a generator seeded with its seed), or restored from the result it continues."""
    if not any(continue_from):
        return [TaskState(torch.Generator().manual_seed(seeds[t % len(seeds)])) for t in range(len(task_targets))], None
    if not all(continue_from):
        raise ValueError("continue either every feature of a call or none")
    device, W = scorer.lm.device, config.length_range[1]
    tasks, pools = [], []
    for i, (feature, previous) in enumerate(zip(features, continue_from)):
        if previous.feature != str(feature) or previous.state is None:
            raise ValueError(f"cannot continue {feature} from a result of {previous.feature} or without its state")
        if not same_search(previous.config, config):
            raise ValueError(f"{feature}: a dream continues under its own config (only iterations, seconds and "
                             "plateau may change)")
        for state in previous.state["tasks"]:
            task, pool = TaskState.from_json(state, W, scorer.dtype, device)
            tasks.append(task)
            pools.append(pool)
    members = pools[0]
    for pool in pools[1:]:
        members = members.cat(pool)
    return tasks, members


def _best(values) -> float | None:
    """The max of values, NaN (nothing yet) left out; None when there is none (JSON has no NaN)."""
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else None


def dream(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, feature: Feature, config: DreamConfig,
          dataset_max: float | None, progress: Progress | None = None, measure_lm: LanguageModel | None = None,
          contexts: Contexts | None = None, continue_from: DreamResult | None = None) -> DreamResult:
    """EPO for one feature (config.seeds runs merged into one result)."""
    return dream_many(lm, transcoder, [feature], config, [dataset_max], progress, measure_lm, [contexts],
                      [continue_from])[0]


def remeasure(scorer: Scorer, measure_lm: LanguageModel, transcoder: Transcoder, feature: Feature,
              prompts: list[tuple[tuple[int, ...], int]], dataset_max: float | None,
              contexts: list[list[int]] | None) -> list[DreamedPrompt]:
    """Prompts (ids, origin code) re-measured from their text in fp32 (dreaming.activation): activation over the
    prompt and suffix, the template's own, cross-entropy, and the longest run shared with `contexts`."""
    sequences = [scorer.full_ids(list(ids)) for ids, _ in prompts]
    texts = [scorer.text(list(ids)) for ids, _ in prompts]
    start = len(scorer.prefix_ids)
    measured = measure_token_ids(measure_lm, transcoder, feature, sequences, dataset_max,
                                 texts=[text for _, text in texts], counted_from=[start] * len(sequences))
    ces = cross_entropy(measure_lm, sequences, start, [len(ids) for ids, _ in prompts])
    return [DreamedPrompt(prompt=prompt, text=m.text, token_ids=m.token_ids, counted_from=m.counted_from,
                          activation=m.activation, fraction_of_max=m.fraction_of_max,
                          template_activation=m.template_activation, cross_entropy=ces[j],
                          origin=origin_name(code),
                          longest_shared_run=None if contexts is None else longest_shared_run(list(ids), contexts))
            for j, ((ids, code), (prompt, _), m) in enumerate(zip(prompts, texts, measured))]
