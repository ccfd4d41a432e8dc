"""EPO, evolutionary prompt optimisation ("fluent dreaming", Thompson et al. 2024), for transcoder features.

One search ("task") is one (feature, seed), with its own random generator seeded by both, so its result does not
depend on what it is batched with and two features never start alike. Its population has M slots with fluency
weights λ_1..λ_M. Many tasks (features × seeds) run in lockstep and share every forward and backward pass
(`dream_many`). `Search.run` is the loop, one method per step:
  start    M starting prompts per task (`init`): the most active, pairwise different of `scan` prompts sampled
           from the model inside the template and scored for the feature in one pass ("scan", which reads
           nothing from the dataset); "dataset" (the default) also seeds a quarter of the slots with the tokens
           leading to the feature's top dataset examples. Every prompt keeps its origin, the start it grew from.
  restart  every `restart_every` iterations (not at iteration 0, which would collapse the starts into one), the
           slots of each lineage restart from its best member under a λ drawn from [restart_lambda_min,
           restart_lambda_max];
  expand   the members that changed: the token gradient of each one's own L_λ = f − λ·CE (objective.py), the
           model's own top tokens at every position, and the KV cache its children start from;
  propose  r children per member, one move each: swap a token or (insert_delete, off by default) insert or delete
           one, within prompt_length ± length_slack; a new token comes from the gradient's top-k there or, with
           probability model_proposals, from the model's own top tokens (uniform for random search); children
           whose text does not re-tokenise to their ids are dropped;
  score    the children, each from its parent's KV cache (objective.Scorer.score_children);
  select   slot m takes the argmax of L_{λ_m} over members and children, the slots choosing in turn among
           prompts that differ from those taken (`distinct`) and whose lineage holds less than `lineage_share` of
           the slots (the dataset's starts count as one lineage), so other starts keep searching and the result
           holds prompts that owe nothing to the data; then record what is worth re-measuring and the best so far;
  stop     after `iterations`, when `seconds` are spent, when no task's best fluent target has improved for
           `plateau` iterations, or when the caller's progress callback says so.
Selection and restarts use the exact max over positions (what is reported); only the gradient uses the smooth
max. f is the feature's pre-activation divided by its dataset max, so λ means the same for every feature. The
search state lives on the host (a Pool per population, small); only ids go to the device, and the scores and the
expansion's proposals come back once each per iteration.

Each task keeps its Pareto frontier (activation vs. cross-entropy), its most active near-fluent prompts, as many
novel ones (no run of NOVEL_BELOW tokens shared with the feature's top dataset contexts), the best of every start
and a diverse set. These are re-measured in fp32 from the text with dreaming.activation (the one measurement
function); the result holds the frontier, the best fluent prompt, the best novel fluent prompt and up to DIVERSE
fluent prompts that differ pairwise (token Jaccard <= MAX_JACCARD) spread over basins (different starts), each with
its origin and its longest run of tokens shared with the top contexts. Its state is kept in the result, so
`dream --more` continues it exactly.

GCG is the special case population = 1, λ = 0 (`gcg_config`); random single-token search replaces the
gradient's top-k by uniform tokens (`random_search_config`); `paper_config` and `previous_config` are the paper's
settings and this engine's defaults before the changes of v3 (experiments/epo_quality.py compares them). What
each default won is in experiments/results/ (epo_ablation.md, epo_quality.md).
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
ENGINE_VERSION = 4
NOVEL_BELOW = 4  # a prompt is novel when it shares no run of this many tokens with the top dataset contexts
PLATEAU_GAIN = 0.005  # an improvement of the best fluent target smaller than this (of max) is no improvement
MODEL_TOPK = 32  # tokens proposed from the model are drawn uniformly among its top MODEL_TOPK at the position
PAPER = dict(lambda_min=0.1, lambda_max=10.0, restart_lambda_min=0.667, restart_lambda_max=6.0, init="random")
# the engine's defaults before restarts stopped collapsing the start, selection used the exact max and the
# moves, model proposals, distinct slots and mixed starts came in: the ablation's baseline
PREVIOUS = dict(restart_at_start=True, selection="smooth", length_slack=0, insert_delete=0.0, model_proposals=0.0,
                distinct="none", init="sample", lineage_share=1.0)

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
    init: Literal["scan", "dataset", "sample", "random", "mixed"] = Field(
        "dataset", description="starting prompts. 'scan': the most active, pairwise different of `scan` prompts "
        "sampled from the model after the template's prefix and scored for the feature; reads nothing from the "
        "dataset maxima. 'dataset': the scan, with a quarter of the slots seeded by the tokens leading to the "
        "feature's top dataset examples. 'sample': prompts sampled from the model, unscored; 'random': uniform "
        "random tokens (the paper); 'mixed': 3 sampled : 1 random")
    scan: int = Field(256, ge=1, le=4096, description="prompts sampled from the model per task for the sampled "
                      "starts (init scan and dataset score the feature on all of them, in one pass)")
    lineage_share: float = Field(0.5, gt=0, le=1, description="the most slots one lineage (the prompts grown "
                                 "from one start; the dataset's starts count as one) may hold, as a share of the "
                                 "population, so other starts keep searching; 1: no cap (the earlier engine)")
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
        """The search work this config asks for, in prompt tokens scored: (iterations × population × children +
        the scan's prompts) × seeds × the longest prompt it allows. The service caps it per job and per batch."""
        return (self.iterations * self.population * self.children + self.scan) * self.seeds * self.length_range[1]

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
    prompt tokens: token_ids past counted_from, less the template's `suffix_length` last ones), and spread over
    basins (the starts their searches grew from, `origin`): at most DIVERSE // 2 from one start while prompts of
    other starts qualify, so the set is not paraphrases of one sentence when the search found more."""
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


# ------------------------------------------------------------------------------------------------ search state

# Origin codes: i >= 0 is "dataset #i" (seeded from the feature's i-th top example); SAMPLED - j is "sampled #j"
# (the j-th start drawn from the model: for init "scan", the j-th most active of the scan); RANDOM: uniform tokens
RANDOM, SAMPLED = -1, -2
DATASET_LINEAGE = 0  # the dataset's starts count as one lineage when capping the slots a lineage holds


def origin_name(code: int) -> str:
    if code >= 0:
        return f"dataset #{code}"
    return "random" if code == RANDOM else f"sampled #{SAMPLED - code}"


def lineage(code: int) -> int:
    """The lineage a prompt of origin `code` belongs to for the slot cap: its start, or the dataset's starts."""
    return DATASET_LINEAGE if code >= 0 else code


def context_ngrams(contexts: list[list[int]] | None) -> set[tuple[int, ...]] | None:
    """Every run of NOVEL_BELOW tokens of the contexts (None: no contexts, novelty unknown)."""
    if contexts is None:
        return None
    return {tuple(c[i : i + NOVEL_BELOW]) for c in contexts for i in range(len(c) - NOVEL_BELOW + 1)}


def novel_row(row: list[int] | tuple[int, ...], ngrams: set | None) -> bool:
    """Does the row share no run of NOVEL_BELOW tokens with the contexts of `ngrams`? (False when unknown.)"""
    return ngrams is not None and not any(tuple(row[i : i + NOVEL_BELOW]) in ngrams
                                          for i in range(len(row) - NOVEL_BELOW + 1))


@dataclass
class Pool:
    """Prompts of one or more tasks, as rows on the host: ids [N, W] right-padded, lengths [N], exact f, CE and
    smooth f [N] (float64), origin codes [N] and whether each is novel [N]. Only ids travel to the device."""

    ids: torch.Tensor
    lengths: torch.Tensor
    f: torch.Tensor
    ce: torch.Tensor
    smooth: torch.Tensor
    origin: torch.Tensor
    novel: torch.Tensor

    def __getitem__(self, index) -> "Pool":
        return Pool(*(getattr(self, name)[index] for name in Pool.__dataclass_fields__))

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
        return {"ids": [list(row) for row in self.rows()], "f": self.f.tolist(), "ce": self.ce.tolist(),
                "smooth": self.smooth.tolist(), "origin": self.origin.tolist(), "novel": self.novel.tolist()}

    @staticmethod
    def from_json(state: dict, width: int) -> "Pool":
        ids = torch.zeros(len(state["ids"]), width, dtype=torch.long)
        for i, row in enumerate(state["ids"]):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        number = lambda key: torch.tensor(state[key], dtype=torch.float64)  # noqa: E731
        return Pool(ids, torch.tensor([len(r) for r in state["ids"]], dtype=torch.long), number("f"), number("ce"),
                    number("smooth"), torch.tensor(state["origin"], dtype=torch.long),
                    torch.tensor(state["novel"], dtype=torch.bool))


@dataclass
class Kept:
    """A task's prompts worth re-measuring: its running frontier, its KEEP_ACTIVE most active near-fluent prompts,
    as many novel ones, the most active near-fluent prompt of every start, and up to KEEP_DIVERSE most active
    near-fluent ones that differ pairwise."""

    pool: Pool

    def add(self, new: Pool) -> None:
        pool = self.pool.cat(new)
        first = list({row: i for i, row in reversed(list(enumerate(pool.rows())))}.values())
        pool = pool[torch.tensor(sorted(first), dtype=torch.long)]
        order = torch.argsort(pool.ce, stable=True)
        running = torch.cummax(pool.f[order], 0).values
        keep = torch.zeros(len(pool), dtype=torch.bool)
        keep[order[0]] = True  # a point is on the front if it beats every lower-CE one
        keep[order[1:]] = pool.f[order[1:]] > running[:-1]
        near = (pool.ce <= FLUENT_CE + FLUENT_MARGIN).nonzero()[:, 0]
        near = near[torch.argsort(pool.f[near], descending=True, stable=True)]
        keep[near[:KEEP_ACTIVE]] = True
        keep[near[pool.novel[near]][:KEEP_ACTIVE]] = True
        origins = pool.origin[near].tolist()
        keep[near[[origins.index(code) for code in set(origins)]]] = True
        rows = pool.rows()
        keep[near[differing([rows[i] for i in near.tolist()], KEEP_DIVERSE)]] = True
        self.pool = pool[keep]


def task_generator(seed: int, feature: Feature) -> torch.Generator:
    """The random stream of the task (feature, seed): seeded by both, so two features never start alike."""
    return torch.Generator().manual_seed((seed * 1_000_003 + feature.layer * 7_919 * 65_536 + feature.index) % 2**63)


@dataclass
class TaskState:
    """What one task (a feature and a seed) carries from iteration to iteration, and what `dream --more` restores."""

    generator: torch.Generator
    ngrams: set | None = None  # the runs of NOVEL_BELOW tokens of the feature's top contexts (None: none given)
    iteration: int = 0  # iterations done
    kept: Kept | None = None
    best: list[float] = field(default_factory=list)  # per iteration: best target so far
    best_fluent: list[float] = field(default_factory=list)  # per iteration: best with CE <= FLUENT_CE (NaN: none)
    since_gain: int = 0  # iterations since the best fluent target last improved by PLATEAU_GAIN

    def record(self) -> None:
        """One iteration done: its best and best fluent target, and the plateau count."""
        kept = self.kept.pool
        fluent = kept.f[kept.ce <= FLUENT_CE]
        self.best.append(float(kept.f.max()))
        self.best_fluent.append(float(fluent.max()) if len(fluent) else math.nan)
        before = [v for v in self.best_fluent[:-1] if not math.isnan(v)]
        gained = not math.isnan(self.best_fluent[-1]) and (not before or self.best_fluent[-1] >= max(before)
                                                            + PLATEAU_GAIN)
        self.since_gain = 0 if gained else self.since_gain + 1
        self.iteration += 1

    def to_json(self, members: Pool) -> dict:
        state = self.generator.get_state().numpy().tobytes()
        return {"iteration": self.iteration, "generator": base64.b64encode(state).decode(),
                "members": members.to_json(), "kept": self.kept.pool.to_json(), "best": self.best,
                "best_fluent": [None if math.isnan(v) else v for v in self.best_fluent], "since_gain": self.since_gain}

    @staticmethod
    def from_json(state: dict, width: int, ngrams: set | None) -> tuple["TaskState", Pool]:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8))
        task = TaskState(generator, ngrams, state["iteration"], Kept(Pool.from_json(state["kept"], width)),
                         list(state["best"]), [math.nan if v is None else v for v in state["best_fluent"]],
                         state["since_gain"])
        return task, Pool.from_json(state["members"], width)


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


def sampled_starts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, tasks: list[TaskState],
                   task_targets: list[int], counts: list[int]) -> list[list[tuple[list[int], int]]]:
    """Per task, `counts[t]` starting prompts sampled from the model after the template's prefix, with their origin
    codes. Every task draws `config.scan` prompts (its own uniform numbers, from its own generator; every other one
    begins with a uniformly drawn token, so the scan is not only what the model starts a chat turn with) and all
    are sampled in one batched pass on the device. Init "scan"/"dataset" score the task's feature on all of them in one
    pass and take the most active that differ pairwise (fluent ones first); "sample"/"mixed" take them as drawn.
    Prompts whose text does not round-trip are dropped; a task with too few left draws again."""
    n = config.prompt_length
    starts: list[list[tuple[list[int], int]]] = [[] for _ in tasks]
    needed = [t for t, count in enumerate(counts) if count]
    for _ in range(20):
        if not needed:
            return starts
        uniforms = [torch.rand(max(config.scan, 2 * counts[t]), n, generator=tasks[t].generator, dtype=torch.float64)
                    for t in needed]
        sizes = [len(u) for u in uniforms]
        every_other = torch.cat([torch.arange(size) % 2 == 1 for size in sizes])
        ids = scorer.sample(torch.cat(uniforms), allowed, uniform_first=every_other).cpu()  # [sum of draws, n]
        ok = scorer.round_trips(ids, torch.full((len(ids),), n))
        drawn = [part[good].tolist() for part, good in zip(ids.split(sizes), ok.split(sizes))]
        if config.init in ("scan", "dataset") and any(drawn):
            device = scorer.lm.device
            rows = torch.tensor([task_targets[t] for t, mine in zip(needed, drawn) for _ in mine], dtype=torch.long)
            flat = torch.tensor([row for mine in drawn for row in mine], dtype=torch.long).view(-1, n)
            f, ce, _ = _host(scorer.score(flat.to(device), torch.full((len(flat),), n, device=device), rows.to(device)))
            ranked = []  # fluent first, then most active
            for mine, f_, ce_ in zip(drawn, f.split([len(m) for m in drawn]), ce.split([len(m) for m in drawn])):
                order = sorted(range(len(mine)), key=lambda i: (float(ce_[i]) > FLUENT_CE, -float(f_[i])))
                ranked.append([mine[i] for i in order])
            drawn = [[mine[i] for i in differing(mine, len(mine))] for mine in ranked]
        for t, mine in zip(needed, drawn):
            have = len(starts[t])
            starts[t] += [(row, SAMPLED - (have + j)) for j, row in enumerate(mine[: counts[t] - have])]
        needed = [t for t in needed if len(starts[t]) < counts[t]]
    raise ValueError("could not draw starting prompts whose text re-tokenises to the same ids in this template; "
                     "with a BPE tokenizer the text before {prompt} must not end with a space (the optimised tokens "
                     "carry their own): write '\\n\\nHuman:{prompt}', not '\\n\\nHuman: {prompt}'")


def random_starts(scorer: Scorer, config: DreamConfig, allowed_ids: torch.Tensor, generator: torch.Generator,
                  count: int) -> list[tuple[list[int], int]]:
    """`count` prompts of uniform random allowed tokens whose text round-trips (the paper's start)."""
    n, drawn = config.prompt_length, []
    for _ in range(100):
        if len(drawn) >= count:
            return [(row, RANDOM) for row in drawn[:count]]
        ids = allowed_ids[torch.randint(len(allowed_ids), (count, n), generator=generator)]
        drawn.extend(ids[scorer.round_trips(ids, torch.full((len(ids),), n))].tolist())
    raise ValueError("could not draw random starting prompts whose text re-tokenises to the same ids")


def initial_prompts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, tasks: list[TaskState],
                    task_targets: list[int], dataset_seeds: list[list[tuple[list[int], int]]]
                    ) -> list[list[tuple[list[int], int]]]:
    """Per task, M starting prompts whose text round-trips, with their origin codes: dataset seeds (init "dataset":
    a quarter of the slots, strongest example first), then sampled ones and (init "random", "mixed": all, 1 in 4)
    uniform random ones."""
    M = config.population
    seeded = [seeds[: max(1, M // 4)] if config.init == "dataset" else [] for seeds in dataset_seeds]
    random_counts = [{"random": M - len(s), "mixed": (M - len(s)) // 4}.get(config.init, 0) for s in seeded]
    sampled = sampled_starts(scorer, config, allowed, tasks, task_targets,
                             [M - len(s) - r for s, r in zip(seeded, random_counts)])
    allowed_ids = allowed.nonzero()[:, 0]
    return [[(tokens, i) for tokens, i in seeded[t]] + sampled[t]
            + random_starts(scorer, config, allowed_ids, task.generator, random_counts[t]) * bool(random_counts[t])
            for t, task in enumerate(tasks)]


def select(pool: Pool, lambdas: torch.Tensor, config: DreamConfig) -> torch.Tensor:
    """[M] index into `pool` of each slot's new member. Slots choose in turn, each the argmax of f − λ_m·CE among
    the prompts whose lineage holds fewer than `config.lineage_share` of the slots (so a strong start cannot take
    over the population: the others keep searching), and (`config.distinct`) that differ from the prompts earlier
    slots took; a slot finding none that differs enough ("jaccard") takes the best one not taken, finding none at
    all its argmax."""
    M = len(lambdas)
    f = pool.f if config.selection == "exact" else pool.smooth
    objective = f[None] - lambdas[:, None] * pool.ce[None]  # [M, P]
    if config.distinct == "none" and config.lineage_share >= 1:
        return objective.argmax(dim=1)
    cap = max(1, int(config.lineage_share * M))
    rows = pool.rows()
    sets = [set(row) for row in rows]
    lineages = [lineage(code) for code in pool.origin.tolist()]
    chosen: list[int] = []
    held: dict[int, int] = {}

    def differs(candidate: int) -> bool:
        return all(len(sets[candidate] & sets[j]) <= MAX_JACCARD * len(sets[candidate] | sets[j]) for j in chosen)

    for m in range(M):
        order = torch.argsort(objective[m], descending=True, stable=True).tolist()
        order = [i for i in order if held.get(lineages[i], 0) < cap] or order
        new = [i for i in order if all(rows[i] != rows[j] for j in chosen)] if config.distinct != "none" else order
        different = next((i for i in new if differs(i)), None) if config.distinct == "jaccard" else None
        pick = different if different is not None else new[0] if new else order[0]
        chosen.append(pick)
        held[lineages[pick]] = held.get(lineages[pick], 0) + 1
    return torch.tensor(chosen)


def restart_index(members: Pool, lam: float, config: DreamConfig) -> int:
    """The member a restart copies: the best under the drawn λ."""
    f = members.f if config.selection == "exact" else members.smooth
    return int(torch.argmax(f - lam * members.ce))


def make_children(members: Pool, gradient_top: torch.Tensor, model_top: torch.Tensor, config: DreamConfig,
                  tasks: list[TaskState], allowed_ids: torch.Tensor) -> tuple[Pool, torch.Tensor, torch.Tensor]:
    """(children, index of each one's parent among the members, first prompt position where it differs from its
    parent): r per member, one move each, drawn from the member's task's generator. `gradient_top` [N, W, k] and
    `model_top` [N, W + 1, k_model] are the expansion's proposals, on the host."""
    M, r, W = config.population, config.children, members.ids.shape[1]
    lo, hi = config.length_range
    k = min(config.topk, len(allowed_ids))
    ids, lengths, parents, changed, novel = [], [], [], [], []
    members_ids, members_lengths = members.ids.tolist(), members.lengths.tolist()
    for member in range(len(members)):
        g = tasks[member // M].generator
        move, where, pick, source = (torch.rand(r, generator=g), torch.rand(r, generator=g),
                                     torch.randint(k, (r,), generator=g), torch.rand(r, generator=g))
        uniform = torch.randint(len(allowed_ids), (r,), generator=g)
        from_model = torch.randint(MODEL_TOPK, (r,), generator=g)
        row, n = members_ids[member][: members_lengths[member]], members_lengths[member]
        # the r moves at once, in the draws' float32 ([r] each): which move, where, and the new token
        insert = (move < config.insert_delete / 2) & (n < hi)
        delete = ~insert & (move < config.insert_delete) & (n > lo)
        position = torch.minimum((where * torch.where(insert, n + 1, n)).long(), torch.where(insert, n, n - 1))
        if config.proposal == "random":
            token = allowed_ids[uniform]
        else:
            modelled = (source < config.model_proposals) | (position == n)
            token = torch.where(modelled, model_top[member, position, from_model % model_top.shape[-1]],
                                gradient_top[member, position.clamp(max=gradient_top.shape[1] - 1), pick])
        for p, t, grow, shrink in zip(position.tolist(), token.tolist(), insert.tolist(), delete.tolist()):
            child = row[:p] + [t] + row[p:] if grow else row[:p] + row[p + 1 :] if shrink else row[:p] + [t] + row[p + 1 :]
            ids.append(child + [0] * (W - len(child)))
            lengths.append(len(child))
            parents.append(member)
            changed.append(p)
            novel.append(novel_row(child, tasks[member // M].ngrams))
    parents = torch.tensor(parents, dtype=torch.long)
    pool = Pool(torch.tensor(ids, dtype=torch.long).view(-1, W), torch.tensor(lengths, dtype=torch.long),
                members.f[parents], members.ce[parents], members.smooth[parents], members.origin[parents],
                torch.tensor(novel, dtype=torch.bool))
    return pool, parents, torch.tensor(changed, dtype=torch.long)


def _host(scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores brought to the host once, as float64: (f, CE, smooth f)."""
    both = torch.stack([scores.f, scores.ce, scores.smooth]).to("cpu", torch.float64)
    return both[0], both[1], both[2]


@dataclass
class Search:
    """Every task of one call searched in lockstep. The members of all tasks are one Pool on the host, task
    after task ([T * M] rows); their expansion (gradient and model proposals, KV caches) lives on the device.
    `run` is the loop; each step below is one method."""

    scorer: Scorer
    config: DreamConfig
    task_targets: list[int]  # [T] the target (index into scorer.targets) of each task
    tasks: list[TaskState]
    members: Pool | None = None  # a continued search's members; None: start afresh
    expansion: Expansion | None = None
    proposals: tuple[torch.Tensor, torch.Tensor] | None = None  # the expansion's gradient_top, model_top on the host

    def __post_init__(self):
        M, T = self.config.population, len(self.tasks)
        self.device = self.scorer.lm.device
        self.allowed = _allowed(self.scorer.lm)  # [vocab] bool
        self.allowed_ids = self.allowed.nonzero()[:, 0]
        self.lambdas = self.config.lambdas()  # [M]
        self.rows = torch.tensor(self.task_targets, dtype=torch.long).repeat_interleave(M)  # [T * M] target per member
        self.fresh = torch.ones(T * M, dtype=torch.bool)  # members whose expansion is out of date

    def run(self, dataset_seeds: list[list[tuple[list[int], int]]], progress: Progress | None = None,
            reported: list[bool] | None = None) -> str:
        """Search for config.iterations (or until a stop); returns why it stopped."""
        started = time.perf_counter()
        if self.members is None:
            self.start(dataset_seeds)
        for step in range(self.config.iterations):
            self.restart()
            self.expand()
            children, parent, changed = self.propose()
            self.score(children, parent, changed)
            self.select_and_record(children, parent)
            stopped = self.stop(step, started, progress, reported)
            if stopped:
                return stopped
        return "iterations"

    def start(self, dataset_seeds: list[list[tuple[list[int], int]]]) -> None:
        """Every task's M starting prompts (init), scored; the first prompts its Kept holds."""
        M, W = self.config.population, self.config.length_range[1]
        starts = [s for mine in initial_prompts(self.scorer, self.config, self.allowed, self.tasks, self.task_targets,
                                                 dataset_seeds) for s in mine]
        ids = torch.zeros(len(starts), W, dtype=torch.long)
        for i, (prompt, _) in enumerate(starts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        lengths = torch.tensor([len(prompt) for prompt, _ in starts], dtype=torch.long)
        f, ce, smooth = _host(self.scorer.score(ids.to(self.device), lengths.to(self.device), self.rows.to(self.device)))
        novel = [novel_row(prompt, self.tasks[i // M].ngrams) for i, (prompt, _) in enumerate(starts)]
        self.members = Pool(ids, lengths, f, ce, smooth, torch.tensor([code for _, code in starts], dtype=torch.long),
                            torch.tensor(novel, dtype=torch.bool))
        for t, task in enumerate(self.tasks):
            mine = self.members[t * M : (t + 1) * M]
            task.kept = Kept(mine[:0])
            task.kept.add(mine)

    def restart(self) -> None:
        """Every restart_every iterations (and at iteration 0 with restart_at_start), under a λ drawn uniformly from
        [restart_lambda_min, restart_lambda_max]: the slots of each lineage restart from its best member (every
        slot from the best member when lineages are not capped, lineage_share = 1)."""
        c, M = self.config, self.config.population
        for t, task in enumerate(self.tasks):
            if not ((task.iteration == 0 and c.restart_at_start)
                    or (task.iteration > 0 and c.restart_every and task.iteration % c.restart_every == 0)):
                continue
            lo, hi = c.restart_lambda_min, c.restart_lambda_max
            lam = lo + (hi - lo) * torch.rand((), generator=task.generator, dtype=torch.float64).item()
            mine = self.members[torch.arange(t * M, (t + 1) * M)]  # a copy
            groups: dict[int, list[int]] = {}
            for slot, code in enumerate(mine.origin.tolist()):
                groups.setdefault(0 if c.lineage_share >= 1 else lineage(code), []).append(slot)
            for slots in groups.values():
                best = slots[restart_index(mine[slots], lam, c)]
                self.members.put([t * M + s for s in slots], mine[[best] * len(slots)])
                self.fresh[torch.tensor([t * M + s for s in slots if s != best], dtype=torch.long)] = True

    def expand(self) -> None:
        """The gradient pass over the members that changed (all of them at first): what their children are drawn
        from and scored against; an unchanged member keeps its expansion."""
        if self.expansion is None:
            self.fresh[:] = True
        if not self.fresh.any():
            return
        c, d, T = self.config, self.device, len(self.tasks)
        index = self.fresh.nonzero()[:, 0]
        new = self.scorer.expand(self.members.ids[index].to(d), self.members.lengths[index].to(d),
                                 self.rows[index].to(d), self.lambdas.repeat(T)[index].to(d), self.allowed.to(d),
                                 min(c.topk, len(self.allowed_ids)) if c.proposal == "gradient" else 0,
                                 min(MODEL_TOPK, len(self.allowed_ids)))
        gradient_top, model_top = new.gradient_top.cpu(), new.model_top.cpu()
        if self.expansion is None or len(index) == len(self.members):
            self.expansion, self.proposals = new, (gradient_top, model_top)
        else:
            self.expansion.put(index.to(d), new)
            self.proposals[0][index], self.proposals[1][index] = gradient_top, model_top
        self.fresh[:] = False

    def propose(self) -> tuple[Pool, torch.Tensor, torch.Tensor]:
        """r children per member, one move each (make_children); those whose text does not round-trip are
        dropped. Returns (children, each one's parent member, the first position where it differs)."""
        children, parent, changed = make_children(self.members, *self.proposals, self.config, self.tasks,
                                                  self.allowed_ids)
        ok = self.scorer.round_trips(children.ids, children.lengths)
        return children[ok], parent[ok], changed[ok]

    def score(self, children: Pool, parent: torch.Tensor, changed: torch.Tensor) -> None:
        """The children's scores, each child run from its parent's KV cache."""
        d = self.device
        scores = self.scorer.score_children(children.ids.to(d), children.lengths.to(d), self.rows[parent].to(d),
                                            parent.to(d), changed.to(d), self.expansion.parents)
        children.f, children.ce, children.smooth = _host(scores)

    def select_and_record(self, children: Pool, parent: torch.Tensor) -> None:
        """Per task: each slot takes its new member from the members and the children (select), the children worth
        re-measuring are kept, and the iteration's best targets are recorded."""
        M = self.config.population
        child_task = parent // M
        for t, task in enumerate(self.tasks):
            mine = slice(t * M, (t + 1) * M)
            theirs = children[child_task == t]
            pool = self.members[mine].cat(theirs)
            chosen = select(pool, self.lambdas, self.config)
            self.fresh[mine] = chosen != torch.arange(M)  # a slot that kept its member keeps its expansion
            self.members.put(mine, pool[chosen])
            task.kept.add(theirs)
            task.record()

    def stop(self, step: int, started: float, progress: Progress | None, reported: list[bool] | None) -> str | None:
        """Why to stop after this iteration, if at all: the progress callback's reason, a plateau of every task,
        or the seconds budget spent."""
        c, tasks = self.config, self.tasks
        if progress is not None:
            fluent = [task.best_fluent[-1] for t, task in enumerate(tasks)
                      if (reported is None or reported[t]) and not math.isnan(task.best_fluent[-1])]
            stopped = progress((step + 1) * len(tasks), c.iterations * len(tasks), max(fluent) if fluent else None)
            if stopped:
                return stopped
        if c.plateau and all(task.since_gain >= c.plateau for task in tasks):
            return "plateau"
        if c.seconds is not None and time.perf_counter() - started >= c.seconds:
            return "seconds"
        return None


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
    shared = [[ids[1:] for ids, _ in c] if c else None for c in contexts]  # top contexts, BOS left out
    ngrams = [context_ngrams(shared[i]) for i in task_targets]
    tasks, members = _tasks(config, features, task_targets, seeds, ngrams, continue_from)
    before = tasks[0].iteration
    dataset_seeds = [seed_prompts(scorer, contexts[i] or [], config.prompt_length) if config.init == "dataset"
                     else [] for i in task_targets]
    reported = [scales[i][1] is None for i in task_targets]  # progress shows fractions of the dataset max only
    search = Search(scorer, config, task_targets, tasks, members)
    stopped = search.run(dataset_seeds, progress, reported)
    members = search.members
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
        prompts = remeasure(scorer, measure_lm, transcoder, feature, list(origins.items()),
                            dataset_max if scales[i][1] is None else None, shared[i])
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


def _tasks(config: DreamConfig, features: list[Feature], task_targets: list[int], seeds: list[int],
           ngrams: list[set | None], continue_from: list[DreamResult | None]) -> tuple[list[TaskState], Pool | None]:
    """Every task's state: fresh (a generator seeded by its seed and feature), or restored from the result it
    continues."""
    if not any(continue_from):
        return [TaskState(task_generator(seeds[t % len(seeds)], features[i]), ngrams[t])
                for t, i in enumerate(task_targets)], None
    if not all(continue_from):
        raise ValueError("continue either every feature of a call or none")
    W = config.length_range[1]
    tasks, pools = [], []
    for i, (feature, previous) in enumerate(zip(features, continue_from)):
        if previous.feature != str(feature) or previous.state is None:
            raise ValueError(f"cannot continue {feature} from a result of {previous.feature} or without its state")
        if not same_search(previous.config, config):
            raise ValueError(f"{feature}: a dream continues under its own config (only iterations, seconds and "
                             "plateau may change)")
        for state in previous.state["tasks"]:
            task, pool = TaskState.from_json(state, W, ngrams[len(tasks)])
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
